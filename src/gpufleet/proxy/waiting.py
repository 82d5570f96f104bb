"""Slots for proxied requests: take one at once, or wait for one in a bounded queue.

A proxied request holds one slot of one worker — the same atomic accounting
(the registry's acquire / release Lua scripts) the dispatcher uses for queued tasks,
so both share a worker's capacity. The calls go through a ``SlotBatcher``: the
scripts of concurrent requests share one pipelined round trip.

Fast path: if nobody waits for the same pools on this replica, the candidates
``gpufleet.routing.pick_worker`` orders (from a worker list cached for at most
``worker_cache_ttl_s``) are tried in turn; the first slot Redis gives wins.

Otherwise the request waits in this replica's queue, ordered by priority, then a
per-key round (a key's n-th waiting request is in round n, so one busy key cannot
starve the others), then arrival. While anyone waits, one pump task re-reads the
registry every ``poll_interval_s`` (≤ 100 ms) — it does **not** subscribe to a
``{prefix}:slots`` channel, because nothing publishes there yet — and is also woken
at once when a request on this replica releases its slot. A waiting request is
demand: it sits in the ZSET ``{prefix}:proxy:waiting:{pool}`` (member = request id,
score = its deadline, epoch seconds; removed when served or abandoned; a replica
that dies leaves entries the reconciler must ignore once their score is past) and
``PUBLISH {prefix}:wake <pool>`` tells the reconciler on any replica to look now.

Parked slots (``[proxy] slot_park_s``, 0.05 s by default): when an answer ends and nobody
waits on this replica, its slot stays held in Redis for that long, free for this replica's
next request to the same worker, which takes it with no round trip; one nobody takes is given
back by a timer. A request that must wait gives every parked slot back first (and waits for
Redis to have them), so the pump reads true counts. Failures and client disconnects never
park. Other replicas see a parked slot as busy for at most ``slot_park_s``.

Held slots are renewed in one pipeline every third of the registry's slot TTL by
a keeper task, so a long stream keeps its slot and a crashed replica's slots free
themselves.

Pool history (``store.history``), counted in memory, written by the history flush loop: one
arrival per request, for the pool that served it at once or the one it waits for (a retry
on another worker is not a new arrival), and, once a worker answered, the time the slot was
held as a service sample when it is released.

Consumers: ``gpufleet.proxy.relay`` (``acquire``/``release`` around each upstream call).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from gpufleet.domain import LIVE_WORKER_STATES, Worker, WorkerState
from gpufleet.proxy.config import ProxySettings
from gpufleet.routing import pick_worker, pools_serving
from gpufleet.settings import PoolSpec
from gpufleet.store.history import HistoryStore
from gpufleet.store.keys import Keys
from gpufleet.store.workers import SlotBatcher, WorkerRegistry

logger = logging.getLogger(__name__)

# At most this many slot attempts on the fast path before the request queues: beyond
# that the cached list is stale enough that the pump's fresh read is the better bet.
_FAST_PATH_ATTEMPTS = 8
_SERVING_MEMO = 1024


class ModelNotServed(Exception):
    """No configured pool serves the model (the proxy answers 404)."""


class QueueFull(Exception):
    """The waiting queue (of the pool, or of the key) is full (503 / 429 at once)."""

    def __init__(self, message: str, *, per_key: bool, retry_after_s: int) -> None:
        super().__init__(message)
        self.per_key = per_key
        self.retry_after_s = retry_after_s


class WaitTimeout(Exception):
    """No slot within the pool's ``max_wait_s`` (503 + Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def waiting_key(prefix: str, pool: str) -> str:
    """ZSET of waiting proxy requests of one pool: request id -> deadline (epoch s)."""
    return Keys(prefix).proxy_waiting(pool)


def wake_channel(prefix: str) -> str:
    """Pub/sub channel; the message is a pool name whose demand just grew."""
    return Keys(prefix).wake()


@dataclass
class Lease:
    """One held slot."""

    worker: Worker
    token: str
    waited_s: float = 0.0
    cold_start: bool = False
    held_since: float = 0.0  # when the slot was taken (epoch s): service time for history
    model: str = ""
    # The worker answered (bytes went to the client): the slot's hold time is a service
    # sample, recorded when the slot is released, whatever ends the request (the end of the
    # answer, a mid-stream failure, the client leaving).
    answered: bool = False
    released: bool = False  # given back (or parked): a second release does nothing

    def __repr__(self) -> str:
        return f"<Lease {self.worker.id} waited={self.waited_s:.3f}s cold={self.cold_start}>"


@dataclass(eq=False)
class _Waiter:
    id: str
    model: str
    pools: frozenset[str]
    demand_pool: str
    key: str
    priority: int
    round: int
    seq: int
    deadline: float
    exclude: frozenset[str]
    cold: bool
    since: float
    future: asyncio.Future[Lease] = field(repr=False)

    @property
    def order(self) -> tuple[int, int, int]:
        return (-self.priority, self.round, self.seq)


class SlotBroker:
    """Gives proxied requests slots; owns the waiting queue, the pump and the keeper."""

    def __init__(
        self,
        registry: WorkerRegistry,
        redis: aioredis.Redis,
        pools: Sequence[PoolSpec],
        settings: ProxySettings,
        *,
        clock: Callable[[], float] = time.time,
        history: HistoryStore | None = None,
    ) -> None:
        self.registry = registry
        # Arrivals per pool, buffered in memory (flushed by the history loop): no round trip.
        self.history = history
        self.slots = SlotBatcher(registry)
        self.redis = redis
        self.pools = {p.name: p for p in pools}
        self.settings = settings
        self.clock = clock
        self.prefix = registry.prefix
        self._cache: list[Worker] = []
        self._cache_at = -1e18
        self._refresh: asyncio.Future[list[Worker]] | None = None
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._held: dict[str, str] = {}  # token -> worker id
        self._keeper: asyncio.Task[None] | None = None
        # Parked slots (``release_now``): worker id -> [(token, parked at, loop time)], held
        # in Redis (and renewed) but free for this replica's next request to that worker.
        self._parked: dict[str, list[tuple[str, float]]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._serving_memo: dict[str, tuple[tuple[PoolSpec, ...], frozenset[str]]] = {}
        self._picked_from: Sequence[Worker] | None = None
        self._picked: dict[tuple[str, frozenset[str]], list[Worker]] = {}

    def __repr__(self) -> str:
        parked = sum(len(tokens) for tokens in self._parked.values())
        return f"<SlotBroker waiting={len(self._waiters)} held={len(self._held)} parked={parked}>"

    # -- workers -------------------------------------------------------------------------

    async def workers(self, *, fresh: bool = False) -> list[Worker]:
        """The registry's workers, reused for ``worker_cache_ttl_s`` unless ``fresh``."""
        loop = asyncio.get_running_loop()
        if not fresh and loop.time() - self._cache_at <= self.settings.worker_cache_ttl_s:
            return self._cache
        if self._refresh is not None:  # one read in flight serves every caller
            return await asyncio.shield(self._refresh)
        self._refresh = loop.create_future()
        try:
            workers = await self.registry.list_workers()
        except BaseException as exc:
            self._refresh.set_exception(exc)
            self._refresh.exception()  # retrieved: no "never retrieved" warning
            raise
        else:
            self._refresh.set_result(workers)
            self._cache, self._cache_at = workers, loop.time()
            return workers
        finally:
            self._refresh = None

    def max_wait_s(self, pool: PoolSpec) -> float:
        own = getattr(pool, "max_wait_s", None)
        return float(own) if own else self.settings.max_wait_s

    # -- acquire / release ---------------------------------------------------------------

    async def acquire(
        self,
        model: str,
        *,
        key: str = "anonymous",
        priority: int = 0,
        exclude: Iterable[str] = (),
        request_id: str | None = None,
    ) -> Lease:
        """A slot on the best worker for ``model``, waiting for one if need be."""
        serving, names = self._serving(model)
        if not serving:
            raise ModelNotServed(model)
        skip = frozenset(exclude)
        if not any(w.pools & names for w in self._waiters):
            lease = await self._try(model, await self.workers(), skip, fast=True)
            if lease is not None:
                self._arrived(lease.worker.pool, skip)
                return lease
        return await self._wait(model, serving, key, priority, skip, request_id)

    def _serving(self, model: str) -> tuple[tuple[PoolSpec, ...], frozenset[str]]:
        """The pools that serve ``model`` and their names, remembered per model (the pools
        are this broker's for its life; at most ``_SERVING_MEMO`` models, then forgotten)."""
        found = self._serving_memo.get(model)
        if found is None:
            serving = tuple(pools_serving(model, self.pools.values()))
            found = (serving, frozenset(p.name for p in serving))
            if len(self._serving_memo) >= _SERVING_MEMO:
                self._serving_memo.clear()
            self._serving_memo[model] = found
        return found

    def _candidates(
        self, model: str, workers: Sequence[Worker], exclude: frozenset[str]
    ) -> list[Worker]:
        """``pick_worker``'s order, remembered while ``workers`` is the same (cached, frozen)
        list: between two registry reads every request for a model gets the same answer."""
        if workers is not self._picked_from:
            self._picked_from, self._picked = workers, {}
        found = self._picked.get((model, exclude))
        if found is None:
            if len(self._picked) >= _SERVING_MEMO:
                self._picked.clear()
            found = pick_worker(model, workers, self.pools, exclude=exclude)
            self._picked[(model, exclude)] = found
        return found

    def _arrived(self, pool: str, exclude: frozenset[str]) -> None:
        """Count a request's arrival once: for the pool that served it at once, or the one
        whose demand it waits as. A retry (``exclude`` names the failed workers) is not a
        new arrival."""
        if self.history is not None and not exclude:
            self.history.note_arrival(pool)

    async def _try(
        self,
        model: str,
        workers: Sequence[Worker],
        exclude: frozenset[str],
        *,
        fast: bool,
        free: dict[str, int] | None = None,
    ) -> Lease | None:
        candidates = self._candidates(model, workers, exclude)
        if self._parked:
            for worker in candidates:
                token = self._unpark(worker.id)
                if token is not None:  # held already: no round trip
                    return Lease(worker, token, held_since=self.clock(), model=model)
        attempts = 0
        for worker in candidates:
            if free is not None and free.get(worker.id, 0) <= 0:
                continue
            if fast and attempts >= _FAST_PATH_ATTEMPTS:
                break
            attempts += 1
            token = await self.slots.acquire(worker.id)
            if token is not None:
                self._hold(token, worker.id)
                if free is not None:
                    free[worker.id] -= 1
                return Lease(worker, token, held_since=self.clock(), model=model)
            if free is not None:
                free[worker.id] = 0
        return None

    async def release(self, lease: Lease) -> None:
        """Give the slot back (idempotent), wait until Redis has it, and let a waiter on this
        replica have it. A failure is logged: the slot frees itself at its deadline."""
        if self._let_go(lease):
            with contextlib.suppress(Exception):  # logged by the batcher
                await self.slots.release_soon(lease.worker.id, lease.token)

    def release_now(self, lease: Lease) -> None:
        """The end of an answer: nothing waits for Redis (idempotent). The slot is parked
        for this replica's next request to the worker (``[proxy] slot_park_s``) while
        nobody waits here; otherwise, or when parking is off, its release goes out at the
        end of this loop turn, ahead of any acquire this replica sends later
        (``SlotBatcher.release_now``)."""
        park_s = self.settings.slot_park_s
        if park_s > 0 and not self._waiters and self._let_go(lease, keep=True):
            self._parked.setdefault(lease.worker.id, []).append(
                (lease.token, asyncio.get_running_loop().time())
            )
            if self._sweep is None:
                self._sweep = asyncio.get_running_loop().call_later(park_s, self._sweep_parked)
            return
        if self._let_go(lease):
            self.slots.release_now(lease.worker.id, lease.token)

    def _unpark(self, worker_id: str) -> str | None:
        """A parked slot of ``worker_id`` (the most recently parked), or None."""
        tokens = self._parked.get(worker_id)
        if not tokens:
            return None
        token, _ = tokens.pop()
        if not tokens:
            del self._parked[worker_id]
        return token

    def _sweep_parked(self) -> None:
        """Give back the slots parked for ``slot_park_s`` that nobody took."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now, park_s = loop.time(), self.settings.slot_park_s
        soonest = None
        for worker_id in list(self._parked):
            kept = []
            for token, since in self._parked[worker_id]:
                if now - since >= park_s:
                    self._give_back(worker_id, token)
                else:
                    kept.append((token, since))
                    soonest = since if soonest is None else min(soonest, since)
            if kept:
                self._parked[worker_id] = kept
            else:
                del self._parked[worker_id]
        if soonest is not None:
            self._sweep = loop.call_later(soonest + park_s - now, self._sweep_parked)

    def _give_back(self, worker_id: str, token: str) -> None:
        if self._held.pop(token, None) is not None:
            self.slots.release_now(worker_id, token)

    async def unpark_all(self) -> None:
        """Give every parked slot back and wait until Redis has them (a request is about to
        wait on this replica: the registry's counts must be true)."""
        parked, self._parked = self._parked, {}
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        releases = [
            self.slots.release_soon(worker_id, token)
            for worker_id, tokens in parked.items()
            for token, _ in tokens
            if self._held.pop(token, None) is not None
        ]
        if releases:
            await asyncio.gather(*releases, return_exceptions=True)

    def _let_go(self, lease: Lease, *, keep: bool = False) -> bool:
        """The bookkeeping of a release; False if the lease was already given back.
        ``keep``: the token stays held (parked), so the keeper goes on renewing it."""
        if lease.released:
            return False
        lease.released = True
        if keep:
            if lease.token not in self._held:
                return False
        elif self._held.pop(lease.token, None) is None:
            return False
        if lease.answered and self.history is not None:  # buffered: no I/O here
            held_s = max(0.0, self.clock() - lease.held_since)
            self.history.note_service(lease.worker.pool, held_s, lease.model or None)
        if self._waiters:
            self._wake.set()
        return True

    # -- waiting -------------------------------------------------------------------------

    def _demand_pool(self, serving: Sequence[PoolSpec], workers: Sequence[Worker]) -> PoolSpec:
        """The pool whose demand a waiting request counts as: one that already has live
        workers (they will be ready soonest), else the cheapest, else the first configured."""
        live = {w.pool for w in workers if w.state in LIVE_WORKER_STATES}
        ranked = sorted(
            enumerate(serving),
            key=lambda item: (item[1].name not in live, item[1].price_per_hour or 0.0, item[0]),
        )
        return ranked[0][1]

    async def _wait(
        self,
        model: str,
        serving: Sequence[PoolSpec],
        key: str,
        priority: int,
        exclude: frozenset[str],
        request_id: str | None,
    ) -> Lease:
        if self._parked:
            await self.unpark_all()
        workers = await self.workers(fresh=True)
        names = frozenset(p.name for p in serving)
        lease = None
        if not any(w.pools & names for w in self._waiters):
            lease = await self._try(model, workers, exclude, fast=False, free=_free(workers))
        if lease is not None:
            self._arrived(lease.worker.pool, exclude)
            return lease
        pool = self._demand_pool(serving, workers)
        self._check_bounds(pool, key)
        now = self.clock()
        waiter = _Waiter(
            id=request_id or uuid.uuid4().hex,
            model=model,
            pools=names,
            demand_pool=pool.name,
            key=key,
            priority=priority,
            round=sum(1 for w in self._waiters if w.key == key),
            seq=next(self._seq),
            deadline=now + self.max_wait_s(pool),
            exclude=exclude,
            cold=not any(w.pool in names and w.state is WorkerState.ready for w in workers),
            since=now,
            future=asyncio.get_running_loop().create_future(),
        )
        self._waiters.append(waiter)
        self._arrived(pool.name, exclude)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(waiting_key(self.prefix, pool.name), {waiter.id: waiter.deadline})
                pipe.publish(wake_channel(self.prefix), pool.name)
                await pipe.execute()
            logger.info(
                "request %s waits for %s in pool %s (%s, %d waiting)",
                waiter.id,
                model,
                pool.name,
                "cold" if waiter.cold else "busy",
                len(self._waiters),
            )
            if self._pump is None or self._pump.done():
                self._pump = asyncio.create_task(self._run_pump(), name="proxy-slot-pump")
            return await waiter.future
        except BaseException:
            if (
                waiter.future.done()
                and not waiter.future.cancelled()
                and (waiter.future.exception() is None)
            ):
                await self.release(waiter.future.result())
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            waiter.future.cancel()
            with contextlib.suppress(Exception):
                await self.redis.zrem(waiting_key(self.prefix, waiter.demand_pool), waiter.id)

    def _check_bounds(self, pool: PoolSpec, key: str) -> None:
        retry = self.settings.retry_after_s
        if sum(1 for w in self._waiters if w.demand_pool == pool.name) >= self.settings.max_waiting:
            raise QueueFull(
                "server busy, please try again.  maximum pending requests exceeded",
                per_key=False,
                retry_after_s=retry,
            )
        if sum(1 for w in self._waiters if w.key == key) >= self.settings.max_waiting_per_key:
            raise QueueFull(
                "too many waiting requests for this API key", per_key=True, retry_after_s=retry
            )

    async def _run_pump(self) -> None:
        """Hand free slots to waiters, best first, until nobody waits."""
        while self._waiters:
            self._wake.clear()
            try:
                await self._pump_once()
            except Exception:
                logger.exception("proxy slot pump: tick failed; trying again")
            if not self._waiters:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval_s):
                    await self._wake.wait()

    async def _pump_once(self) -> None:
        if self._parked:
            await self.unpark_all()
        workers = await self.workers(fresh=True)
        free = _free(workers)
        now = self.clock()
        for waiter in sorted(self._waiters, key=lambda w: w.order):
            if waiter.future.done():
                continue
            if now >= waiter.deadline:
                waiter.future.set_exception(
                    WaitTimeout(
                        f"no worker for model {waiter.model!r} became free within "
                        f"{waiter.deadline - waiter.since:.0f} s",
                        retry_after_s=self.settings.retry_after_s,
                    )
                )
                continue
            if not any(free.values()):
                continue
            lease = await self._try(waiter.model, workers, waiter.exclude, fast=False, free=free)
            if lease is None:
                continue
            if waiter.future.done():  # abandoned while we were taking the slot
                await self.release(lease)
                continue
            lease.waited_s = max(0.0, self.clock() - waiter.since)
            lease.cold_start = waiter.cold
            waiter.future.set_result(lease)

    # -- keeping held slots --------------------------------------------------------------

    def _hold(self, token: str, worker_id: str) -> None:
        self._held[token] = worker_id
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(), name="proxy-slot-keeper")

    async def _keep(self) -> None:
        """Renew every held slot each third of the slot TTL (and mark its worker busy, on
        disk: ``WorkerRegistry.renew_held``); stop after an idle interval."""
        interval = self.registry.slot_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            if not self._held:
                return
            held: dict[str, list[str]] = {}
            for token, worker_id in self._held.items():
                held.setdefault(worker_id, []).append(token)
            try:
                await self.registry.renew_held(held)
            except Exception as exc:
                logger.warning("proxy: renewing %d held slots failed (%s)", len(self._held), exc)

    async def aclose(self) -> None:
        """Stop the pump and the keeper (the lifespan calls this on shutdown)."""
        for task in (self._pump, self._keeper):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(
                    WaitTimeout("gpufleet is shutting down", retry_after_s=1)
                )
        with contextlib.suppress(Exception):  # logged by the batcher; deadlines free them
            await self.unpark_all()
        await self.slots.aclose()


def _free(workers: Iterable[Worker]) -> dict[str, int]:
    return {w.id: w.free_slots if w.takes_new_work else 0 for w in workers}
