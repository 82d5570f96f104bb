"""The reconciler: observe the fleet, ask ``policy.plan``, apply what it says. Leader only.

One tick (``reconcile_once``):

1. **Lead.** Take or renew the Redis lease lock (``store.leader.LeaderLock``). A replica that
   does not hold it does nothing else. Every mutation below (provider call or registry write)
   is preceded by a fencing check of the token, so a leader that was paused past its lease
   has its actions refused instead of racing the new leader.
2. **Observe.** One ``list()`` per provider (already filtered by gpufleet's name prefix; a
   provider whose list fails is backed off and left out of ``listed_providers``, so nothing
   of it reads as vanished or orphaned), the registry, ``TaskQueue.stats()`` (counters, never
   the tasks), the proxy's waiting-request ZSETs, each pool's run-time state
   (``PoolStateStore``: overrides, floors, spend, backoff) and each pool's history summary
   (``HistoryStore``: this tick's demand levels and boots are recorded first; it becomes
   ``Snapshot.history``). The registry is first brought in line with what the provider
   reports (a created instance that now runs gets its ``base_url`` and moves to ``booting``;
   a stopping one that stopped moves to ``stopped``…).
3. **Decide.** ``policy.plan(snapshot)``: pure.
4. **Apply** each action in order, each safe to repeat: ``Stop``/``Pause``/``Delete`` re-check
   the worker's busy slots right before the provider call; a delete of a gone instance is
   done; a create writes an intent first so an instance whose answer was lost is recognised.
   Each action gives one event (``EventLog``, kind ``scale``) with its outcome and reason,
   one metric sample and one log line. Repeats of an unchanged ``Hold`` or deferral are
   logged once.
5. **Account** the spend of live and parked workers since the last tick.

Static pools are observed (their workers are supply) but never acted on: their workers are
registered and health-checked by the dispatcher's side. ``run`` is the loop: every
``[scaling] interval_s``, at once when a ``{prefix}:wake`` message arrives (the queue publishes
one per runnable task, the proxy one per waiting request), and when ``policy.next_wake_s`` says
a timer fires sooner. On shutdown the lock is released, so another replica takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
import tenacity
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpufleet import errors
from gpufleet.domain import LIVE_WORKER_STATES, PARKED_WORKER_STATES, ProviderKind, Worker
from gpufleet.domain import WorkerState as WS
from gpufleet.loops import run_periodically
from gpufleet.metrics import (
    BOOT_SECONDS,
    BURN_RATE,
    COST_PER_TASK,
    IS_LEADER,
    ORPHANS,
    QUEUE_DEPTH,
    QUEUE_OLDEST_WAIT,
    SCALE_ACTIONS,
    SLOTS,
    SPEND,
    WORKERS,
)
from gpufleet.providers.account import AccountWatcher
from gpufleet.providers.base import Capability, Instance, InstanceState, Provider
from gpufleet.routing import pool_serves
from gpufleet.scaling import policy
from gpufleet.scaling.actions import (
    Action,
    Adopt,
    Create,
    Delete,
    Drain,
    Hold,
    MarkFailed,
    Pause,
    Resume,
    Start,
    Stop,
)
from gpufleet.scaling.history import PoolHistory
from gpufleet.scaling.requirements import with_fit_groups
from gpufleet.scaling.snapshot import (
    Demand,
    GlobalBudget,
    InstanceView,
    PoolView,
    Snapshot,
    WorkerView,
)
from gpufleet.settings import PoolSpec, Settings
from gpufleet.store.events import EventLog
from gpufleet.store.history import HistoryStore
from gpufleet.store.keys import NO_MODEL
from gpufleet.store.leader import LeaderLock
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.queue import TaskQueue
from gpufleet.store.workers import WorkerRegistry
from gpufleet.store.workers import keys as worker_keys
from gpufleet.tasks import QueueStats

logger = logging.getLogger(__name__)
T = TypeVar("T")

# What a stopped Novita instance still bills: its root disk. Novita lists no price for it;
# $0.0001 per GB-hour (50 GB -> $0.005/h) is the figure docs/scaling.md works with.
NOVITA_DISK_USD_PER_GB_HOUR = 0.0001
# A provider whose list call fails is not asked again for 5 s, 10 s, … at most 2 minutes.
PROVIDER_BACKOFF_BASE_S = 5.0
PROVIDER_BACKOFF_MAX_S = 120.0
# A spend interval longer than this (a leader away, a stalled loop) is not billed in one go.
MAX_ACCOUNT_GAP_S = 300.0
# Ticks woken by wake messages are at least this far apart: a burst of enqueues is one tick.
WAKE_DEBOUNCE_S = 0.2
# Outcomes that repeat tick after tick while nothing changes; logged and recorded once.
QUIET_OUTCOMES = frozenset({"hold", "deferred", "skipped"})

# KEYS: worker hash. ARGV: usd. Adds to cost_usd only if the record still exists.
_ADD_COST = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HINCRBYFLOAT', KEYS[1], 'cost_usd', ARGV[1])
end
return false
"""


class Fenced(Exception):
    """This replica no longer holds the reconciler lock: the action must not happen."""


@dataclass(frozen=True)
class Outcome:
    action: Action
    outcome: str  # ok, error, refused (fenced), skipped, deferred, hold
    detail: str = ""
    worker_id: str = ""
    instance_id: str = ""


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


@dataclass
class _Observed:
    """What observe learned beyond the snapshot: the apply step needs it."""

    specs: dict[str, PoolSpec]
    instances: dict[tuple[str, str], Instance]
    workers: dict[str, Worker]
    down: set[str]  # providers whose list failed / are backed off this tick
    backed_off: set[str] = field(default_factory=set)  # pools backed off during this apply


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
        self.interval_s = settings.scaling.interval_s
        self.lock = lock or LeaderLock(
            redis,
            prefix=self.prefix,
            replica_id=replica_id,
            ttl_s=settings.scaling.leader_lease_s or max(15.0, 3 * self.interval_s),
        )
        self.budget = budget or GlobalBudget()
        self.accounts = AccountWatcher(self.providers, clock=clock)  # balances, cached 60 s
        self.wake = asyncio.Event()
        self.wake_channel = f"{self.prefix}:wake"
        self.intents_key = f"{self.prefix}:scaling:creates"
        self.accounted_key = f"{self.prefix}:scaling:accounted_at"
        self._add_cost = redis.register_script(_ADD_COST)
        self._provider_down: dict[str, tuple[int, float]] = {}
        self._quiet: dict[tuple[str, str, str], str] = {}
        self._booting: dict[str, float] = {}  # worker id -> boot start, from the last tick
        self._boot_source: dict[str, str] = {}  # worker id -> "create" | "revive" (history)
        self._cost_per_task: dict[str, float] = {}  # pool -> spend / succeeded tasks
        self._last_tick_at: float | None = None
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
                _clear_fleet_gauges()
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
        await self._account(snapshot, seen)
        self._set_gauges(snapshot)
        self._last_tick_at = snapshot.now
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

    async def _fence(self) -> None:
        if not await self.lock.check():
            raise Fenced(f"replica {self.lock.replica_id} no longer holds the reconciler lock")

    # -- observe -------------------------------------------------------------------------------

    async def observe(self) -> tuple[Snapshot, _Observed]:
        """Build the snapshot ``plan`` decides on (and bring the registry in line first)."""
        now = self.clock()
        specs = {p.name: p for p in self.settings.pools}
        instances, listed, down = await self._list_instances(now)
        workers = {w.id: w for w in await self.registry.list_workers()}
        seen = _Observed(specs, instances, workers, down)
        await self._recover_intents(seen, now)
        await self._sync(seen, now)
        pools = await self._pool_views(specs)
        stats = await self.queue.stats() if self.queue is not None else None
        waiting = await self._waiting(specs, now)
        demand = with_fit_groups(_demand(specs, stats, waiting, now), specs, stats, now)
        views = tuple(
            _worker_view(w, seen) for w in seen.workers.values() if w.state is not WS.deleted
        )
        self._note_ready(views, pools, now)
        history = await self._history(pools, demand)
        inst_views = tuple(
            _instance_view(inst, self._pool_of(inst, specs)) for inst in instances.values()
        )
        snapshot = Snapshot(
            now=now,
            pools=pools,
            workers=views,
            demand=demand,
            instances=inst_views,
            listed_providers=frozenset(listed),
            budget=self._budget(pools),
            history=history,
            balances_usd=await self.accounts.balances(p.provider.value for p in pools),
        )
        return snapshot, seen

    async def _history(
        self, pools: tuple[PoolView, ...], demand: tuple[Demand, ...]
    ) -> dict[str, PoolHistory]:
        """Record this tick's demand levels (and the boots ``_note_ready`` noted), then read
        every pool's history summary. A Redis error leaves the pools without history this
        tick (the policy then uses its defaults) instead of failing the tick."""
        levels = demand_by_pool(pools, demand)
        await self.history.demands({p.name: (levels.get(p.name, 0), p.slots) for p in pools})
        await self.history.flush()
        try:
            return await self.history.summary(p.name for p in pools)
        except Exception as exc:
            logger.warning("reconciler: pool history not read (%s); deciding without it", exc)
            return {}

    async def _list_instances(
        self, now: float
    ) -> tuple[dict[tuple[str, str], Instance], set[ProviderKind], set[str]]:
        kinds = {p.provider for p in self.settings.pools if p.provider is not ProviderKind.static}
        instances: dict[tuple[str, str], Instance] = {}
        listed: set[ProviderKind] = set()
        down: set[str] = set()
        for kind in sorted(kinds):
            provider = self.providers.get(kind.value)
            if provider is None:
                down.add(kind.value)
                continue
            failures, until = self._provider_down.get(kind.value, (0, 0.0))
            if now < until:
                down.add(kind.value)
                continue
            try:
                found = await provider.list()
            except Exception as exc:  # an outage slows the loop down, never stops it
                failures += 1
                delay = policy.backoff_delay_s(
                    failures, PROVIDER_BACKOFF_BASE_S, PROVIDER_BACKOFF_MAX_S
                )
                self._provider_down[kind.value] = (failures, now + delay)
                down.add(kind.value)
                logger.warning(
                    "reconciler: %s list failed (%s); not asking again for %.0f s",
                    kind.value,
                    _why(exc),
                    delay,
                )
                continue
            if failures:
                logger.info("reconciler: %s answers again", kind.value)
            self._provider_down.pop(kind.value, None)
            listed.add(kind)
            for inst in found:
                instances[(kind.value, inst.id)] = inst
        return instances, listed, down

    def _pool_of(self, inst: Instance, specs: Mapping[str, PoolSpec]) -> str:
        if inst.provider == ProviderKind.surf.value:
            for spec in specs.values():
                if (
                    spec.provider is ProviderKind.surf
                    and spec.name_filter
                    and spec.name_filter in inst.name
                ):
                    return spec.name
            return ""
        prefix = self.settings.providers.novita.name_prefix
        best = ""
        for spec in specs.values():
            if spec.provider.value != inst.provider:
                continue
            stem = prefix + spec.name
            if (inst.name == stem or inst.name.startswith(stem + "-")) and len(spec.name) > len(
                best
            ):
                best = spec.name
        return best

    def _budget(self, pools: tuple[PoolView, ...]) -> GlobalBudget:
        """The global budget: ``[scaling]`` caps (or the constructor's), today's total spend."""
        scaling = self.settings.scaling
        return GlobalBudget(
            max_spend_per_hour=scaling.max_spend_per_hour or self.budget.max_spend_per_hour,
            max_spend_per_day=scaling.max_spend_per_day or self.budget.max_spend_per_day,
            spend_today_usd=sum(p.spend_today_usd for p in pools),
        )

    async def _pool_views(self, specs: Mapping[str, PoolSpec]) -> tuple[PoolView, ...]:
        views = []
        for spec in specs.values():
            effective, runtime = await self.pool_state.effective(spec)
            if runtime.succeeded:
                self._cost_per_task[spec.name] = runtime.spend_usd / runtime.succeeded
            parked = (
                spec.rootfs_gb * NOVITA_DISK_USD_PER_GB_HOUR
                if spec.provider is ProviderKind.novita
                else 0.0
            )
            views.append(
                PoolView.from_spec(
                    effective,
                    backoff_until=runtime.backoff_until,
                    backoff_reason=runtime.backoff_reason,
                    spend_today_usd=runtime.spend_today_usd,
                    parked_cost_per_hour=parked,
                    max_step_per_tick=self.settings.scaling.max_step_per_tick,
                    max_spend_per_hour=spec.max_spend_per_hour,
                    max_spend_per_day=spec.max_spend_per_day,
                    park_timeout_s=spec.park_timeout_s,
                )
            )
        return tuple(views)

    async def _waiting(self, specs: Mapping[str, PoolSpec], now: float) -> dict[str, int]:
        """Proxy requests waiting per pool; entries past their deadline (a dead replica's) are
        dropped here, the leader being the one that tidies shared state."""
        if not specs:
            return {}
        names = list(specs)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                key = f"{self.prefix}:proxy:waiting:{name}"
                pipe.zremrangebyscore(key, "-inf", now)
                pipe.zcard(key)
            answers = await pipe.execute()
        return {name: int(n) for name, n in zip(names, answers[1::2], strict=True) if int(n)}

    def _note_ready(
        self, views: tuple[WorkerView, ...], pools: tuple[PoolView, ...], now: float
    ) -> None:
        """Boot-time metric for workers that became ready since the last tick: fresh ones, and
        revived ones whose start/resume this leader asked for (seeded by ``apply``); a ready
        worker that went back to booting after failed probes is not a boot."""
        booting: dict[str, float] = {}
        sources: dict[str, str] = {}
        for w in views:
            if w.boot_started_at is not None and w.state in policy.BOOTING_STATES:
                if w.ready_since is None or w.id in self._booting:
                    booting[w.id] = w.boot_started_at
                    # never ready before: a fresh instance; else a start / resume
                    sources[w.id] = "create" if w.ready_since is None else "revive"
            elif w.state is WS.ready and w.id in self._booting and w.ready_since is not None:
                seconds = max(0.0, w.ready_since - self._booting[w.id])
                BOOT_SECONDS.labels(w.pool).observe(seconds)
                source = self._boot_source.get(w.id)
                if source is not None:
                    self.history.note_boot(w.pool, source, seconds)
        self._booting = booting
        self._boot_source = sources

    # -- registry <-> provider ------------------------------------------------------------------

    async def _recover_intents(self, seen: _Observed, now: float) -> None:
        """A create whose instance exists but whose record was never written (the answer was
        lost, or gpufleet died in between) is registered now instead of read as an orphan."""
        raw = cast(dict[str, str], await self.redis.hgetall(self.intents_key))
        if not raw:
            return
        known = {w.instance_id or w.id for w in seen.workers.values()}
        by_name = {
            inst.name: inst for (kind, _), inst in seen.instances.items() if inst.id not in known
        }
        prefix = self.settings.providers.novita.name_prefix
        for name, value in raw.items():
            intent = json.loads(value)
            inst = by_name.get(prefix + name) or by_name.get(name)
            spec = seen.specs.get(intent.get("pool", ""))
            if inst is not None and spec is not None:
                await self._fence()
                worker = await self._register(spec, inst, WS.provisioning)
                seen.workers[worker.id] = worker
                await self.redis.hdel(self.intents_key, name)
                await self._event(
                    "recover",
                    spec.name,
                    "ok",
                    "created instance found without a record",
                    worker=worker.id,
                    instance=inst.id,
                )
            elif now - float(intent.get("at", now)) > 2 * (spec.boot_timeout_s if spec else 600):
                await self.redis.hdel(self.intents_key, name)

    async def _register(self, spec: PoolSpec, inst: Instance, state: WS) -> Worker:
        base_url = inst.base_url or ""
        if state is WS.provisioning and inst.state is InstanceState.running and base_url:
            state = WS.booting
        return await self.registry.register(
            pool=spec.name,
            provider=spec.provider.value,
            slots=spec.slots,
            state=state,
            worker_id=inst.id,
            instance_id=inst.id,
            instance_name=inst.name,
            base_url=base_url,
            engine=spec.engine.value,
            price_per_hour=spec.price_per_hour or inst.price_per_hour or 0.0,
            # The instance's own gate secret (Novita envs); none: the pool's, if any.
            **({"worker_token": inst.worker_token} if inst.worker_token else {}),
        )

    async def _sync(self, seen: _Observed, now: float) -> None:
        """Move records to what their provider reports (only for providers listed this tick)."""
        fenced = False
        for w in list(seen.workers.values()):
            spec = seen.specs.get(w.pool)
            if spec is None or spec.provider is ProviderKind.static:
                continue
            if spec.provider.value in seen.down:
                continue
            inst = seen.instances.get((spec.provider.value, w.instance_id or w.id))
            steps = _sync_steps(w, inst)
            if not steps or inst is None:
                continue
            if not fenced:
                await self._fence()
                fenced = True
            await self._sync_one(seen, spec, w, inst, steps)

    async def _sync_one(
        self,
        seen: _Observed,
        spec: PoolSpec,
        w: Worker,
        inst: Instance,
        steps: list[tuple[WS | None, str]],
    ) -> None:
        reason = steps[-1][1]
        for new, why in steps:
            if new is not None and not await self.registry.transition(w.id, new, why):
                break
        if inst.base_url and inst.base_url != w.base_url:
            await self.registry.update(w.id, base_url=inst.base_url)
        moved = await self.registry.find(w.id)
        if moved is None:
            return
        seen.workers[w.id] = moved
        if w.state is WS.booting and inst.state in (InstanceState.paused, InstanceState.stopped):
            # a revive that failed (SURF: no GPU free) backs the pool off like a failed create
            until = await self.pool_state.back_off(
                spec.name, reason, base_s=policy.BACKOFF_BASE_S, cap_s=policy.BACKOFF_MAX_S
            )
            reason += f"; pool backed off until {until:.0f}"
        if moved.state is not w.state:
            await self._event(
                "sync",
                spec.name,
                "ok",
                reason,
                worker=w.id,
                instance=inst.id,
                state=moved.state.value,
            )

    # -- apply ---------------------------------------------------------------------------------

    async def apply(
        self, actions: list[Action], snapshot: Snapshot, seen: _Observed
    ) -> list[Outcome]:
        """Apply ``actions`` in order; each gets an outcome, an event, a metric and a log line."""
        outcomes: list[Outcome] = []
        views = {w.id: w for w in snapshot.workers}
        fenced = False
        for action in actions:
            spec = seen.specs.get(action.pool)
            gated = self._gate(action, spec, seen)
            if fenced:
                result = Outcome(action, "refused", "not the leader any more")
            elif gated is not None:
                result = gated
            else:
                try:
                    if spec is None:
                        assert isinstance(action, Delete)
                        result = await self._delete_stray(action, seen)
                    else:
                        result = await self._apply_one(action, spec, seen, views)
                except Fenced as exc:
                    fenced = True
                    result = Outcome(action, "refused", str(exc))
                except errors.ProviderError as exc:
                    result = Outcome(action, "error", _why(exc))
                    if spec is not None:
                        await self._after_error(action, spec, exc, seen)
                except Exception as exc:
                    logger.exception("reconciler: %s failed", _name(action))
                    result = Outcome(action, "error", _why(exc))
            outcomes.append(result)
            if result.outcome == "ok" and isinstance(action, Create | Start | Resume):
                self._booting[result.worker_id] = self.clock()  # ready before the next tick
                self._boot_source[result.worker_id] = (
                    "create" if isinstance(action, Create) else "revive"
                )
            await self._record(result)
        return outcomes

    def _gate(self, action: Action, spec: PoolSpec | None, seen: _Observed) -> Outcome | None:
        """The outcome of an action that must not reach a provider this tick, else None."""
        if isinstance(action, Hold):
            return Outcome(action, "hold", action.code)
        if spec is None:
            if isinstance(action, Delete) and not action.worker_id:
                return None  # an orphan of a pool no longer configured
            return Outcome(action, "skipped", "no such pool")
        if spec.provider is ProviderKind.static:
            return Outcome(action, "skipped", "static pools are managed by the health checker")
        if spec.provider.value in seen.down and not isinstance(action, Drain | MarkFailed):
            return Outcome(action, "deferred", f"{spec.provider.value} is not answering")
        if isinstance(action, Create | Start | Resume) and action.pool in seen.backed_off:
            return Outcome(action, "hold", "backoff: the pool was backed off this tick")
        return None

    async def _after_error(
        self, action: Action, spec: PoolSpec, exc: errors.ProviderError, seen: _Observed
    ) -> None:
        if isinstance(exc, errors.InsufficientCapacity | errors.QuotaOrBalance) and isinstance(
            action, Create | Start | Resume
        ):
            await self.pool_state.back_off(
                spec.name, _why(exc), base_s=policy.BACKOFF_BASE_S, cap_s=policy.BACKOFF_MAX_S
            )
            seen.backed_off.add(spec.name)
        elif isinstance(exc, errors.RateLimited | errors.ProviderUnavailable | errors.AuthFailed):
            kind = spec.provider.value
            failures, _ = self._provider_down.get(kind, (0, 0.0))
            delay = policy.backoff_delay_s(
                failures + 1, PROVIDER_BACKOFF_BASE_S, PROVIDER_BACKOFF_MAX_S
            )
            if isinstance(exc, errors.RateLimited) and exc.retry_after:
                delay = max(delay, min(exc.retry_after, PROVIDER_BACKOFF_MAX_S))
            self._provider_down[kind] = (failures + 1, self.clock() + delay)
            seen.down.add(kind)

    async def _apply_one(
        self, action: Action, spec: PoolSpec, seen: _Observed, views: Mapping[str, WorkerView]
    ) -> Outcome:
        provider = self.providers.get(spec.provider.value)
        if provider is None:
            return Outcome(action, "error", f"no {spec.provider.value} provider configured")
        if isinstance(action, Create):
            return await self._create(action, spec, provider)
        if isinstance(action, Adopt):
            return await self._adopt(action, spec, seen)
        if isinstance(action, Delete):
            return await self._delete(action, spec, provider, seen)
        if isinstance(action, Hold):
            return Outcome(action, "hold", action.code)
        worker = seen.workers.get(action.worker_id)
        if worker is None:
            return Outcome(action, "skipped", "worker is not in the registry", action.worker_id)
        if isinstance(action, MarkFailed):
            outcome = await self._mark_failed(action, spec, worker)
            if outcome.outcome == "ok":
                seen.backed_off.add(spec.name)
            return outcome
        if isinstance(action, Drain):
            await self._fence()
            if await self.registry.transition(worker.id, WS.draining, action.reason):
                return Outcome(action, "ok", "", worker.id, worker.instance_id)
            return Outcome(action, "skipped", "not ready any more", worker.id, worker.instance_id)
        if isinstance(action, Stop | Pause):
            return await self._park(action, provider, worker)
        return await self._revive(action, provider, worker)

    async def _mark_failed(self, action: MarkFailed, spec: PoolSpec, worker: Worker) -> Outcome:
        await self._fence()
        if not await self.registry.transition(worker.id, WS.failed, action.reason):
            return Outcome(action, "skipped", "state changed meanwhile", worker.id)
        until = await self.pool_state.back_off(
            spec.name, action.reason, base_s=policy.BACKOFF_BASE_S, cap_s=policy.BACKOFF_MAX_S
        )
        detail = f"pool backed off until {until:.0f}"
        return Outcome(action, "ok", detail, worker.id, worker.instance_id)

    async def _park(self, action: Stop | Pause, provider: Provider, worker: Worker) -> Outcome:
        """Stop / pause an idle worker; a lease that landed since observe cancels it."""
        instance_id = worker.instance_id or worker.id
        busy = await self.registry.busy(worker.id)
        if busy:
            return Outcome(action, "skipped", f"{busy} slots busy", worker.id, instance_id)
        await self._fence()
        if isinstance(action, Stop):
            await provider.stop(instance_id)
        else:
            await provider.pause(instance_id)
        await _redis_retry(lambda: self.registry.transition(worker.id, WS.stopping, action.reason))
        return Outcome(action, "ok", "", worker.id, instance_id)

    async def _revive(self, action: Start | Resume, provider: Provider, worker: Worker) -> Outcome:
        instance_id = worker.instance_id or worker.id
        await self._fence()
        if isinstance(action, Start):
            await provider.start(instance_id)
        else:
            await provider.resume(instance_id)
        await _redis_retry(lambda: self.registry.transition(worker.id, WS.booting, action.reason))
        return Outcome(action, "ok", "", worker.id, instance_id)

    async def _create(self, action: Create, spec: PoolSpec, provider: Provider) -> Outcome:
        name = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        intent = json.dumps({"pool": spec.name, "at": self.clock()})
        await self._fence()
        await self.redis.hset(self.intents_key, name, intent)
        try:
            inst = await provider.create(spec, name)
        except errors.ProviderError:
            if await provider_lost_answer(provider, name) is None:
                await self.redis.hdel(self.intents_key, name)
            raise
        worker = await _redis_retry(lambda: self._register(spec, inst, WS.provisioning))
        await _redis_retry(lambda: self.redis.hdel(self.intents_key, name))
        return Outcome(action, "ok", f"created {inst.name}", worker.id, inst.id)

    async def _adopt(self, action: Adopt, spec: PoolSpec, seen: _Observed) -> Outcome:
        inst = seen.instances.get((spec.provider.value, action.instance_id))
        if inst is None:
            return Outcome(action, "skipped", "instance not listed", "", action.instance_id)
        if inst.state is InstanceState.failed:
            return Outcome(action, "skipped", f"instance failed: {inst.last_error}", "", inst.id)
        if await self.registry.find(inst.id) is not None:
            return Outcome(action, "skipped", "already registered", inst.id, inst.id)
        await self._fence()
        state = _ADOPT_STATES.get(inst.state, WS.provisioning)
        worker = await self._register(spec, inst, state)
        seen.workers[worker.id] = worker
        ORPHANS.labels(spec.provider.value, "adopted").inc()
        return Outcome(action, "ok", f"registered as {worker.state.value}", worker.id, inst.id)

    async def _delete(
        self, action: Delete, spec: PoolSpec, provider: Provider, seen: _Observed
    ) -> Outcome:
        worker = seen.workers.get(action.worker_id) if action.worker_id else None
        instance_id = action.instance_id or (worker.instance_id if worker else "")
        if worker is not None and worker.state not in (WS.failed, *policy.BOOTING_STATES):
            busy = await self.registry.busy(worker.id)
            if busy:
                return Outcome(action, "skipped", f"{busy} slots busy", worker.id, instance_id)
        await self._fence()
        detail = ""
        if instance_id:
            if Capability.delete in provider.capabilities:
                await provider.delete(instance_id)
                detail = "instance deleted"
            elif Capability.pause in provider.capabilities:
                inst = seen.instances.get((spec.provider.value, instance_id))
                if inst is not None and inst.state in (InstanceState.running,):
                    with contextlib.suppress(errors.InvalidState, errors.NotFound):
                        await provider.pause(instance_id)
                    detail = "workspace paused (it cannot be deleted)"
        if worker is not None:
            await _redis_retry(lambda: self.registry.remove(worker.id))
            seen.workers.pop(worker.id, None)
        else:
            ORPHANS.labels(spec.provider.value, "deleted").inc()
        return Outcome(action, "ok", detail, action.worker_id, instance_id)

    async def _delete_stray(self, action: Delete, seen: _Observed) -> Outcome:
        """An instance with our prefix that names no configured pool (a pool since removed)."""
        kind = next((k for (k, i) in seen.instances if i == action.instance_id), "")
        provider = self.providers.get(kind)
        if provider is None or kind in seen.down:
            return Outcome(action, "deferred", f"{kind or 'its provider'} is not answering")
        if Capability.delete not in provider.capabilities:
            return Outcome(action, "skipped", f"{kind} instances are never deleted")
        await self._fence()
        await provider.delete(action.instance_id)
        ORPHANS.labels(kind, "deleted").inc()
        return Outcome(action, "ok", "instance deleted", "", action.instance_id)

    # -- recording -------------------------------------------------------------------------------

    async def _record(self, result: Outcome) -> None:
        action = result.action
        name = _name(action)
        SCALE_ACTIONS.labels(action.pool, name, result.outcome).inc()
        worker = result.worker_id or getattr(action, "worker_id", "")
        instance = result.instance_id or getattr(action, "instance_id", "")
        key = (action.pool, name, worker or instance)
        if result.outcome in QUIET_OUTCOMES:
            if self._quiet.get(key) == result.detail:
                return
            self._quiet[key] = result.detail
        else:
            self._quiet.pop(key, None)
        log = logger.warning if result.outcome in ("error", "refused") else logger.info
        log(
            "scale %s pool=%s worker=%s instance=%s -> %s%s: %s",
            name,
            action.pool,
            worker or "-",
            instance or "-",
            result.outcome,
            f" ({result.detail})" if result.detail else "",
            action.reason,
        )
        await self._event(
            name,
            action.pool,
            result.outcome,
            action.reason,
            worker=worker,
            instance=instance,
            detail=result.detail,
        )

    async def _event(
        self, action: str, pool: str, outcome: str, reason: str, **fields: Any
    ) -> None:
        try:
            await self.events.emit(
                "scale",
                pool=pool,
                action=action,
                outcome=outcome,
                reason=reason,
                token=self.lock.token,
                replica=self.lock.replica_id,
                **{k: v for k, v in fields.items() if v},
            )
        except Exception as exc:  # an event lost is not worth a failed tick
            logger.warning("reconciler: event not recorded (%s)", exc)

    # -- money and gauges -----------------------------------------------------------------------

    async def _account(self, snapshot: Snapshot, seen: _Observed) -> None:
        """Add what live and parked workers cost since the last tick to pools and workers."""
        now = snapshot.now
        last = await self.redis.getset(self.accounted_key, repr(now))
        if last is None:
            return
        dt = min(max(0.0, now - float(last)), MAX_ACCOUNT_GAP_S)
        if dt <= 0:
            return
        pools = {p.name: p for p in snapshot.pools}
        per_pool: dict[str, float] = defaultdict(float)
        per_worker: dict[str, float] = {}
        for w in snapshot.workers:
            pool = pools.get(w.pool)
            if pool is None or w.id not in seen.workers:
                continue
            if w.state in LIVE_WORKER_STATES or w.state is WS.stopping:
                rate = pool.price_per_hour
            elif w.state in PARKED_WORKER_STATES:
                rate = pool.parked_cost_per_hour
            else:
                continue
            usd = rate * dt / 3600.0
            if usd > 0:
                per_pool[w.pool] += usd
                per_worker[w.id] = usd
        if per_worker:
            async with self.redis.pipeline(transaction=False) as pipe:
                for worker_id, usd in per_worker.items():
                    await self._add_cost(
                        keys=[worker_keys.worker(self.prefix, worker_id)], args=[usd], client=pipe
                    )
                await pipe.execute()
        for pool_name, usd in per_pool.items():
            await self.pool_state.add_spend(pool_name, usd)
            SPEND.labels(pool_name).inc(usd)

    def _set_gauges(self, snapshot: Snapshot) -> None:
        _clear_fleet_gauges()
        pools = {p.name: p for p in snapshot.pools}
        counts = Counter((w.pool, w.state.value) for w in snapshot.workers)
        for (pool_name, state), n in counts.items():
            WORKERS.labels(pool_name, state).set(n)
        for name, view in pools.items():
            ready = [w for w in snapshot.workers if w.pool == name and w.state is WS.ready]
            busy = sum(min(w.busy_slots, w.slots) for w in ready)
            SLOTS.labels(name, "busy").set(busy)
            SLOTS.labels(name, "free").set(sum(w.slots for w in ready) - busy)
            live = sum(
                1 for w in snapshot.workers if w.pool == name and w.state in LIVE_WORKER_STATES
            )
            BURN_RATE.labels(name).set(live * view.price_per_hour)
        for name, usd in self._cost_per_task.items():
            COST_PER_TASK.labels(name).set(usd)
        depth: Counter[str] = Counter()
        oldest: dict[str, float] = {}
        for d in snapshot.demand:  # unpooled work several pools may take: "<engine>/*"
            label = d.pools[0] if len(d.pools) == 1 else d.key
            depth[label] += d.queued
            oldest[label] = max(oldest.get(label, 0.0), d.oldest_wait_s)
        for label, n in depth.items():
            QUEUE_DEPTH.labels(label).set(n)
            QUEUE_OLDEST_WAIT.labels(label).set(oldest[label])

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

    async def _listen(self) -> None:
        """Set ``wake`` on every ``{prefix}:wake`` message; reconnect after a Redis hiccup."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.wake_channel)
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None and message.get("type") == "message":
                        self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("reconciler: wake subscription lost (%s); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop``; then release the lock so another replica leads at once."""
        self._running = True
        listener = asyncio.create_task(self._listen(), name="reconciler-wake")
        try:
            await run_periodically("reconciler", self._tick, self.interval_s, stop, wake=self.wake)
        finally:
            self._running = False
            if self._timer is not None:
                self._timer.cancel()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener
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
            _clear_fleet_gauges()
        self._was_leader = False

    # -- for GET /api/v1/pools --------------------------------------------------------------------

    async def demand_for(self, pool: str) -> dict[str, Any]:
        """The pool's demand now, from queue counters and the proxy's waiting set."""
        spec = next((p for p in self.settings.pools if p.name == pool), None)
        now = self.clock()
        stats = await self.queue.stats() if self.queue is not None else None
        waiting = int(
            await self.redis.zcount(f"{self.prefix}:proxy:waiting:{pool}", f"({now}", "+inf")
        )
        if stats is None or spec is None:
            return {"queued": 0, "waiting": waiting, "in_flight": 0, "oldest_wait_s": 0.0}
        oldest = stats.oldest_by_pool.get(pool)
        return {
            "queued": stats.queued_by_pool.get(pool, 0),
            "queued_any_pool": stats.queued_unpooled.get(spec.engine.value, 0),
            "waiting": waiting,
            "in_flight": stats.running_by_pool.get(pool, 0),
            "oldest_wait_s": round(max(0.0, now - oldest), 3) if oldest else 0.0,
        }


# -- helpers ---------------------------------------------------------------------------------------

_ADOPT_STATES = {
    InstanceState.pending: WS.provisioning,
    InstanceState.booting: WS.provisioning,
    InstanceState.running: WS.booting,
    InstanceState.stopping: WS.stopping,
    InstanceState.stopped: WS.stopped,
    InstanceState.paused: WS.paused,
}


async def provider_lost_answer(provider: Provider, name: str) -> Instance | None:
    """After a failed create: did the cloud make the instance anyway? (None if unsure.)"""
    try:
        return await provider.find_by_name(name)
    except Exception:
        return None


def _sync_steps(w: Worker, inst: Instance | None) -> list[tuple[WS | None, str]]:
    """The registry moves that bring ``w`` in line with its instance (empty: none)."""
    if inst is None:
        return []
    s = inst.state
    if s is InstanceState.failed and w.state not in (WS.failed, WS.deleted):
        return [(WS.failed, f"provider reports the instance failed: {inst.last_error or '-'}")]
    if w.state is WS.provisioning and s is InstanceState.running and inst.base_url:
        return [(WS.booting, f"instance running at {inst.base_url}")]
    if w.state in (WS.booting, WS.ready) and inst.base_url and inst.base_url != w.base_url:
        return [(None, f"endpoint now {inst.base_url}")]
    parked = {InstanceState.stopped: WS.stopped, InstanceState.paused: WS.paused}
    if w.state is WS.stopping and s in parked:
        return [(parked[s], f"instance {s.value}")]
    if w.state in (WS.booting, WS.ready, WS.draining) and s in parked:
        why = inst.last_error or f"instance {s.value} outside gpufleet"
        return [(WS.stopping, why), (parked[s], why)]
    if w.state in PARKED_WORKER_STATES and s in (InstanceState.running, InstanceState.booting):
        return [(WS.booting, f"instance {s.value} again")]
    return []


def _worker_view(w: Worker, seen: _Observed) -> WorkerView:
    booting = w.state in policy.BOOTING_STATES
    spec = seen.specs.get(w.pool)
    inst = seen.instances.get((spec.provider.value, w.instance_id or w.id)) if spec else None
    return WorkerView(
        id=w.id,
        pool=w.pool,
        state=w.state,
        slots=w.slots,
        busy_slots=w.busy_slots,
        instance_id=w.instance_id or w.id,
        state_since=w.state_since,
        boot_started_at=(w.created_at if w.ready_since is None else w.state_since)
        if booting
        else None,
        ready_since=w.ready_since,
        last_busy_at=w.last_busy_at,
        provider_state=inst.provider_status if inst else "",
    )


def _instance_view(inst: Instance, pool: str) -> InstanceView:
    return InstanceView(
        instance_id=inst.id,
        provider=ProviderKind(inst.provider),
        name=inst.name,
        pool=pool,
        healthy=inst.state is InstanceState.running and bool(inst.base_url),
        created_at=inst.created_at or 0.0,
    )


def _demand(
    specs: Mapping[str, PoolSpec], stats: QueueStats | None, waiting: Mapping[str, int], now: float
) -> tuple[Demand, ...]:
    """Demand groups from queue counters: tasks naming a pool, tasks naming only an engine
    (any pool of that engine that serves the task's model may serve them), and the proxy's
    waiting requests (counted with the pool the proxy picked for them).

    A task counts only for pools that could serve it: a task naming a model its pool does
    not serve (left from before a config change) counts for nobody, and a task naming only
    an engine and a model counts for the pools that serve that model, in a group of its own
    (``{engine}/{model}``) when that is not all of them. Work no pool could serve never
    scales a pool; it fails at its maximum queue age (``[queue] max_queue_age_s``)."""
    out: list[Demand] = []
    for name, spec in specs.items():
        queued = stats.queued_by_pool.get(name, 0) if stats else 0
        if stats is not None:
            by_model = stats.runnable_by_pool_model.get(name, {})
            queued -= sum(n for m, n in by_model.items() if not _serves(spec, m))
        running = stats.running_by_pool.get(name, 0) if stats else 0
        wait = waiting.get(name, 0)
        if queued > 0 or running or wait:
            oldest = stats.oldest_by_pool.get(name) if stats else None
            out.append(
                Demand(
                    key=f"pool/{name}",
                    pools=(name,),
                    queued=max(0, queued),
                    waiting=wait,
                    in_flight=running,
                    oldest_wait_s=max(0.0, now - oldest) if oldest else 0.0,
                )
            )
    if stats is not None:
        engines = {spec.engine.value for spec in specs.values()}
        for engine in sorted(engines):
            pools = tuple(n for n, s in specs.items() if s.engine.value == engine)
            queued = stats.queued_unpooled.get(engine, 0)
            pooled_running = sum(stats.running_by_pool.get(n, 0) for n in pools)
            running = max(0, stats.running_by_engine.get(engine, 0) - pooled_running)
            oldest = stats.oldest_unpooled.get(engine)
            oldest_wait_s = max(0.0, now - oldest) if oldest else 0.0
            for model, n in sorted(stats.runnable_unpooled_by_model.get(engine, {}).items()):
                serving = tuple(p for p in pools if _serves(specs[p], model))
                if serving == pools:
                    continue  # any pool of the engine: stays in the engine's group
                queued -= n
                if serving:
                    out.append(
                        Demand(
                            key=f"{engine}/{model}",
                            pools=serving,
                            queued=n,
                            oldest_wait_s=oldest_wait_s,
                        )
                    )
            if queued > 0 or running:
                out.append(
                    Demand(
                        key=f"{engine}/*",
                        pools=pools,
                        queued=max(0, queued),
                        in_flight=running,
                        oldest_wait_s=oldest_wait_s,
                    )
                )
    return tuple(out)


def _serves(spec: PoolSpec, model: str) -> bool:
    """True if the pool could serve a task naming ``model`` (``*``: a task naming none)."""
    return model == NO_MODEL or pool_serves(spec, model)


def demand_by_pool(pools: tuple[PoolView, ...], demand: tuple[Demand, ...]) -> dict[str, int]:
    """Each pool's demand for its idle-gap history: the groups naming only it, plus every
    group several pools may serve (tasks naming only an engine) counted for the cheapest of
    them per slot-hour, the pool ``policy`` starts first for it (``_by_price``'s order)."""
    views = {p.name: p for p in pools}
    out: dict[str, int] = defaultdict(int)
    for d in demand:
        candidates = [views[n] for n in d.pools if n in views]
        if not candidates:
            continue
        home = min(candidates, key=lambda p: (p.price_per_slot_hour, p.name))
        out[home.name] += d.total
    return dict(out)


def _clear_fleet_gauges() -> None:
    for gauge in (WORKERS, SLOTS, BURN_RATE, QUEUE_DEPTH, QUEUE_OLDEST_WAIT, COST_PER_TASK):
        gauge.clear()


def _name(action: Action) -> str:
    return type(action).__name__.lower()


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


async def _redis_retry(call: Callable[[], Awaitable[T]]) -> T:
    """Ride out a Redis blip (connection reset, timeout) with three quick attempts.

    Used for the registry writes that follow a provider call (each is a CAS or an overwrite,
    safe to repeat), never around the provider call itself: a create must not be sent twice
    because the bookkeeping after it failed. Provider errors are not retried here; the
    provider clients already retry transient ones.
    """
    async for attempt in tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential(multiplier=0.1, max=1.0),
        retry=tenacity.retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity re-raises the last error")


__all__ = ["Fenced", "Outcome", "Reconciler", "TickReport"]
