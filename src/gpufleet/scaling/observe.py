"""Observe: build the ``Snapshot`` that ``policy.plan`` decides on, one per reconciler tick.

In order: one ``list()`` per provider (already filtered by gpufleet's name prefix; a provider
whose list fails is backed off by ``ProviderBackoff`` and left out of ``listed_providers``, so
nothing of it reads as vanished or orphaned), the registry, the creates whose record was never
written (recovered from their intents), the registry brought in line with what each listed
provider reports (a created instance that now runs gets its ``base_url`` and moves to
``booting``; a stopping one that stopped moves to ``stopped``…), each pool's run-time state
(``PoolStateStore``: overrides, floors, spend, backoff), the demand (``store.demand``: queue
counters, never the tasks, and the proxy's waiting requests) grouped by the pools that may
serve it, the boots that finished (``Accountant.note_ready``), and each pool's history summary
(``HistoryStore``: this tick's demand levels and boots are recorded first).

Besides the snapshot it returns ``Observed``: what the apply step needs that ``plan`` does not
see (pool specs, the provider's ``Instance`` objects, the registry's ``Worker`` records, which
providers are down). Registry writes here are fenced like every other mutation; the fence and
the events are the reconciler's, passed in.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis

from gpufleet.domain import BOOTING_WORKER_STATES, PARKED_WORKER_STATES, ProviderKind, Worker
from gpufleet.domain import WorkerState as WS
from gpufleet.providers.account import AccountWatcher
from gpufleet.providers.base import Instance, InstanceState, Provider
from gpufleet.routing import pool_serves
from gpufleet.scaling import policy
from gpufleet.scaling.accounting import Accountant, parked_cost_per_hour
from gpufleet.scaling.history import PoolHistory
from gpufleet.scaling.outcomes import Recorder, why
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
from gpufleet.store.demand import DemandReader
from gpufleet.store.history import HistoryStore
from gpufleet.store.keys import NO_MODEL
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.workers import WorkerRegistry
from gpufleet.tasks import QueueStats

logger = logging.getLogger(__name__)

# A provider whose list call fails is not asked again for 5 s, 10 s, … at most 2 minutes.
PROVIDER_BACKOFF_BASE_S = 5.0
PROVIDER_BACKOFF_MAX_S = 120.0


@dataclass
class Observed:
    """What observe learned beyond the snapshot: the apply step needs it."""

    specs: dict[str, PoolSpec]
    instances: dict[tuple[str, str], Instance]
    workers: dict[str, Worker]
    down: set[str]  # providers whose list failed / are backed off this tick
    backed_off: set[str] = field(default_factory=set)  # pools backed off during this apply


class ProviderBackoff:
    """Providers not asked again until a deadline: after a failed list (observe), or after a
    rate limit, outage or auth error during apply. Kept in memory by the leader."""

    def __init__(self) -> None:
        self._down: dict[str, tuple[int, float]] = {}  # kind -> (failures, until)

    def __repr__(self) -> str:
        return f"<ProviderBackoff down={sorted(self._down)}>"

    def state(self, kind: str) -> tuple[int, float]:
        """``(failures so far, not asked before)``; ``(0, 0.0)`` for a provider that answers."""
        return self._down.get(kind, (0, 0.0))

    def failed(self, kind: str, failures: int, until: float) -> None:
        self._down[kind] = (failures, until)

    def answered(self, kind: str) -> None:
        self._down.pop(kind, None)


class Observer:
    """Builds one ``Snapshot`` per tick (see the module docstring for the steps)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        *,
        registry: WorkerRegistry,
        providers: Mapping[str, Provider],
        pool_state: PoolStateStore,
        history: HistoryStore,
        demand: DemandReader,
        accountant: Accountant,
        backoff: ProviderBackoff,
        recorder: Recorder,
        fence: Callable[[], Awaitable[None]],
        intents_key: str,
        budget: GlobalBudget,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = registry
        self.providers = providers
        self.pool_state = pool_state
        self.history = history
        self.demand = demand
        self.accountant = accountant
        self.backoff = backoff
        self.recorder = recorder
        self.fence = fence
        self.intents_key = intents_key
        self.budget = budget
        self.clock = clock
        self.accounts = AccountWatcher(self.providers, clock=clock)  # balances, cached 60 s
        self.cost_per_task: dict[str, float] = {}  # pool -> spend / succeeded tasks

    def __repr__(self) -> str:
        return f"<Observer pools={len(self.settings.pools)} providers={sorted(self.providers)}>"

    async def observe(self) -> tuple[Snapshot, Observed]:
        """Build the snapshot ``plan`` decides on (and bring the registry in line first)."""
        now = self.clock()
        specs = {p.name: p for p in self.settings.pools}
        instances, listed, down = await self._list_instances(now)
        workers = {w.id: w for w in await self.registry.list_workers()}
        seen = Observed(specs, instances, workers, down)
        await self._recover_intents(seen, now)
        await self._sync(seen)
        pools = await self._pool_views(specs)
        stats = await self.demand.stats()
        waiting = await self.demand.waiting(specs, now)
        demand = with_fit_groups(demand_groups(specs, stats, waiting, now), specs, stats, now)
        views = tuple(
            worker_view(w, seen) for w in seen.workers.values() if w.state is not WS.deleted
        )
        self.accountant.note_ready(views)
        history = await self._history(pools, demand)
        inst_views = tuple(
            instance_view(inst, self._pool_of(inst, specs)) for inst in instances.values()
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
        """Record this tick's demand levels (and the boots ``note_ready`` noted), then read
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
            failures, until = self.backoff.state(kind.value)
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
                self.backoff.failed(kind.value, failures, now + delay)
                down.add(kind.value)
                logger.warning(
                    "reconciler: %s list failed (%s); not asking again for %.0f s",
                    kind.value,
                    why(exc),
                    delay,
                )
                continue
            if failures:
                logger.info("reconciler: %s answers again", kind.value)
            self.backoff.answered(kind.value)
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
                self.cost_per_task[spec.name] = runtime.spend_usd / runtime.succeeded
            views.append(
                PoolView.from_spec(
                    effective,
                    backoff_until=runtime.backoff_until,
                    backoff_reason=runtime.backoff_reason,
                    spend_today_usd=runtime.spend_today_usd,
                    parked_cost_per_hour=parked_cost_per_hour(spec),
                    max_step_per_tick=self.settings.scaling.max_step_per_tick,
                    max_spend_per_hour=spec.max_spend_per_hour,
                    max_spend_per_day=spec.max_spend_per_day,
                    park_timeout_s=spec.park_timeout_s,
                )
            )
        return tuple(views)

    # -- registry <-> provider ------------------------------------------------------------------

    async def _recover_intents(self, seen: Observed, now: float) -> None:
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
                await self.fence()
                worker = await register(self.registry, spec, inst, WS.provisioning)
                seen.workers[worker.id] = worker
                await self.redis.hdel(self.intents_key, name)
                await self.recorder.event(
                    "recover",
                    spec.name,
                    "ok",
                    "created instance found without a record",
                    worker=worker.id,
                    instance=inst.id,
                )
            elif now - float(intent.get("at", now)) > 2 * (spec.boot_timeout_s if spec else 600):
                await self.redis.hdel(self.intents_key, name)

    async def _sync(self, seen: Observed) -> None:
        """Move records to what their provider reports (only for providers listed this tick)."""
        fenced = False
        for w in list(seen.workers.values()):
            spec = seen.specs.get(w.pool)
            if spec is None or spec.provider is ProviderKind.static:
                continue
            if spec.provider.value in seen.down:
                continue
            inst = seen.instances.get((spec.provider.value, w.instance_id or w.id))
            steps = sync_steps(w, inst)
            if not steps or inst is None:
                continue
            if not fenced:
                await self.fence()
                fenced = True
            await self._sync_one(seen, spec, w, inst, steps)

    async def _sync_one(
        self,
        seen: Observed,
        spec: PoolSpec,
        w: Worker,
        inst: Instance,
        steps: list[tuple[WS | None, str]],
    ) -> None:
        reason = steps[-1][1]
        for new, why_ in steps:
            if new is not None and not await self.registry.transition(w.id, new, why_):
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
            await self.recorder.event(
                "sync",
                spec.name,
                "ok",
                reason,
                worker=w.id,
                instance=inst.id,
                state=moved.state.value,
            )


async def register(registry: WorkerRegistry, spec: PoolSpec, inst: Instance, state: WS) -> Worker:
    """Register ``inst`` as a worker of ``spec`` (a created, adopted or recovered instance)."""
    base_url = inst.base_url or ""
    if state is WS.provisioning and inst.state is InstanceState.running and base_url:
        state = WS.booting
    return await registry.register(
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


def sync_steps(w: Worker, inst: Instance | None) -> list[tuple[WS | None, str]]:
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
        why_ = inst.last_error or f"instance {s.value} outside gpufleet"
        return [(WS.stopping, why_), (parked[s], why_)]
    if w.state in PARKED_WORKER_STATES and s in (InstanceState.running, InstanceState.booting):
        return [(WS.booting, f"instance {s.value} again")]
    return []


def worker_view(w: Worker, seen: Observed) -> WorkerView:
    booting = w.state in BOOTING_WORKER_STATES
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


def instance_view(inst: Instance, pool: str) -> InstanceView:
    return InstanceView(
        instance_id=inst.id,
        provider=ProviderKind(inst.provider),
        name=inst.name,
        pool=pool,
        healthy=inst.state is InstanceState.running and bool(inst.base_url),
        created_at=inst.created_at or 0.0,
    )


def demand_groups(
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
