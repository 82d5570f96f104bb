"""The reconciler: observe the fleet, ask ``policy.plan``, apply what it says. Leader only.

This module only orchestrates (kopf's ``processing.py`` shape); each job has its own room:

- ``scaling/observe.py`` builds the ``Snapshot``: provider listing (with its backoff), intent
  recovery, registry sync, pool state, demand (``store/demand.py``), history;
- ``policy.plan(snapshot)`` decides, pure;
- ``scaling/apply.py`` applies each action kind, every mutation fenced by ``Fence``;
- ``scaling/accounting.py`` bills spend and times boots;
- ``scaling/outcomes.py`` turns each outcome into an event, a log line and a metric, and sets
  the fleet gauges.

One tick (``reconcile_once``):

1. **Lead.** Take or renew the Redis lease lock (``store.leader.LeaderLock``). A replica that
   does not hold it does nothing else. Every mutation below (provider call or registry write)
   is preceded by a fencing check of the token, so a leader that was paused past its lease
   has its actions refused instead of racing the new leader.
2. **Observe** (``Observer.observe``): one ``list()`` per provider, the registry brought in
   line with what the providers report, queue counters and waiting proxy requests, each
   pool's run-time state and history summary.
3. **Decide.** ``policy.plan(snapshot)``: pure.
4. **Apply** (``Applier.apply``) each action in order, each safe to repeat; each action gives
   one event (``EventLog``, kind ``scale``) with its outcome and reason, one metric sample and
   one log line. Repeats of an unchanged ``Hold`` or deferral are logged once.
5. **Account** (``Accountant.bill``) the spend of live and parked workers since the last tick,
   and set the fleet gauges.

Static pools are observed (their workers are supply) but never acted on: their workers are
registered and health-checked by the dispatcher's side. ``run`` is the loop: every
``[scaling] interval_s``, at once when a ``{prefix}:wake`` message arrives (the queue publishes
one per runnable task, the proxy one per waiting request), and when ``policy.next_wake_s`` says
a timer fires sooner. On shutdown the lock is released, so another replica takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from gpufleet.loops import run_periodically
from gpufleet.metrics import IS_LEADER
from gpufleet.providers.base import Provider
from gpufleet.scaling import policy
from gpufleet.scaling.accounting import NOVITA_DISK_USD_PER_GB_HOUR, Accountant
from gpufleet.scaling.actions import Action
from gpufleet.scaling.apply import Applier, Fence, Fenced
from gpufleet.scaling.observe import Observed, Observer, ProviderBackoff
from gpufleet.scaling.outcomes import Outcome, Recorder, clear_fleet_gauges, set_gauges
from gpufleet.scaling.snapshot import GlobalBudget, Snapshot
from gpufleet.settings import Settings
from gpufleet.store.demand import DemandReader
from gpufleet.store.events import EventLog
from gpufleet.store.history import HistoryStore
from gpufleet.store.keys import Keys
from gpufleet.store.leader import LeaderLock
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.pubsub import Subscriber
from gpufleet.store.queue import TaskQueue
from gpufleet.store.workers import WorkerRegistry

logger = logging.getLogger(__name__)

# Ticks woken by wake messages are at least this far apart: a burst of enqueues is one tick.
WAKE_DEBOUNCE_S = 0.2


@dataclass
class TickReport:
    """What one ``reconcile_once`` saw and did (tests and the bench read it)."""

    leader: bool
    token: int | None = None
    snapshot: Snapshot | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    observe_ms: float = 0.0
    plan_ms: float = 0.0
    apply_ms: float = 0.0

    def of(self, kind: type) -> list[Outcome]:
        return [o for o in self.outcomes if isinstance(o.action, kind)]


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        *,
        registry: WorkerRegistry,
        events: EventLog | None,
        providers: Mapping[str, Provider],
        queue: TaskQueue | None = None,
        pool_state: PoolStateStore | None = None,
        history: HistoryStore | None = None,
        demand: DemandReader | None = None,
        lock: LeaderLock | None = None,
        clock: Callable[[], float] = time.time,
        replica_id: str | None = None,
        budget: GlobalBudget | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = registry
        self.events = events or EventLog(redis, prefix=settings.redis.key_prefix, clock=clock)
        self.providers = dict(providers)
        self.queue = queue
        self.clock = clock
        self.prefix = settings.redis.key_prefix
        self.pool_state = pool_state or PoolStateStore(redis, prefix=self.prefix, clock=clock)
        self.history = history or HistoryStore(
            redis, prefix=self.prefix, clock=clock, pools=settings.pools
        )
        self.demand = demand or DemandReader(
            redis, prefix=self.prefix, queue=queue, pools=settings.pools, clock=clock
        )
        self.interval_s = settings.scaling.interval_s
        self.lock = lock or LeaderLock(
            redis,
            prefix=self.prefix,
            replica_id=replica_id,
            ttl_s=settings.scaling.leader_lease_s or max(15.0, 3 * self.interval_s),
        )
        self.budget = budget or GlobalBudget()
        self.wake = asyncio.Event()
        self.keys = Keys(self.prefix)
        self.wake_channel = self.keys.wake()
        self.intents_key = self.keys.create_intents()
        # Every wake message sets ``wake`` (``run_periodically`` ticks at once).
        self.subscriber = Subscriber(
            redis, [self.wake_channel], lambda _c, _d: self.wake.set(), name="reconciler-wake"
        )
        # The rooms of one tick: observe -> (policy.plan) -> apply -> account, recorded.
        self.fence = Fence(self.lock)
        self.recorder = Recorder(self.events, self.lock)
        self.accountant = Accountant(
            redis,
            prefix=self.prefix,
            registry=registry,
            pool_state=self.pool_state,
            history=self.history,
            clock=clock,
        )
        backoff = ProviderBackoff()
        self.observer = Observer(
            settings,
            redis,
            registry=registry,
            providers=self.providers,
            pool_state=self.pool_state,
            history=self.history,
            demand=self.demand,
            accountant=self.accountant,
            backoff=backoff,
            recorder=self.recorder,
            fence=self.fence,
            intents_key=self.intents_key,
            budget=self.budget,
            clock=clock,
        )
        self.applier = Applier(
            redis,
            registry=registry,
            providers=self.providers,
            pool_state=self.pool_state,
            accountant=self.accountant,
            backoff=backoff,
            recorder=self.recorder,
            fence=self.fence,
            intents_key=self.intents_key,
            clock=clock,
        )
        self._was_leader = False
        self._timer: asyncio.TimerHandle | None = None
        self._running = False
        self.last_report: TickReport | None = None

    def __repr__(self) -> str:
        return f"<Reconciler replica={self.lock.replica_id} token={self.lock.token}>"

    # -- the tick ------------------------------------------------------------------------------

    async def reconcile_once(self) -> TickReport:
        """One tick: lead, observe, plan, apply, account. Never raises for a provider error."""
        token = await self.lock.acquire()
        IS_LEADER.set(1 if token else 0)
        if token is None:
            if self._was_leader:
                clear_fleet_gauges()
            self._was_leader = False
            report = TickReport(leader=False)
            self.last_report = report
            return report
        self._was_leader = True
        started = time.perf_counter()
        snapshot, seen = await self.observe()
        observed = time.perf_counter()
        actions = policy.plan(snapshot)
        planned = time.perf_counter()
        outcomes = await self.apply(actions, snapshot, seen)
        applied = time.perf_counter()
        await self.accountant.bill(snapshot, seen.workers)
        set_gauges(snapshot, self.observer.cost_per_task)
        report = TickReport(
            leader=True,
            token=token,
            snapshot=snapshot,
            outcomes=outcomes,
            observe_ms=(observed - started) * 1000,
            plan_ms=(planned - observed) * 1000,
            apply_ms=(applied - planned) * 1000,
        )
        self.last_report = report
        self._schedule_next(snapshot)
        return report

    async def observe(self) -> tuple[Snapshot, Observed]:
        """Build the snapshot ``plan`` decides on (``scaling/observe.py``)."""
        return await self.observer.observe()

    async def apply(
        self, actions: list[Action], snapshot: Snapshot, seen: Observed
    ) -> list[Outcome]:
        """Apply ``actions`` in order, fenced (``scaling/apply.py``)."""
        return await self.applier.apply(actions, snapshot, seen)

    # -- the loop --------------------------------------------------------------------------------
    def _schedule_next(self, snapshot: Snapshot) -> None:
        """Wake early when a timer (idle, boot, park, backoff) fires before the next interval."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = policy.next_wake_s(snapshot)
        if at is None or not self._running:
            return
        delay = at - snapshot.now
        if 0 <= delay < self.interval_s:
            self._timer = asyncio.get_running_loop().call_later(delay + 0.01, self.wake.set)

    async def _tick(self) -> None:
        await self.reconcile_once()
        await asyncio.sleep(WAKE_DEBOUNCE_S)  # let a burst of wake messages coalesce

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop``; then release the lock so another replica leads at once."""
        self._running = True
        self.subscriber.start()
        try:
            await run_periodically("reconciler", self._tick, self.interval_s, stop, wake=self.wake)
        finally:
            self._running = False
            if self._timer is not None:
                self._timer.cancel()
            await self.subscriber.aclose()
            await self.release()

    def spawn(self, stop: asyncio.Event) -> asyncio.Task[None]:
        return asyncio.create_task(self.run(stop), name="reconciler")

    async def release(self) -> None:
        try:
            await asyncio.shield(self.lock.release())
        except Exception as exc:
            logger.warning("reconciler: could not release the lock (%s)", exc)
        if self._was_leader:
            IS_LEADER.set(0)
            clear_fleet_gauges()
        self._was_leader = False


__all__ = [
    "NOVITA_DISK_USD_PER_GB_HOUR",
    "WAKE_DEBOUNCE_S",
    "Fenced",
    "Outcome",
    "Reconciler",
    "TickReport",
]
