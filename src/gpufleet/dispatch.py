"""The dispatcher: leases queued tasks to free worker slots and drives the engines.

One pass (``dispatch_once``, what tests call) does two things:

1. **hand back** the tasks this process runs on workers that left ``ready``/``draining``
   (the health checker moved them to ``booting`` after ``unhealthy_after`` failed
   probes, or they vanished): the engine is told to stop and the lease goes back to the
   queue at once (``TaskQueue.release``), not failed — the task did nothing wrong. A
   ``draining`` worker keeps its tasks until they finish; it only gets no new ones.
2. **fill free slots**: for each ``ready`` worker with free slots and matching work in
   the queue (``stats()``, so an idle fleet does not churn its slots), take slots first
   (``WorkerRegistry.acquire_slot``, atomic and shared with the proxy and every other
   replica), then lease as many best matching tasks (the worker's pool, or no pool and
   its engine; for Ollama a model present on the worker), and give back the slots no
   task came for.

Each leased task runs as its own asyncio task (``_drive``): the engine runs it while a
keeper heartbeats the lease and renews the slot every ``heartbeat_interval_s``;
progress goes to the task's events; the end is one of

- success → ``ack(result)`` (ComfyUI outputs are already in the result store: the
  engine copies them before it returns);
- ``EngineRejected`` (a ComfyUI 400 with ``node_errors``) → ``fail(retryable=False)``,
  the worker's own words kept in the task's error;
- ``EngineUnavailable`` (dropped connection, 5xx, timeout) → ``fail(retryable=True)``;
- stopped by us: cancelled by a client (the ``P:cancel`` channel, or a heartbeat that
  answers ``cancelled``: the engine hears of it within a second), the attempt's
  ``timeout_s`` (a retryable failure), a hand-back (above) or shutdown (``aclose``: the
  lease is handed back with its attempt refunded).

The slot is always released. Nothing here blocks the event loop: all I/O is async, and
result files are written through the result store's thread. The loop that runs passes
is woken by ``wake`` — set by the ``P:wake`` channel (a task became runnable) and by a
run ending (a slot freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from gpufleet.domain import Engine, Worker, WorkerState
from gpufleet.engines import EngineClient, WorkerEngines, is_cancelled
from gpufleet.errors import EngineError, EngineRejected
from gpufleet.metrics import (
    TASK_ATTEMPTS_FAILED,
    TASK_QUEUE_WAIT,
    TASK_RUN,
    TASKS_FINISHED,
    is_cold_task_start,
    observe_cold_start,
)
from gpufleet.results import ResultStore
from gpufleet.routing import normalize_model
from gpufleet.settings import PoolSpec, Settings
from gpufleet.store.history import HistoryStore
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.pubsub import Subscriber
from gpufleet.store.queue import TaskQueue
from gpufleet.store.teams import team_of_owner
from gpufleet.store.usage import UsageStore, attributed_usd
from gpufleet.store.workers import WorkerRegistry
from gpufleet.tasks import Lease, LeaseOutcome, QueueStats

logger = logging.getLogger(__name__)

# Why we asked a run to stop (``_Run.stop``).
CANCELLED, LOST, TIMEOUT = "cancelled", "lost", "timeout"
HANDBACK, SHUTDOWN = "handback", "shutdown"
# States whose workers keep running the tasks they have (draining finishes its work).
KEEPS_TASKS = frozenset({WorkerState.ready, WorkerState.draining})
# How long ``aclose`` lets runs hand their leases back before it cancels them.
CLOSE_GRACE_S = 5.0
# Event types worth a line in the task's event stream (capped at ~64 entries): per-node
# "executed" is left out, "progress" is thinned to every tenth of a node's steps.
RECORDED_EVENTS = frozenset(
    {"queued", "started", "executing", "progress", "output", "polling", "finished"}
)
LISTEN_RETRY_MAX_S = 5.0
NOTES_FLUSH_S = 2.0


@dataclass(eq=False)
class _Run:
    """One leased task running on one worker in this process."""

    lease: Lease
    worker: Worker
    slot: str
    started: float
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    stop: str | None = None
    task: asyncio.Task[None] | None = None
    handback: asyncio.Task[None] | None = None
    progress_marks: dict[str, int] = field(default_factory=dict)
    # Progress notes wait here for ``_write_notes``: the engine's own task never awaits
    # Redis, so stopping it (cancel, hand-back) never interrupts a Redis call.
    notes: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    # Set when the run ends: its keeper and note writer stop by themselves. They are never
    # cancelled, because cancelling a redis-py (8.1) call in flight can hang the caller.
    done: asyncio.Event = field(default_factory=asyncio.Event)
    attributed: bool = False  # its usage is recorded (once, whatever the outcome)

    @property
    def task_id(self) -> str:
        return self.lease.task_id

    def __repr__(self) -> str:
        return f"<Run {self.task_id} on {self.worker.id} stop={self.stop}>"


class Dispatcher:
    """Runs queued tasks on the fleet's ready workers; one per process (or replica)."""

    def __init__(
        self,
        settings: Settings,
        registry: WorkerRegistry,
        queue: TaskQueue,
        http: httpx.AsyncClient,
        *,
        results: ResultStore | None = None,
        engines: Mapping[str, EngineClient] | None = None,
        history: HistoryStore | None = None,
        usage: UsageStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.usage = usage  # GPU time and dollars of each attempt, attributed to its owner
        self.history = history  # service durations of acked tasks (buffered, no round trip)
        self.registry = registry
        self.queue = queue
        self.http = http
        self.results = results
        self.clock = clock
        self.engines: dict[str, EngineClient] = dict(engines or {})
        self._lookup = WorkerEngines(settings, http, self.engines)
        self.name = uuid.uuid4().hex[:8]
        self.wake = asyncio.Event()
        self._runs: dict[str, _Run] = {}
        self._subscriber = Subscriber(
            queue.redis,
            [queue.keys.wake(), queue.keys.cancel_channel()],
            self._on_message,
            name=f"dispatch-{self.name}",
            backoff_max_s=LISTEN_RETRY_MAX_S,
        )
        self._closing = False
        self.pool_state = PoolStateStore(queue.redis, prefix=queue.keys.prefix, clock=clock)
        self._warm_since: dict[str, float] = {}  # pool -> earliest ready_since of its ready workers

    def __repr__(self) -> str:
        return f"<Dispatcher {self.name} running={len(self._runs)}>"

    @property
    def running(self) -> dict[str, str]:
        """Task id → worker id of every task this dispatcher runs now."""
        return {task_id: run.worker.id for task_id, run in self._runs.items()}

    # -- one pass ------------------------------------------------------------------------

    async def dispatch_once(self) -> int:
        """Hand back tasks of workers that left ``ready``; fill free slots. Returns starts."""
        if self._closing:
            return 0
        self._ensure_listener()
        stats: QueueStats | None = None
        if not self._runs:  # nothing to hand back: an empty queue ends the pass in 1 round trip
            stats = await self.queue.stats()
            if stats.queued == 0:
                return 0
        workers = await self.registry.list_workers()
        self._hand_back_lost({w.id: w for w in workers})
        candidates = [w for w in workers if w.takes_new_work and w.free_slots > 0]
        self._warm_since = _warm_since(workers)
        if not candidates:
            return 0
        if stats is None:
            stats = await self.queue.stats()
        if stats.queued == 0:
            return 0
        counts = await asyncio.gather(
            *(self._fill(w) for w in candidates if self._has_work(w, stats)),
            return_exceptions=True,
        )
        started = 0
        for count in counts:
            if isinstance(count, BaseException):
                logger.error("dispatch: filling a worker failed: %r", count)
            else:
                started += count
        return started

    async def wait_idle(self) -> None:
        """Wait until every task this dispatcher started has finished (tests, shutdown)."""
        while self._runs:
            await asyncio.gather(
                *(r.task for r in list(self._runs.values()) if r.task is not None),
                return_exceptions=True,
            )

    def _hand_back_lost(self, workers: Mapping[str, Worker]) -> None:
        for run in list(self._runs.values()):
            worker = workers.get(run.worker.id)
            if worker is None or worker.state not in KEEPS_TASKS:
                state = worker.state if worker is not None else "gone"
                logger.warning("task %s: worker %s is %s; handing the task back",
                               run.task_id, run.worker.id, state)
                self._stop_run(run, HANDBACK)

    def _has_work(self, worker: Worker, stats: QueueStats) -> bool:
        engine = self._lookup.kind(worker)
        if engine is None:
            return False
        waiting = stats.queued_by_pool.get(worker.pool, 0) + stats.queued_unpooled.get(engine, 0)
        if waiting <= 0:
            return False
        if engine == Engine.ollama:  # every Ollama task names a model; skip if none is here
            return any(stats.queued_by_model.get(m, 0) > 0 for m in _model_names(worker))
        return True

    async def _fill(self, worker: Worker) -> int:
        engine = self._lookup.kind(worker)
        assert engine is not None
        tokens: list[str] = []
        for _ in range(worker.free_slots):
            token = await self.registry.acquire_slot(
                worker.id, f"dispatch:{self.name}:{uuid.uuid4().hex[:12]}"
            )
            if token is None:
                break
            tokens.append(token)
        if not tokens:
            return 0
        leases: list[Lease] = []
        try:
            leases = await self.queue.lease(
                worker.id,
                pools=[worker.pool],
                models=_model_names(worker) if engine == Engine.ollama else None,
                kinds=[engine],
                limit=len(tokens),
            )
        finally:
            for token in tokens[len(leases):]:
                await self._release_slot(worker.id, token)
        for lease, token in zip(leases, tokens, strict=False):
            self._start(worker, lease, token)
        return len(leases)

    # -- one task ------------------------------------------------------------------------

    def _start(self, worker: Worker, lease: Lease, slot: str) -> None:
        now = self.clock()
        run = _Run(lease=lease, worker=worker, slot=slot, started=now)
        task = lease.task
        if task.queued_at is not None:
            TASK_QUEUE_WAIT.labels(task.kind.value).observe(max(0.0, now - task.queued_at))
            if is_cold_task_start(task.queued_at, task.attempts, self._warm_since.get(worker.pool)):
                observe_cold_start(worker.pool, now - task.queued_at)
        self._runs[lease.task_id] = run
        run.task = asyncio.create_task(self._drive(run), name=f"task-{lease.task_id}")
        logger.info("task %s started on %s (attempt %d)", lease.task_id, worker.id, task.attempts)

    async def _drive(self, run: _Run) -> None:
        loop = asyncio.get_running_loop()
        keeper = asyncio.create_task(self._keep(run), name=f"keep-{run.task_id}")
        writer = asyncio.create_task(self._write_notes(run), name=f"notes-{run.task_id}")
        timeout_s = run.lease.task.timeout_s
        timer = loop.call_later(timeout_s, self._stop_run, run, TIMEOUT) if timeout_s else None
        t0 = loop.time()
        try:
            await self._execute(run)
        except asyncio.CancelledError:  # aclose gave up waiting: hand the lease back anyway
            run.stop = run.stop or SHUTDOWN
            await self._hand_back(run)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            run.done.set()
            run.notes.put_nowait(None)
            await asyncio.gather(keeper, writer, return_exceptions=True)
            TASK_RUN.labels(run.lease.task.kind.value).observe(loop.time() - t0)
            await self._release_slot(run.worker.id, run.slot)
            await self._attribute(run)
            self._runs.pop(run.task_id, None)
            self.wake.set()  # a slot is free

    async def _execute(self, run: _Run) -> None:
        task, worker = run.lease.task, run.worker
        engine = self._engine(worker)
        pool = self._lookup.pool(worker)
        try:
            result = await engine.run(
                worker.base_url,
                task.payload or {},
                task_id=task.id,
                on_event=lambda event: self._on_event(run, event),
                cancel=run.cancel,
                results=self.results,
                keep_alive_s=self._keep_alive_s(pool),
            )
        except EngineRejected as exc:
            await self._fail(run, exc, retryable=False)
        except EngineError as exc:
            if run.stop in (HANDBACK, SHUTDOWN):
                await self._hand_back(run)
            else:
                if exc.details.get("unreachable"):
                    await self._note_unreachable(run.worker, exc)
                await self._fail(run, exc, retryable=exc.transient)
        except Exception as exc:  # a bug here must not lose the task: retry it
            logger.exception("task %s: unexpected error on %s", task.id, worker.id)
            await self._fail(run, exc, retryable=True)
        else:
            if is_cancelled(result):
                await self._stopped(run)
            else:
                await self._flush_notes(run)
                # Its spend is recorded before anyone can see the task succeed: a client
                # that waits for it and submits again meets its team's budget as spent.
                await self._attribute(run)
                await self._ack(run, result)

    async def _attribute(self, run: _Run) -> None:
        """Record the attempt's slot time and its price for the task's owner (whatever the
        outcome: the GPU was held either way)."""
        pool = self._lookup.pool(run.worker)
        if self.usage is None or pool is None or run.attributed:
            return
        run.attributed = True
        task = run.lease.task
        held_s = max(0.0, self.clock() - run.started)
        try:
            await self.usage.record(
                owner_team=team_of_owner(task.owner),
                key=task.submitted_by or ("" if team_of_owner(task.owner) else task.owner or ""),
                pool=pool.name,
                model=task.model or "",
                kind="tasks",
                gpu_s=held_s,
                usd=attributed_usd(pool.price_per_hour or 0.0, held_s, pool.slots),
            )
        except Exception as exc:  # only usage is lost, never the task's outcome
            logger.warning("task %s: usage not recorded (%s)", task.id, exc)

    async def _note_unreachable(self, worker: Worker, exc: EngineError) -> None:
        """A worker that refused a connection counts one failed health probe, before the
        task is put back: the retry then goes to another worker (``takes_new_work``)
        instead of spending its attempts on this one before the health checker notices."""
        try:
            failures = await self.registry.record_health(worker.id, ok=False)
        except RedisError as redis_exc:  # the retry still happens; only the hint is lost
            logger.warning("worker %s: unreachable, not recorded (%s)", worker.id, redis_exc)
            return
        logger.warning("worker %s unreachable (%d failed contacts): %s",
                       worker.id, failures, exc)

    async def _through_outage(
        self, call: Callable[[], Awaitable[LeaseOutcome]], task_id: str
    ) -> LeaseOutcome:
        """Report a finished attempt, retrying while Redis is unreachable.

        The work is done: losing the report to a Redis restart would run the task again
        once its lease expires. A late ack still counts while nobody has leased the task
        again (see docs/queue.md), so retrying for a lease TTL and a bit is safe; a report
        that did reach Redis before the connection broke answers ``lost`` on the retry.
        """
        budget_s = self.settings.queue.lease_ttl_s + self.settings.queue.heartbeat_interval_s
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            stop=stop_after_delay(budget_s),
            reraise=True,
            before_sleep=lambda state: logger.warning(
                "task %s: cannot report to Redis (%s); retrying",
                task_id,
                state.outcome.exception() if state.outcome else "?",
            ),
        ):
            with attempt:
                return await call()
        raise AssertionError("unreachable: AsyncRetrying reraises")  # pragma: no cover

    async def _ack(self, run: _Run, result: dict[str, Any]) -> None:
        kind = run.lease.task.kind.value
        outcome = await self._through_outage(
            lambda: self.queue.ack(run.task_id, run.lease.token, result), run.task_id
        )
        if outcome is LeaseOutcome.ok:
            TASKS_FINISHED.labels(kind, "succeeded").inc()
            if self.history is not None:  # lease to ack: how long the task held its slot
                self.history.note_service(
                    run.worker.pool, max(0.0, self.clock() - run.started), run.lease.task.model
                )
            with contextlib.suppress(RedisError):  # only feeds cost per succeeded task
                await self.pool_state.count_succeeded(run.worker.pool)
            logger.info("task %s succeeded on %s", run.task_id, run.worker.id)
        elif outcome is LeaseOutcome.cancelled:
            TASKS_FINISHED.labels(kind, "cancelled").inc()

    async def _fail(
        self, run: _Run, exc: Exception, *, retryable: bool, code: str | None = None
    ) -> None:
        kind = run.lease.task.kind.value
        error: dict[str, Any] = {
            "code": code or getattr(exc, "code", "internal_error"),
            "message": str(exc),
            "worker": run.worker.id,
        }
        if isinstance(exc, EngineError):
            error.update({k: v for k, v in exc.details.items() if k not in error})
        outcome = await self._through_outage(
            lambda: self.queue.fail(run.task_id, run.lease.token, error, retryable=retryable),
            run.task_id,
        )
        if outcome in (LeaseOutcome.retry, LeaseOutcome.failed):
            retry = "yes" if outcome is LeaseOutcome.retry else "no"
            TASK_ATTEMPTS_FAILED.labels(kind, retry).inc()
        if outcome is LeaseOutcome.failed:
            TASKS_FINISHED.labels(kind, "failed").inc()
        logger.warning("task %s on %s: %s (%s)", run.task_id, run.worker.id, exc, outcome)

    async def _stopped(self, run: _Run) -> None:
        """The engine stopped because we asked it to; finish according to why."""
        kind = run.lease.task.kind.value
        if run.stop == CANCELLED:
            TASKS_FINISHED.labels(kind, "cancelled").inc()
            logger.info("task %s cancelled on %s", run.task_id, run.worker.id)
        elif run.stop in (HANDBACK, SHUTDOWN):
            await self._hand_back(run)
        elif run.stop == TIMEOUT:
            timeout = run.lease.task.timeout_s
            await self._fail(run, EngineError(f"attempt ran longer than timeout_s={timeout}"),
                             retryable=True, code="timeout")
        elif run.stop != LOST:
            await self._fail(run, EngineError("the engine stopped the task unasked"),
                             retryable=True)

    def _stop_run(self, run: _Run, reason: str) -> None:
        """Tell a run's engine to stop; a hand-back also gives the lease back right away."""
        if run.stop is not None:
            return
        run.stop = reason
        run.cancel.set()
        if reason in (HANDBACK, SHUTDOWN):
            # Do not wait for the engine (a dead worker may take its timeout to answer the
            # interrupt): the task can run elsewhere now.
            run.handback = asyncio.create_task(self._release_lease(run),
                                               name=f"handback-{run.task_id}")

    async def _hand_back(self, run: _Run) -> None:
        if run.handback is None:
            run.handback = asyncio.create_task(self._release_lease(run),
                                               name=f"handback-{run.task_id}")
        await asyncio.shield(run.handback)

    async def _release_lease(self, run: _Run) -> None:
        if run.stop == SHUTDOWN:
            error = {"code": "dispatcher_shutdown",
                     "message": "gpufleet shut down while the task ran; handed back"}
        else:
            error = {"code": "worker_unavailable",
                     "message": f"worker {run.worker.id} left ready; handed back"}
        try:
            await self.queue.release(run.task_id, run.lease.token, error,
                                     refund_attempt=run.stop == SHUTDOWN)
        except Exception as exc:  # the lease then expires and requeue_expired puts it back
            logger.warning("task %s: hand-back failed (%s); its lease will expire",
                           run.task_id, exc)

    async def _keep(self, run: _Run) -> None:
        """Heartbeat the lease and renew the slot until the run ends."""
        interval = min(self.settings.queue.heartbeat_interval_s, self.registry.slot_ttl_s / 3)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.done.wait(), interval)
            if run.done.is_set() or run.stop in (HANDBACK, SHUTDOWN, LOST):
                return
            try:
                outcome = await self.queue.heartbeat(run.task_id, run.lease.token)
                if not await self.registry.renew_slot(run.worker.id, run.slot):
                    logger.warning("task %s: slot on %s had expired", run.task_id, run.worker.id)
            except Exception as exc:
                logger.warning("task %s: heartbeat failed (%s)", run.task_id, exc)
                continue
            if outcome is LeaseOutcome.cancelled:
                self._stop_run(run, CANCELLED)
            elif outcome is LeaseOutcome.lost:
                logger.warning("task %s: lease lost; stopping its run on %s",
                               run.task_id, run.worker.id)
                self._stop_run(run, LOST)

    async def _on_event(self, run: _Run, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind not in RECORDED_EVENTS or run.stop is not None:
            return
        if kind == "progress":
            value, top = event.get("value"), event.get("max")
            if isinstance(value, int | float) and isinstance(top, int | float) and top > 0:
                tenth = int(10 * value / top)
                node = str(event.get("node"))
                if run.progress_marks.get(node) == tenth:
                    return
                run.progress_marks[node] = tenth
        run.notes.put_nowait(json.dumps(event, separators=(",", ":"), default=str))

    async def _write_notes(self, run: _Run) -> None:
        while True:
            detail = await run.notes.get()
            if detail is None:
                return
            try:
                await self.queue.progress(run.task_id, run.lease.token, detail)
            except Exception as exc:  # a lost note is a gap in the timeline, nothing more
                logger.debug("task %s: progress note lost (%s)", run.task_id, exc)
            finally:
                run.notes.task_done()

    async def _flush_notes(self, run: _Run) -> None:
        """Let the last notes land before the final event (bounded: they are only notes)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.notes.join(), NOTES_FLUSH_S)

    async def _release_slot(self, worker_id: str, token: str) -> None:
        try:
            await self.registry.release_slot(worker_id, token)
        except Exception as exc:  # it frees itself when its deadline passes
            logger.warning("slot %s on %s: release failed (%s)", token, worker_id, exc)

    # -- engines and pools ---------------------------------------------------------------

    def _engine(self, worker: Worker) -> EngineClient:
        engine = self._lookup.client(worker)
        if engine is None:
            raise EngineError(f"worker {worker.id}: no engine known for pool {worker.pool!r}")
        return engine

    def _keep_alive_s(self, pool: PoolSpec | None) -> float | None:
        """Ollama keeps a model loaded at least as long as gpufleet counts the worker warm."""
        if pool is None or pool.engine is not Engine.ollama:
            return None
        return pool.idle_timeout_ceiling_s + self.settings.proxy.keep_alive_margin_s

    # -- wake-ups and cancels ------------------------------------------------------------

    def _ensure_listener(self) -> None:
        self._subscriber.start()

    async def listening(self, timeout_s: float = 5.0) -> None:
        """Wait until the wake/cancel subscription is live (tests)."""
        await self._subscriber.listening(timeout_s)

    def _on_message(self, channel: str, data: str) -> None:
        """``P:wake`` sets ``wake``; ``P:cancel`` stops the named run at once."""
        if channel == self.queue.keys.cancel_channel():
            run = self._runs.get(data)
            if run is not None:
                logger.info("task %s cancelled; stopping it on %s", data, run.worker.id)
                self._stop_run(run, CANCELLED)
        else:
            self.wake.set()

    # -- shutdown ------------------------------------------------------------------------

    async def aclose(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop taking work; stop every run and hand its lease back (attempt refunded)."""
        self._closing = True
        # The subscription is woken through its stop channel; cancelling a read in flight
        # instead can hang (redis-py 8.1), so that is only the last resort.
        await self._subscriber.aclose(grace_s)
        runs = list(self._runs.values())
        for run in runs:
            self._stop_run(run, SHUTDOWN)
        tasks = [r.task for r in runs if r.task is not None]
        if tasks:
            logger.info("dispatcher: handing back %d running task(s)", len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        handbacks = [r.handback for r in runs if r.handback is not None]
        await asyncio.gather(*handbacks, return_exceptions=True)


def _model_names(worker: Worker) -> list[str]:
    """The names a task may use for the worker's models (``x`` and ``x:latest`` alike)."""
    names: set[str] = set()
    for model in (*worker.models_present, *worker.models_loaded):
        full = normalize_model(model)
        names.add(full)
        names.add(model)
        if full.endswith(":latest"):
            names.add(full.removesuffix(":latest"))
    return sorted(names)


def _warm_since(workers: list[Worker]) -> dict[str, float]:
    out: dict[str, float] = {}
    for w in workers:
        if w.state is WorkerState.ready and w.ready_since is not None:
            out[w.pool] = min(out.get(w.pool, w.ready_since), w.ready_since)
    return out
