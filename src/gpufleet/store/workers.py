"""The worker registry in Redis, and the slot accounting the dispatcher and proxy share.

Per worker: a hash with its record, and a sorted set of slot holders scored by
their lease deadline. A slot is taken by adding a holder token only if the
worker is ``ready`` and fewer than ``slots`` live holders exist — one Lua script,
so one slot is never given twice, across processes and replicas. A holder that
dies without releasing simply stops renewing; its slot frees itself when its
deadline passes (the next acquire or count purges expired holders).

State changes are compare-and-set against the transition table in
``gpufleet.domain``: ``transition()`` says whether it happened, so two replicas
that race to move a worker cannot both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from gpufleet.domain import WORKER_TRANSITIONS, Worker, WorkerState
from gpufleet.store import scripts
from gpufleet.store.keys import Keys
from gpufleet.store.resp import RespClient
from gpufleet.worker_auth import WorkerTokens

logger = logging.getLogger(__name__)

_LIST_FIELDS = ("models_present", "models_loaded")


def allowed_sources(new: WorkerState) -> list[str]:
    """Every state from which ``new`` may be entered (``failed`` from any live state)."""
    if new is WorkerState.failed:
        return [s.value for s in WorkerState if s is not WorkerState.deleted]
    return [old.value for old, targets in WORKER_TRANSITIONS.items() if new in targets]


def _to_worker(
    data: dict[str, str], busy: int, pool_tokens: Mapping[str, str] | None = None
) -> Worker:
    def num(name: str, default: float = 0.0) -> float:
        raw = data.get(name)
        return float(raw) if raw not in (None, "") else default

    def opt(name: str) -> float | None:
        raw = data.get(name)
        return float(raw) if raw not in (None, "") else None

    return Worker(
        id=data["id"],
        pool=data["pool"],
        provider=data.get("provider", ""),
        state=WorkerState(data["state"]),
        slots=int(data.get("slots", "1")),
        busy_slots=busy,
        instance_id=data.get("instance_id", ""),
        instance_name=data.get("instance_name", ""),
        base_url=data.get("base_url", ""),
        engine=data.get("engine", ""),
        models_present=tuple(json.loads(data.get("models_present") or "[]")),
        models_loaded=tuple(json.loads(data.get("models_loaded") or "[]")),
        created_at=num("created_at"),
        state_since=num("state_since"),
        ready_since=opt("ready_since"),
        last_busy_at=opt("last_busy_at"),
        health_failures=int(num("health_failures")),
        price_per_hour=num("price_per_hour"),
        cost_usd=num("cost_usd"),
        last_error=data.get("last_error", ""),
        token=data.get("worker_token") or (pool_tokens or {}).get(data["pool"], ""),
    )


class WorkerRegistry:
    """Workers and their slots, shared by every replica through Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "gpufleet",
        slot_ttl_s: float = 15.0,
        clock: Callable[[], float] = time.time,
        pool_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.slot_ttl_s = slot_ttl_s
        self.clock = clock
        # Pool name -> the fixed worker secret config gives (static/SURF ``token``); a
        # worker's own ``worker_token`` field wins. ``tokens`` maps each loaded worker's
        # base_url to its secret, for ``gpufleet.worker_auth.WorkerAuth``.
        self.pool_tokens = dict(pool_tokens or {})
        self.tokens = WorkerTokens()
        self._acquire = scripts.register(redis, "worker_acquire")
        self._release = scripts.register(redis, "worker_release")
        self._renew = scripts.register(redis, "worker_renew")
        self._transition = scripts.register(redis, "worker_transition")
        self._add_cost = scripts.register(redis, "add_cost")

    def __repr__(self) -> str:
        return f"<WorkerRegistry prefix={self.prefix}>"

    # -- records -------------------------------------------------------------------------

    async def register(
        self,
        *,
        pool: str,
        provider: str,
        slots: int,
        state: WorkerState = WorkerState.provisioning,
        worker_id: str | None = None,
        **fields: Any,
    ) -> Worker:
        """Write a new worker record (before any provider call, so a retry finds it)."""
        now = self.clock()
        worker_id = worker_id or f"{pool}-{uuid.uuid4().hex[:8]}"
        record: dict[str, Any] = {
            "id": worker_id, "pool": pool, "provider": provider, "slots": slots,
            "state": state.value, "created_at": now, "state_since": now,
        }
        if state is WorkerState.ready:
            record.update(ready_since=now, last_busy_at=now)
        for name, value in fields.items():
            record[name] = json.dumps(list(value)) if name in _LIST_FIELDS else value
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.worker(worker_id), mapping=cast(Any, record))
            pipe.sadd(self.keys.workers(), worker_id)
            pipe.sadd(self.keys.pool_workers(pool), worker_id)
            await pipe.execute()
        logger.info("worker %s registered in pool %s (%s)", worker_id, pool, state)
        return await self.get(worker_id)

    async def get(self, worker_id: str) -> Worker:
        data = cast(dict[str, str], await self.redis.hgetall(self.keys.worker(worker_id)))
        if not data:
            raise KeyError(worker_id)
        return self._noted(_to_worker(data, await self.busy(worker_id), self.pool_tokens))

    def _noted(self, worker: Worker) -> Worker:
        """Remember which secret the worker's URL needs (see ``gpufleet.worker_auth``)."""
        if worker.base_url:
            self.tokens.set(worker.base_url, worker.token)
        return worker

    async def find(self, worker_id: str) -> Worker | None:
        try:
            return await self.get(worker_id)
        except KeyError:
            return None

    async def list_workers(self, pool: str | None = None) -> list[Worker]:
        """All workers (or one pool's), skipping (and logging) records that do not parse."""
        key = self.keys.pool_workers(pool) if pool else self.keys.workers()
        ids = sorted(cast(set[str], await self.redis.smembers(key)))
        return await self._load(ids)

    async def _load(self, ids: Iterable[str]) -> list[Worker]:
        ids = list(ids)
        now = self.clock()
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(self.keys.worker(worker_id))
                pipe.zcount(self.keys.worker_slots(worker_id), f"({now}", "+inf")
            results = await pipe.execute()
        workers = []
        for worker_id, data, busy in zip(ids, results[::2], results[1::2], strict=True):
            if not data:
                continue
            try:
                workers.append(self._noted(_to_worker(data, int(busy), self.pool_tokens)))
            except (KeyError, ValueError) as exc:
                logger.warning("worker %s: skipping unreadable record (%s)", worker_id, exc)
        return workers

    async def update(self, worker_id: str, **fields: Any) -> None:
        """Set plain fields (base_url, models, instance id, cost …) of an existing worker."""
        key = self.keys.worker(worker_id)
        mapping = {
            name: json.dumps(list(value)) if name in _LIST_FIELDS else value
            for name, value in fields.items()
        }
        if not await self.redis.exists(key):
            raise KeyError(worker_id)
        await self.redis.hset(key, mapping=cast(Any, mapping))

    async def transition(self, worker_id: str, new: WorkerState, reason: str = "") -> bool:
        """Move a worker to ``new`` if the table allows it from its current state."""
        old = await self._transition(
            keys=[self.keys.worker(worker_id)],
            args=[new.value, self.clock(), reason, *allowed_sources(new)],
        )
        if old is None:
            return False
        logger.info("worker %s %s -> %s (%s)", worker_id, old, new.value, reason or "-")
        return True

    async def record_health(self, worker_id: str, ok: bool) -> int:
        """Count consecutive health failures; return the new count (0 after a success)."""
        key = self.keys.worker(worker_id)
        if ok:
            await self.redis.hset(key, "health_failures", 0)
            return 0
        return int(await self.redis.hincrby(key, "health_failures", 1))

    async def add_costs(self, usd_by_worker: Mapping[str, float]) -> None:
        """Add spend to each worker's ``cost_usd`` in one round trip (``lua/add_cost.lua``).

        A worker whose record is gone meanwhile is skipped, not re-created."""
        if not usd_by_worker:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id, usd in usd_by_worker.items():
                await self._add_cost(
                    keys=[self.keys.worker(worker_id)], args=[usd], client=pipe
                )
            await pipe.execute()

    async def remove(self, worker_id: str) -> None:
        """Forget a worker whose instance is gone (deleted)."""
        data = cast(dict[str, str], await self.redis.hgetall(self.keys.worker(worker_id)))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.worker(worker_id))
            pipe.delete(self.keys.worker_slots(worker_id))
            pipe.srem(self.keys.workers(), worker_id)
            if data.get("pool"):
                pipe.srem(self.keys.pool_workers(data["pool"]), worker_id)
            await pipe.execute()
        logger.info("worker %s removed from the registry", worker_id)

    # -- slots ---------------------------------------------------------------------------

    async def acquire_slot(self, worker_id: str, holder: str | None = None) -> str | None:
        """Take one slot of a ready worker; return the holder token, or None if full."""
        token = holder or uuid.uuid4().hex
        now = self.clock()
        taken = await self._acquire(
            keys=[self.keys.worker(worker_id), self.keys.worker_slots(worker_id)],
            args=[now, now + self.slot_ttl_s, token],
        )
        return token if taken else None

    async def renew_slot(self, worker_id: str, token: str) -> bool:
        """Push a held slot's deadline out; False if it had already expired."""
        deadline = self.clock() + self.slot_ttl_s
        changed = await self.redis.zadd(
            self.keys.worker_slots(worker_id), {token: deadline}, xx=True, ch=True
        )
        return bool(changed)

    async def renew_held(self, held: Mapping[str, Sequence[str]]) -> int:
        """Push the deadlines of held slots (worker id -> tokens) out by the slot TTL, and
        mark each worker busy now (``worker_renew.lua``), in one pipeline. Written to the
        AOF: the proxy's holds are not, so this is what says, after a Redis restart, that a
        worker serving long requests was busy until the last renewal. Returns how many
        slots were still held."""
        if not held:
            return 0
        now = self.clock()
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id, tokens in held.items():
                await self._renew(
                    keys=[self.keys.worker(worker_id), self.keys.worker_slots(worker_id)],
                    args=[now, now + self.slot_ttl_s, *tokens],
                    client=pipe,
                )
            results = await pipe.execute()
        return sum(int(r) for r in results)

    async def release_slot(self, worker_id: str, token: str) -> bool:
        released = await self._release(
            keys=[self.keys.worker(worker_id), self.keys.worker_slots(worker_id)],
            args=[self.clock(), token],
        )
        return bool(released)

    async def busy(self, worker_id: str) -> int:
        """Slots held now (expired holders do not count)."""
        return int(
            await self.redis.zcount(
                self.keys.worker_slots(worker_id), f"({self.clock()}", "+inf"
            )
        )


# A replica writes one proxied release per worker this often to the AOF (``SlotBatcher``).
BUSY_WRITTEN_EVERY_S = 5.0


class SlotBatcher:
    """``acquire_slot`` / ``release_slot`` for many concurrent callers, sent together.

    Each operation is still the registry's Lua script, atomic on its own, so a slot is
    never given twice; what changes is the transport: every operation asked for while
    one pipeline is in flight goes out in the next one (``EVALSHA`` … in one round
    trip, no MULTI). Under load that replaces N pool checkouts and round trips with
    one; alone, an operation waits for nothing (its pipeline starts at the next loop
    turn). An acquire whose caller was cancelled meanwhile releases the slot it got.

    Consumer: ``gpufleet.proxy.waiting.SlotBroker`` (one slot per proxied request).
    """

    def __init__(
        self, registry: WorkerRegistry, *, lean: bool = True, ephemeral: bool = True
    ) -> None:
        self.registry = registry
        # Proxied requests' holds are ephemeral (``worker_acquire.lua``): not in the AOF, so
        # ``appendfsync always`` does not fsync twice per proxied request.
        self.ephemeral = ephemeral
        # Worker id -> when (registry clock) this replica last wrote a release to the AOF.
        self._busy_written: dict[str, float] = {}
        # The scripts go over one lean pipelined connection when Redis is a plain TCP or
        # unix server (``store.resp``: ~11 µs of CPU a call instead of redis-py's ~85).
        self._resp = RespClient.for_client(registry.redis) if lean else None
        self._pending: list[tuple[bool, str, str, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<SlotBatcher pending={len(self._pending)}>"

    def _release_flag(self, worker_id: str, now: float) -> str:
        """``'1'`` (ephemeral: not written) for most releases; ``'0'`` for the first release
        of a worker each ``BUSY_WRITTEN_EVERY_S``, so its ``last_busy_at`` on disk (what
        idle scale-down reads after a Redis restart) is at most that old: one fsync per
        worker per interval, not one per request."""
        if not self.ephemeral:
            return "0"
        if now - self._busy_written.get(worker_id, -1e18) < BUSY_WRITTEN_EVERY_S:
            return "1"
        if len(self._busy_written) > 10_000:  # workers come and go: forget the old ones
            self._busy_written.clear()
        self._busy_written[worker_id] = now
        return "0"

    async def acquire(self, worker_id: str) -> str | None:
        """Like ``WorkerRegistry.acquire_slot``: the holder token, or None if full."""
        token = uuid.uuid4().hex
        return token if await self._submit(True, worker_id, token) else None

    async def release(self, worker_id: str, token: str) -> bool:
        return await self.release_soon(worker_id, token)

    def release_now(self, worker_id: str, token: str) -> None:
        """Release without a reply: on the lean connection, at the end of this turn of the
        event loop (with the turn's other releases, in one write; ahead of any acquire sent
        later), with ``CLIENT REPLY SKIP`` (no wake-up for the answer), as ``EVAL`` of the
        script's text (no ``NOSCRIPT`` to miss). When that connection is not up (or Redis
        is not a plain server), it goes in the next pipeline like ``release_soon``. A
        release lost with a broken connection frees its slot at the slot's deadline."""
        if self._resp is not None:
            reg = self.registry
            script = reg._release.script
            assert isinstance(script, str | bytes)
            keys_ = [reg.keys.worker(worker_id), reg.keys.worker_slots(worker_id)]
            now = reg.clock()
            flag = self._release_flag(worker_id, now)
            command = ("EVAL", script, 2, *keys_, now, token, flag)
            if self._resp.send_quiet(command):
                return
        self.release_soon(worker_id, token)

    def release_soon(self, worker_id: str, token: str) -> asyncio.Future[bool]:
        """Queue a release for the next pipeline; the future says whether it held a slot.
        A caller that never awaits it loses nothing: its failure is logged, not raised."""
        future = self._submit(False, worker_id, token)
        future.add_done_callback(_retrieve)
        return future

    def _submit(self, acquire: bool, worker_id: str, token: str) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((acquire, worker_id, token, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="slot-batcher")
        return future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self._run(batch)
            except BaseException as exc:
                for *_, future in batch:
                    if future.done():
                        continue
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
                if not isinstance(exc, Exception):
                    raise
                continue
            for (acquire, worker_id, token, future), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    if not future.done():
                        future.set_exception(result)
                elif not future.done():
                    future.set_result(bool(result))
                elif acquire and result:  # the caller left while its slot was being taken
                    orphan = asyncio.get_running_loop().create_future()
                    orphan.add_done_callback(_retrieve)
                    self._pending.append((False, worker_id, token, orphan))

    async def aclose(self, grace_s: float = 1.0) -> None:
        """Let the operations asked for go out (up to ``grace_s``), then stop the flusher;
        callers still waiting get ``CancelledError`` (their slots expire by deadline)."""
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher], timeout=grace_s)
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for *_, future in self._pending:
            future.cancel()
        self._pending = []
        if self._resp is not None:
            await self._resp.aclose()

    async def _run(self, batch: list[tuple[bool, str, str, asyncio.Future[bool]]]) -> list[Any]:
        reg = self.registry
        now = reg.clock()
        calls: list[tuple[Any, list[str], list[str | float]]] = []
        for acquire, worker_id, token, _ in batch:
            keys_ = [reg.keys.worker(worker_id), reg.keys.worker_slots(worker_id)]
            if acquire:
                flag = "1" if self.ephemeral else "0"
                calls.append((reg._acquire, keys_, [now, now + reg.slot_ttl_s, token, flag]))
            else:
                flag = self._release_flag(worker_id, now)
                calls.append((reg._release, keys_, [now, token, flag]))
        results: list[Any]
        if self._resp is not None:
            results = await self._resp.execute_many(
                [("EVALSHA", script.sha, len(k), *k, *args) for script, k, args in calls]
            )
        else:
            async with reg.redis.pipeline(transaction=False) as pipe:
                for script, keys_, args in calls:
                    pipe.evalsha(script.sha, len(keys_), *keys_, *args)
                results = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if isinstance(result, NoScriptError):  # Redis restarted: load and run it alone
                script, keys_, args = calls[i]
                results[i] = await script(keys=keys_, args=args)
        return results


def _retrieve(future: asyncio.Future[bool]) -> None:
    """Mark an unwatched release's outcome as seen (a failure only delays the slot's
    return to its deadline)."""
    if not future.cancelled() and future.exception() is not None:
        logger.warning("slot release failed (%s); it frees itself at its deadline",
                       future.exception())
