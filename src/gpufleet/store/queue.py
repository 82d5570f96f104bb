"""The durable task queue: Redis data, Lua scripts for every multi-key step.

Guarantees (on a real Redis with AOF; see docs/queue.md):

- a task ``enqueue`` returned is in Redis until it finishes and its retention passes;
- every move between waiting, running and finished is one Lua script, so a task is
  never in two places or none: ``lease`` pops it from its queue *and* records the lease;
- a lease not renewed by ``heartbeat`` expires; ``requeue_expired`` (also run inside
  every ``lease``) puts the task back, or fails it when it has used ``max_attempts``;
- retryable failures wait ``retry_backoff_s * 2**(attempt-1)`` (capped, with jitter);
- finished tasks and their events are deleted ``result_ttl_s`` after they finish.

Python builds arguments and parses answers, nothing more. The dispatcher (lease,
heartbeat, ack/fail) and the REST router (enqueue, get, list, cancel, wait, events)
are the consumers; the scaler reads ``stats()`` and listens on ``keys.wake()``.
Lease holders learn about a cancel from ``heartbeat()`` answering ``cancelled``, from
``wait(task_id)`` returning, or by subscribing to ``keys.cancel_channel()``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gpufleet.domain import TERMINAL_TASK_STATUSES, TaskStatus
from gpufleet.errors import (
    IdempotencyConflict,
    LimitExceeded,
    StoreError,
    TaskConflict,
    TaskNotFound,
)
from gpufleet.metrics import TASKS_SUBMITTED
from gpufleet.settings import QueueSettings
from gpufleet.store import scripts
from gpufleet.store.history import HistoryStore
from gpufleet.store.keys import Keys
from gpufleet.store.pubsub import Subscriber
from gpufleet.tasks import (
    Lease,
    LeaseOutcome,
    QueueStats,
    Task,
    TaskEvent,
    TaskPage,
    TaskSubmit,
)

logger = logging.getLogger(__name__)

# Hash fields a listing returns: everything but the payload, which may be megabytes.
SUMMARY_FIELDS = [
    "id",
    "kind",
    "status",
    "priority",
    "pool",
    "model",
    "workflow_id",
    "owner",
    "submitted_by",
    "max_attempts",
    "attempts",
    "timeout_s",
    "created_at",
    "queued_at",
    "started_at",
    "finished_at",
    "next_attempt_at",
    "expires_at",
    "worker",
    "lease_deadline",
    "result",
    "error",
    "errors",
    "requires",
]
# How often a waiter re-reads the task even without a notification (a lost pub/sub
# message, a reconnect): bounds the damage, never the normal path.
RECHECK_S = 5.0
STORE_RETRY_S = 0.2
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_task_id(now: float) -> str:
    """26 chars, ULID layout (48-bit ms time + 80 random bits): sorts by creation time."""
    value = (int(now * 1000) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


@dataclass(frozen=True)
class RequeueReport:
    requeued: int  # expired leases put back in their queue
    dead: int  # expired leases that had no attempts left (now failed)
    promoted: int  # retries whose backoff passed, back in their queue
    reaped: int  # finished tasks deleted after their retention
    expired: int = 0  # waiting tasks failed at their maximum queue age


class TaskQueue:
    """Tasks in Redis under ``key_prefix``. One per Redis client; scripts register once."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: QueueSettings,
        key_prefix: str = "gpufleet",
        clock: Callable[[], float] = time.time,
        *,
        jitter: Callable[[], float] = random.random,
        history: HistoryStore | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        # Counts an arrival per accepted task (buffered in memory: no extra round trip).
        self.history = history
        self.keys = Keys(key_prefix)
        self.clock = clock
        self.jitter = jitter
        self._scripts: dict[str, AsyncScript] = {
            name: scripts.register(redis, name) for name in scripts.QUEUE_SCRIPTS
        }
        self._notifier = _Notifier(redis, self.keys.task_channel())

    def __repr__(self) -> str:
        return f"<TaskQueue {self.keys.prefix}>"

    async def aclose(self) -> None:
        """Stop the pub/sub listener that ``wait`` and ``events`` start on first use."""
        await self._notifier.aclose()

    async def _run(self, name: str, *args: Any, now: float | None = None) -> Any:
        stamp = self.clock() if now is None else now
        argv = [self.keys.prefix, f"{stamp:.6f}", *args]
        try:
            return await self._scripts[name](keys=[], args=argv)
        except RedisError as exc:
            raise StoreError(f"queue {name} failed: {exc}") from exc

    # -- producers ---------------------------------------------------------------------

    async def enqueue(
        self,
        spec: TaskSubmit,
        *,
        owner: str | None = None,
        idempotency_key: str | None = None,
        max_queued: int | None = None,
        fit: Sequence[str] = (),
        requires: Mapping[str, Any] | None = None,
        submitted_by: str | None = None,
    ) -> Task:
        """Store a new task and make it runnable; with ``idempotency_key`` at most one per key.

        A second call with the same key (and owner) returns the first task; with the same
        key but a different request it raises ``IdempotencyConflict``. ``max_queued``: the
        owner's limit of waiting tasks (``LimitExceeded`` when reached). ``fit``: the pools
        whose GPUs fit the task's requirement when that is not every pool that could take it
        (the task then waits only for those); ``requires``: the requirement, for display.
        """
        now = self.clock()
        task_id = new_task_id(now)
        max_attempts = spec.max_attempts or self.settings.default_max_attempts
        idem = self.keys.idempotency(owner, idempotency_key) if idempotency_key else ""
        fingerprint = ""
        if idem:
            # A field left at None stays out, so fingerprints stored before it existed match.
            optional = ("max_queue_age_s", "gpu_memory_gb", "gpu", "cuda")
            unset = {f for f in optional if getattr(spec, f) is None}
            canonical = json.dumps(spec.model_dump(mode="json", exclude=unset), sort_keys=True)
            fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
        fields: list[str] = [
            "payload",
            json.dumps(spec.payload, separators=(",", ":")),
            "max_attempts",
            str(max_attempts),
        ]
        for name, value in (
            ("timeout_s", spec.timeout_s),
            ("workflow_id", spec.workflow_id),
            ("submitted_by", submitted_by),
        ):
            if value is not None:
                fields += [name, str(value)]
        if fit and not spec.pool:
            fields += ["fit", "+".join(sorted(fit))]
        if requires:
            fields += ["requires", json.dumps(dict(requires), separators=(",", ":"))]
        max_age = self.max_queue_age_s(spec)
        expires_at = float(f"{now + max_age:.6f}") if max_age is not None else None
        if expires_at is not None:
            fields += ["expires_at", f"{expires_at:.6f}"]
        verdict, stored_id = await self._run(
            "enqueue",
            task_id,
            idem,
            fingerprint,
            spec.kind.value,
            spec.pool or "",
            spec.model or "",
            str(spec.priority),
            owner or "",
            str(max_queued or 0),
            *fields,
            now=now,
        )
        verdict, stored_id = _s(verdict), _s(stored_id)
        if verdict == "existing":
            return await self.get(stored_id)
        if verdict == "limited":
            holder = "this team" if owner and owner.startswith("team:") else "this key"
            raise LimitExceeded(
                f"{holder} already has {stored_id} queued tasks (limit {max_queued})"
            )
        if verdict == "conflict":
            raise IdempotencyConflict(
                f"Idempotency-Key {idempotency_key!r} was used for task {stored_id} "
                "with a different request",
                task_id=stored_id,
            )
        logger.debug("task %s queued (%s, priority %s)", task_id, spec.kind, spec.priority)
        TASKS_SUBMITTED.labels(spec.kind.value).inc()
        if self.history is not None:  # a task naming no pool counts for its engine's pool
            self.history.note_task(spec.kind.value, spec.pool)
        stamp = float(f"{now:.6f}")
        return Task(
            id=task_id,
            kind=spec.kind,
            status=TaskStatus.queued,
            priority=spec.priority,
            pool=spec.pool,
            model=spec.model,
            workflow_id=spec.workflow_id,
            owner=owner,
            submitted_by=submitted_by,
            payload=spec.payload,
            max_attempts=max_attempts,
            timeout_s=spec.timeout_s,
            created_at=stamp,
            queued_at=stamp,
            expires_at=expires_at,
            requires=dict(requires) if requires else None,
        )

    def max_queue_age_s(self, spec: TaskSubmit) -> float | None:
        """The task's own maximum queue age, capped by ``[queue] max_queue_age_s``."""
        ages = [a for a in (spec.max_queue_age_s, self.settings.max_queue_age_s) if a]
        return min(ages) if ages else None

    async def cancel(self, task_id: str, *, reason: str = "cancelled by request") -> Task:
        """Cancel a queued or running task; a finished one raises ``TaskConflict`` (409)."""
        verdict, status = await self._run(
            "cancel", task_id, str(self.settings.result_ttl_s), reason
        )
        verdict, status = _s(verdict), _s(status)
        if verdict == "missing":
            raise TaskNotFound(f"no task {task_id}")
        if verdict == "conflict":
            raise TaskConflict(f"task {task_id} already {status}", status=status)
        logger.info("task %s cancelled (was %s)", task_id, status)
        return await self.get(task_id)

    # -- consumers (the dispatcher) ------------------------------------------------------

    async def lease(
        self,
        worker_id: str,
        pools: Sequence[str] = (),
        models: Sequence[str] | None = None,
        *,
        kinds: Sequence[str] = (),
        limit: int = 1,
    ) -> builtins.list[Lease]:
        """Take up to ``limit`` of the best waiting tasks this worker can serve.

        A task matches when it names one of ``pools``, or names no pool and its kind is in
        ``kinds``; and it names no model, or one of ``models`` (``models=None``: any model).
        Best = highest priority, then oldest. Each comes back running, leased until
        ``now + lease_ttl_s``; renew with ``heartbeat`` every ``heartbeat_interval_s``.
        """
        now = self.clock()
        deadline = now + self.settings.lease_ttl_s
        model_list = list(models or ())
        flat = await self._run(
            "lease",
            worker_id,
            f"{deadline:.6f}",
            str(limit),
            str(self.settings.result_ttl_s),
            "1" if models is None else "0",
            str(len(pools)),
            *pools,
            str(len(kinds)),
            *kinds,
            str(len(model_list)),
            *model_list,
            now=now,
        )
        leases: builtins.list[Lease] = []
        i = 0
        while i < len(flat):
            n = int(flat[i])
            token = _s(flat[i + 1])
            task = Task.from_hash(_pairs(flat[i + 2 : i + 2 + n]))
            leases.append(Lease(task=task, token=token, deadline=float(f"{deadline:.6f}")))
            i += 2 + n
        for lease in leases:
            logger.debug(
                "task %s leased by %s (attempt %s)", lease.task_id, worker_id, lease.task.attempts
            )
        return leases

    async def heartbeat(self, task_id: str, token: str) -> LeaseOutcome:
        """Renew a lease. ``cancelled``: stop the work; ``lost``: it is no longer yours."""
        now = self.clock()
        deadline = f"{now + self.settings.lease_ttl_s:.6f}"
        return LeaseOutcome(_s(await self._run("heartbeat", task_id, token, deadline, now=now)))

    async def ack(self, task_id: str, token: str, result: Any = None) -> LeaseOutcome:
        """Finish a leased task as succeeded with ``result`` (any JSON value)."""
        outcome = LeaseOutcome(
            _s(
                await self._run(
                    "ack",
                    task_id,
                    token,
                    json.dumps(result, separators=(",", ":")),
                    str(self.settings.result_ttl_s),
                )
            )
        )
        if outcome is not LeaseOutcome.ok:
            logger.info("task %s: ack with token %s ignored (%s)", task_id, token, outcome)
        return outcome

    async def fail(
        self,
        task_id: str,
        token: str,
        error: str | Mapping[str, Any],
        *,
        retryable: bool = True,
    ) -> LeaseOutcome:
        """Record a failed attempt: ``retry`` (waits for its backoff) or ``failed`` for good.

        ``error`` is a message or an object (kept as is, ``message`` and ``code`` by
        convention); every attempt's error stays in ``Task.errors``.
        """
        body = {"message": error} if isinstance(error, str) else dict(error)
        outcome = LeaseOutcome(
            _s(
                await self._run(
                    "fail",
                    task_id,
                    token,
                    json.dumps(body, separators=(",", ":"), default=str),
                    "1" if retryable else "0",
                    str(self.settings.result_ttl_s),
                    str(self.settings.retry_backoff_s),
                    str(self.settings.retry_backoff_max_s),
                    f"{self.jitter():.6f}",
                )
            )
        )
        logger.info("task %s attempt failed (%s): %s", task_id, outcome, body.get("message", ""))
        return outcome

    async def release(
        self,
        task_id: str,
        token: str,
        error: str | Mapping[str, Any],
        *,
        refund_attempt: bool = False,
    ) -> str:
        """Hand a leased task back to its queue at once (no backoff), keeping its place.

        For work that stopped through no fault of the task: its worker left ``ready``, or
        the dispatcher is shutting down (``refund_attempt=True``: the attempt is not
        counted). ``error`` is recorded in ``Task.errors`` like a failed attempt's.
        Answers ``requeued``, ``failed`` (no attempts left), ``cancelled`` or ``lost``.
        """
        body = {"message": error} if isinstance(error, str) else dict(error)
        outcome = _s(
            await self._run(
                "release",
                task_id,
                token,
                json.dumps(body, separators=(",", ":"), default=str),
                "1" if refund_attempt else "0",
                str(self.settings.result_ttl_s),
            )
        )
        logger.info("task %s handed back (%s): %s", task_id, outcome, body.get("message", ""))
        return outcome

    async def progress(self, task_id: str, token: str, detail: str) -> bool:
        """Append a progress note to a running task's events (only its lease holder may)."""
        return bool(await self._run("progress", task_id, token, detail))

    async def requeue_expired(self, limit: int = 1000) -> RequeueReport:
        """Housekeeping for a periodic loop: expired leases, due retries, old results."""
        answer = await self._run("requeue_expired", str(limit), str(self.settings.result_ttl_s))
        report = RequeueReport(*(int(x) for x in answer))
        if report.expired:
            logger.warning(
                "failed %d waiting task(s) at their maximum queue age (no worker ran them)",
                report.expired,
            )
        if report.requeued or report.dead:
            logger.warning(
                "requeued %d task(s) whose lease expired; %d out of attempts failed",
                report.requeued,
                report.dead,
            )
        return report

    # -- readers -------------------------------------------------------------------------

    async def get(self, task_id: str, *, include_payload: bool = True) -> Task:
        key = self.keys.task(task_id)
        try:
            if include_payload:
                data = {_s(k): _s(v) for k, v in (await self.redis.hgetall(key)).items()}
            else:
                values = await self.redis.hmget(key, SUMMARY_FIELDS)
                data = {f: _s(v) for f, v in zip(SUMMARY_FIELDS, values, strict=True) if v}
        except RedisError as exc:
            raise StoreError(f"cannot read task {task_id}: {exc}") from exc
        if "id" not in data:
            raise TaskNotFound(f"no task {task_id}")
        return Task.from_hash(data)

    async def list(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        pool: str | None = None,
        owner: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Newest first, without payloads. ``cursor`` is the previous page's ``next_cursor``.

        ``status`` reads its own index; ``kind``/``pool``/``owner`` filter while scanning at
        most ``20 * limit`` entries, so a sparse filter may return a short page with a cursor.
        """
        index = self.keys.tasks_by_status(status) if status else self.keys.tasks()
        top = f"({int(cursor)}" if cursor else "+inf"
        found: builtins.list[Task] = []
        scanned = 0
        batch = max(limit, 50)
        try:
            while len(found) < limit and scanned < 20 * limit:
                entries: Any = await self.redis.zrevrangebyscore(
                    index, top, "-inf", start=0, num=batch, withscores=True
                )
                if not entries:
                    top = ""
                    break
                scanned += len(entries)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for member, _ in entries:
                        pipe.hmget(self.keys.task(_s(member)), SUMMARY_FIELDS)
                    rows = await pipe.execute()
                for (_, score), values in zip(entries, rows, strict=True):
                    top = f"({int(score)}"
                    data = {f: _s(v) for f, v in zip(SUMMARY_FIELDS, values, strict=True) if v}
                    if "id" not in data:
                        continue  # expired a moment ago; the reaper drops the index entry
                    if (
                        (kind and data.get("kind") != kind)
                        or (pool and data.get("pool") != pool)
                        or (owner and data.get("owner") != owner)
                    ):
                        continue
                    found.append(Task.from_hash(data))
                    if len(found) == limit:
                        break
        except RedisError as exc:
            raise StoreError(f"cannot list tasks: {exc}") from exc
        return TaskPage(tasks=found, next_cursor=top[1:] if top.startswith("(") else None)

    async def stats(self) -> QueueStats:
        """Depths and in-flight counts (O(1) counters) and oldest waiting (queue heads)."""
        depth_flat, inflight_flat, delayed, oldest_flat, by_model = await self._run("stats")
        depth = {k: int(v) for k, v in _pairs(depth_flat).items()}
        inflight = {k: int(v) for k, v in _pairs(inflight_flat).items()}
        oldest = {k: float(v) for k, v in _pairs(oldest_flat).items()}

        def group(source: Mapping[str, float], prefix: str) -> dict[str, Any]:
            return {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}

        runnable: dict[str, dict[str, dict[str, int]]] = {"pool": {}, "kind": {}, "fit": {}}
        for i in range(0, len(by_model) - 3, 4):
            kind, name, model = _s(by_model[i]), _s(by_model[i + 1]), _s(by_model[i + 2])
            runnable[kind].setdefault(name, {})[model] = int(by_model[i + 3])

        return QueueStats(
            queued=depth.get("all", 0),
            running=inflight.get("all", 0),
            delayed=int(delayed),
            queued_by_pool=group(depth, "pool:"),
            queued_unpooled=group(depth, "nopool:"),
            queued_by_engine=group(depth, "kind:"),
            queued_by_model=group(depth, "model:"),
            running_by_pool=group(inflight, "pool:"),
            running_by_engine=group(inflight, "kind:"),
            running_by_model=group(inflight, "model:"),
            queued_by_owner=group(depth, "owner:"),
            running_by_owner=group(inflight, "owner:"),
            oldest_by_pool=group(oldest, "pool:"),
            oldest_unpooled=group(oldest, "nopool:"),
            runnable_by_pool_model=runnable["pool"],
            runnable_unpooled_by_model=runnable["kind"],
            queued_by_fit=group(depth, "fit:"),
            running_by_fit=group(inflight, "fit:"),
            runnable_fit_by_model=runnable["fit"],
            oldest_by_fit=group(oldest, "fit:"),
        )

    async def wait(self, task_id: str, timeout_s: float) -> Task:
        """The task (without payload) once finished, or as it stands after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with self._notifier.watch(task_id) as inbox:
            task: Task | None = None
            while True:
                try:
                    task = await self.get(task_id, include_payload=False)
                except StoreError:
                    # Redis went away mid-wait: ride out a restart until the deadline.
                    if task is None or loop.time() >= deadline:
                        raise
                    await asyncio.sleep(STORE_RETRY_S)
                    continue
                remaining = deadline - loop.time()
                if task.finished or remaining <= 0:
                    return task
                await inbox.next(min(remaining, RECHECK_S))

    async def events(
        self, task_id: str, *, after: str | None = None, keepalive_s: float = 15.0
    ) -> AsyncGenerator[TaskEvent | None, None]:
        """Every state change after stream id ``after`` (all when None), until finished.

        Yields None after ``keepalive_s`` without a change (for SSE keep-alives).
        Raises ``TaskNotFound`` before the first event if the task does not exist.
        """
        if not await self.redis.exists(self.keys.task(task_id)):
            raise TaskNotFound(f"no task {task_id}")
        stream = self.keys.task_events(task_id)
        last = after or "0-0"
        seen_finished = False
        async with self._notifier.watch(task_id) as inbox:
            while True:
                entries: Any = await self.redis.xrange(stream, min=f"({last}", count=100)
                for event_id, data in entries:
                    last = _s(event_id)
                    fields = {_s(k): _s(v) for k, v in data.items()}
                    event = TaskEvent(
                        id=last,
                        task_id=task_id,
                        status=TaskStatus(fields["status"]),
                        ts=float(fields["ts"]),
                        detail=fields.get("detail", ""),
                    )
                    yield event
                    if event.status in TERMINAL_TASK_STATUSES:
                        return
                if entries:
                    continue
                status = await self.redis.hget(self.keys.task(task_id), "status")
                if status is None:
                    return  # expired
                if _s(status) in TERMINAL_TASK_STATUSES:
                    if seen_finished:
                        return  # finished before `after`
                    # It may have finished between the read above and this one: read the
                    # stream once more, so its last event is never lost.
                    seen_finished = True
                    continue
                if not await inbox.next(keepalive_s):
                    yield None


class _Inbox:
    """Wake-ups for one waiter; ``next`` returns False on timeout."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def next(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except TimeoutError:
            return False
        self._event.clear()
        return True


class _Notifier:
    """One pub/sub subscription per ``TaskQueue`` fanning task changes out to local waiters.

    Started on first use, so processes that never wait (dispatchers, benchmarks) hold no
    subscription. Waiters re-read Redis after every wake-up, so a lost message costs at
    most ``RECHECK_S``; after a reconnect every waiter is woken.
    """

    def __init__(self, redis: aioredis.Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self._inboxes: dict[str, set[_Inbox]] = {}
        self._subscriber = Subscriber(
            redis,
            [channel],
            self._on_message,
            name="gpufleet-task-events",
            on_listening=self._wake_all,
        )

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[_Inbox]:
        inbox = _Inbox()
        self._inboxes.setdefault(task_id, set()).add(inbox)
        try:
            with contextlib.suppress(TimeoutError):
                # Subscribed before the caller reads state: no change slips between.
                await self._subscriber.listening(RECHECK_S)
            yield inbox
        finally:
            waiters = self._inboxes.get(task_id)
            if waiters is not None:
                waiters.discard(inbox)
                if not waiters:
                    del self._inboxes[task_id]

    def _on_message(self, _channel: str, data: str) -> None:
        task_id = data.partition(" ")[0]
        for inbox in list(self._inboxes.get(task_id, ())):
            inbox.notify()

    def _wake_all(self) -> None:
        """(Re)subscribed: whatever changed while not listening, every waiter re-reads."""
        for waiters in list(self._inboxes.values()):
            for inbox in waiters:
                inbox.notify()

    async def aclose(self) -> None:
        await self._subscriber.aclose()
