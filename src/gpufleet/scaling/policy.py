"""The scaling decision: ``plan(snapshot) -> list[Action]``, a pure function.

No I/O, no clock, no randomness, no logging: the live reconciler, the trace simulator and the
unit tests all call this same function with a ``Snapshot`` and apply what it returns. Must not
import asyncio, redis, httpx, time, random or logging (tests/unit/test_purity.py checks).

One tick, in order (each step is a helper below):

1. failures: a worker not ready within ``boot_timeout_s`` is marked failed and its instance
   deleted; a failed record's instance is deleted; a record whose instance vanished from a
   provider list that succeeded is retired.
2. demand: each demand group is first matched against the supply its pools already have.
   Provisioning and booting workers count with all their slots, so the demand that caused a boot
   stays committed to it until the boot ends (no second wave while the first boots).
3. scale up what is left: an orphan of ours that is healthy, then a paused SURF workspace, then a
   stopped Novita instance, then a create in the cheapest pool per slot-hour; each pool bounded by
   ``max_workers``, ``max_step_per_tick``, its backoff deadline and the budgets. A refusal is a
   ``Hold`` with the reason. Then top every pool up to ``min_workers``.
4. scale down in tiers: an idle worker (idle ``idle_timeout_s`` since it was last busy or became
   ready) that demand does not need, with the pool above ``min_workers``, is drained and parked
   (Stop on Novita, Pause on SURF); a stopped Novita worker parked past ``park_timeout_s`` is
   deleted. Only workers with ``busy_slots == 0`` are ever victims.
5. orphans nobody adopted are deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.domain import ProviderKind, WorkerState
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
from gpufleet.scaling.snapshot import (
    CREATABLE_PROVIDERS,
    InstanceView,
    PoolView,
    Snapshot,
    WorkerView,
)

BOOTING_STATES = frozenset({WorkerState.provisioning, WorkerState.booting})
SUPPLY_STATES = frozenset({WorkerState.provisioning, WorkerState.booting, WorkerState.ready})
LIVE_STATES = SUPPLY_STATES | {WorkerState.draining}
# A parked worker is never kept longer than a week, whatever the cost model says: a stopped
# instance nobody revives in a week is clutter in the provider console.
MAX_PARK_S = 7 * 24 * 3600.0
BACKOFF_BASE_S = 30.0
BACKOFF_MAX_S = 900.0


def backoff_delay_s(
    failures: int, base_s: float = BACKOFF_BASE_S, max_s: float = BACKOFF_MAX_S
) -> float:
    """Exponential backoff after ``failures`` consecutive capacity/quota/boot failures, capped.

    30 s, 60 s, 120 s, … 900 s: a pool out of GPUs is retried a few times a minute at first,
    then every 15 minutes, never in a tight loop. The reconciler stores
    ``now + backoff_delay_s(n)`` as the pool's ``backoff_until``.
    """
    if failures <= 0:
        return 0.0
    return min(max_s, base_s * 2.0 ** min(failures - 1, 30))


def park_timeout_s(pool: PoolView) -> float:
    """How long a stopped worker stays parked before it is deleted.

    Ski rental: keep paying the parked rent (disk) until it adds up to what one cold start
    instead of a warm start would cost — the extra boot billed at the GPU price plus the users'
    extra wait at ``wait_cost_per_hour``. Worked numbers in docs/scaling.md.
    """
    if pool.park_timeout_s is not None:
        return pool.park_timeout_s
    if pool.parked_cost_per_hour <= 0:
        return MAX_PARK_S
    wait_cost = pool.price_per_hour if pool.wait_cost_per_hour is None else pool.wait_cost_per_hour
    penalty_h = max(0.0, pool.create_boot_s - pool.revive_boot_s) / 3600.0
    penalty_usd = penalty_h * (pool.price_per_hour + wait_cost)
    return min(MAX_PARK_S, penalty_usd / pool.parked_cost_per_hour * 3600.0)


def idle_timeout_from_cost(pool: PoolView) -> float:
    """The break-even idle timeout: idle rent equal to one revive (boot billed + users' wait).

    Not applied by ``plan`` (it uses the pool's ``idle_timeout_s``); the simulator reports it
    as a tuning suggestion next to the configured value.
    """
    wait_cost = pool.price_per_hour if pool.wait_cost_per_hour is None else pool.wait_cost_per_hour
    if pool.price_per_hour <= 0:
        return pool.idle_timeout_s
    return pool.revive_boot_s * (pool.price_per_hour + wait_cost) / pool.price_per_hour


def next_wake_s(snapshot: Snapshot) -> float | None:
    """The earliest future time at which ``plan`` would decide differently with no new events.

    Idle timeouts, park timeouts, boot timeouts and backoff deadlines. The reconciler may sleep
    until then (or its tick interval, whichever is sooner); the simulator skips idle time with it.
    """
    pools = {p.name: p for p in snapshot.pools}
    times: list[float] = [p.backoff_until for p in snapshot.pools if p.backoff_until]
    for w in snapshot.workers:
        p = pools.get(w.pool)
        if p is None:
            continue
        if w.state in BOOTING_STATES:
            times.append((w.boot_started_at or w.state_since) + p.boot_timeout_s)
        elif w.state is WorkerState.ready and w.idle_since is not None:
            times.append(w.idle_since + p.idle_timeout_s)
        elif w.state is WorkerState.stopped and p.can_create:
            times.append(w.state_since + park_timeout_s(p))
    future = [t for t in times if t > snapshot.now]
    return min(future) if future else None


@dataclass
class _PoolTally:
    """Working counts for one pool during one plan call (never leaves this module)."""

    view: PoolView
    live: int = 0
    supply_slots: int = 0
    unclaimed_slots: int = 0
    committed: int = 0
    started: int = 0
    rate_per_hour: float = 0.0
    parked: list[WorkerView] = field(default_factory=list)
    orphans: list[InstanceView] = field(default_factory=list)


@dataclass
class _Tick:
    snapshot: Snapshot
    pools: dict[str, _PoolTally]
    dead: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)
    rate_per_hour: float = 0.0
    actions: list[Action] = field(default_factory=list)
    held: set[tuple[str, str]] = field(default_factory=set)


def plan(snapshot: Snapshot) -> list[Action]:
    """Decide this tick's actions from ``snapshot`` alone (``snapshot.now`` is the clock)."""
    tick = _Tick(snapshot, {p.name: _PoolTally(p) for p in snapshot.pools})
    _fail_and_clean(tick)
    _count_supply(tick)
    _collect_orphans(tick)
    for demand in sorted(snapshot.demand, key=lambda d: d.key):
        need = _claim_supply(tick, demand.pools, demand.total)
        if need > 0:
            _scale_up(tick, demand.pools, need, f"{demand.total} tasks of {demand.key}")
    for name in sorted(tick.pools):
        _keep_minimum(tick, tick.pools[name])
    for name in sorted(tick.pools):
        _scale_down(tick, tick.pools[name])
        _expire_parked(tick, tick.pools[name])
    _delete_orphans(tick)
    return tick.actions


# --- 1. failures -----------------------------------------------------------------------------


def _fail_and_clean(tick: _Tick) -> None:
    snap = tick.snapshot
    listed = {(i.provider, i.instance_id) for i in snap.instances}
    for w in sorted(snap.workers, key=lambda w: w.id):
        pool = tick.pools.get(w.pool)
        if pool is None or w.state is WorkerState.deleted:
            continue
        p = pool.view
        if w.state in BOOTING_STATES:
            started = w.boot_started_at if w.boot_started_at is not None else w.state_since
            if snap.now - started >= p.boot_timeout_s:
                why = f"not ready {snap.now - started:.0f}s into boot (>= {p.boot_timeout_s:.0f}s)"
                tick.actions.append(MarkFailed(p.name, w.id, why))
                tick.actions.append(Delete(p.name, w.id, w.instance_id, f"boot timeout: {why}"))
                tick.dead.add(w.id)
        elif w.state is WorkerState.failed:
            tick.actions.append(Delete(p.name, w.id, w.instance_id, "worker failed"))
            tick.dead.add(w.id)
        elif (
            w.instance_id
            and p.provider in snap.listed_providers
            and (p.provider, w.instance_id) not in listed
            and w.state is not WorkerState.stopping
        ):
            why = f"instance {w.instance_id} vanished from the provider list"
            tick.actions.append(Delete(p.name, w.id, w.instance_id, why))
            tick.dead.add(w.id)


# --- 2. supply and demand --------------------------------------------------------------------


def _count_supply(tick: _Tick) -> None:
    for w in tick.snapshot.workers:
        pool = tick.pools.get(w.pool)
        if pool is None or w.id in tick.dead:
            continue
        if w.state in LIVE_STATES:
            pool.live += 1
            pool.rate_per_hour += pool.view.price_per_hour
            # A draining worker only supplies the slots its in-flight work already holds.
            slots = w.slots if w.state in SUPPLY_STATES else w.busy_slots
            pool.supply_slots += slots
            pool.unclaimed_slots += slots
        elif w.state in (WorkerState.stopped, WorkerState.paused):
            pool.parked.append(w)
            pool.rate_per_hour += pool.view.parked_cost_per_hour
    for pool in tick.pools.values():
        pool.parked.sort(key=lambda w: (-w.state_since, w.id))
        tick.rate_per_hour += pool.rate_per_hour


def _collect_orphans(tick: _Tick) -> None:
    known = {w.instance_id for w in tick.snapshot.workers if w.instance_id}
    for inst in sorted(tick.snapshot.instances, key=lambda i: i.instance_id):
        if inst.instance_id in known or inst.provider not in tick.snapshot.listed_providers:
            continue
        pool = tick.pools.get(inst.pool)
        if inst.provider not in CREATABLE_PROVIDERS:
            _adopt_fixed(tick, pool, inst)
        elif pool is not None and inst.healthy:
            pool.orphans.append(inst)
        else:
            why = "orphan of no configured pool" if pool is None else "unhealthy orphan"
            tick.actions.append(Delete(inst.pool, "", inst.instance_id, why))


def _adopt_fixed(tick: _Tick, pool: _PoolTally | None, inst: InstanceView) -> None:
    """A SURF workspace the registry does not know is registered, never deleted: the scaler
    did not create it and cannot create another."""
    if pool is None:
        return  # matches no pool's name filter: not ours to touch
    why = f"workspace {inst.name or inst.instance_id} is not in the registry"
    tick.actions.append(Adopt(pool.view.name, inst.instance_id, why))
    if inst.healthy:
        pool.live += 1
        pool.supply_slots += pool.view.slots
        pool.unclaimed_slots += pool.view.slots


def _by_price(tick: _Tick, names: tuple[str, ...]) -> list[_PoolTally]:
    pools = [tick.pools[n] for n in names if n in tick.pools]
    return sorted(pools, key=lambda p: (p.view.price_per_slot_hour, p.view.name))


def _claim_supply(tick: _Tick, names: tuple[str, ...], need: int) -> int:
    """Match demand to supply its pools already have; return what is left unmatched."""
    for pool in _by_price(tick, names):
        take = min(need, pool.unclaimed_slots)
        pool.unclaimed_slots -= take
        pool.committed += take
        need -= take
    return need


# --- 3. scale up -----------------------------------------------------------------------------


def _blocker(tick: _Tick, pool: _PoolTally) -> tuple[str, str] | None:
    """Why ``pool`` may not add a worker now, as (code, reason); None if it may."""
    p, snap = pool.view, tick.snapshot
    if p.provider is ProviderKind.static:
        return ("static", "static pool: capacity is fixed")
    if p.backoff_until is not None and snap.now < p.backoff_until:
        left = p.backoff_until - snap.now
        return ("backoff", f"backed off {left:.0f}s more ({p.backoff_reason or 'failures'})")
    if pool.live >= p.max_workers:
        return ("max_workers", f"at max_workers={p.max_workers}")
    if pool.started >= p.max_step_per_tick:
        return ("max_step", f"at max_step_per_tick={p.max_step_per_tick}")
    return _budget_blocker(tick, pool)


def _budget_blocker(tick: _Tick, pool: _PoolTally) -> tuple[str, str] | None:
    p, budget = pool.view, tick.snapshot.budget
    caps = (
        (p.max_spend_per_hour, pool.rate_per_hour + p.price_per_hour, "pool $/h"),
        (budget.max_spend_per_hour, tick.rate_per_hour + p.price_per_hour, "global $/h"),
        (p.max_spend_per_day, p.spend_today_usd, "pool $/day"),
        (budget.max_spend_per_day, budget.spend_today_usd, "global $/day"),
    )
    for cap, value, what in caps:
        if cap is None:
            continue
        if (value >= cap) if what.endswith("day") else (value > cap):
            return ("budget", f"{what} budget {cap:.2f} reached ({value:.2f})")
    return None


def _sources(tick: _Tick, pools: list[_PoolTally]) -> list[tuple[_PoolTally, Action]]:
    """Ways to add one worker, best first: adopt, resume, start, create."""
    out: list[tuple[_PoolTally, Action]] = []
    for pool in pools:
        if pool.orphans:
            inst = pool.orphans[0]
            out.append((pool, Adopt(pool.view.name, inst.instance_id, "")))
    for state, kind in ((WorkerState.paused, Resume), (WorkerState.stopped, Start)):
        for pool in pools:
            parked = [w for w in pool.parked if w.state is state and w.id not in tick.used]
            if parked:
                out.append((pool, kind(pool.view.name, parked[0].id, "")))
    out.extend((pool, Create(pool.view.name, "")) for pool in pools if pool.view.can_create)
    return out


def _scale_up(tick: _Tick, names: tuple[str, ...], need: int, why: str) -> None:
    while need > 0:
        pools = _by_price(tick, names)
        allowed = [p for p in pools if _blocker(tick, p) is None]
        choice = next(iter(_sources(tick, allowed)), None)
        if choice is None:
            _hold(tick, pools, why)
            return
        pool, action = choice
        _take(tick, pool, action, f"{why}: {need} slots uncovered")
        take = min(need, pool.view.slots)
        pool.committed += take
        pool.unclaimed_slots -= take
        need -= take


def _take(tick: _Tick, pool: _PoolTally, action: Action, reason: str) -> None:
    """Record ``action`` (with its reason) and count the worker it adds as supply."""
    if isinstance(action, Adopt):
        pool.orphans.pop(0)
        action = Adopt(action.pool, action.instance_id, reason)
    elif isinstance(action, Resume | Start):
        tick.used.add(action.worker_id)
        pool.rate_per_hour -= pool.view.parked_cost_per_hour
        tick.rate_per_hour -= pool.view.parked_cost_per_hour
        action = type(action)(action.pool, action.worker_id, reason)
    else:
        action = Create(pool.view.name, reason)
    tick.actions.append(action)
    pool.live += 1
    pool.started += 1
    pool.supply_slots += pool.view.slots
    pool.unclaimed_slots += pool.view.slots
    pool.rate_per_hour += pool.view.price_per_hour
    tick.rate_per_hour += pool.view.price_per_hour


def _hold(tick: _Tick, pools: list[_PoolTally], why: str) -> None:
    for pool in pools:
        blocked = _blocker(tick, pool)
        code, reason = blocked or ("no_source", "nothing to resume, start or create")
        if code in ("static", "max_step") or (pool.view.name, code) in tick.held:
            continue
        tick.held.add((pool.view.name, code))
        tick.actions.append(Hold(pool.view.name, code, f"{why}: {reason}"))


def _keep_minimum(tick: _Tick, pool: _PoolTally) -> None:
    while pool.live < pool.view.min_workers:
        if _blocker(tick, pool) is not None:
            _hold(tick, [pool], f"min_workers={pool.view.min_workers}")
            return
        choice = next(iter(_sources(tick, [pool])), None)
        if choice is None:
            return
        _take(tick, pool, choice[1], f"keep min_workers={pool.view.min_workers}")


# --- 4. scale down ---------------------------------------------------------------------------


def _park(pool: PoolView, worker_id: str, reason: str) -> Action:
    if pool.provider is ProviderKind.surf:
        return Pause(pool.name, worker_id, reason)
    return Stop(pool.name, worker_id, reason)


def _idle_victims(tick: _Tick, pool: _PoolTally) -> list[WorkerView]:
    now, timeout = tick.snapshot.now, pool.view.idle_timeout_s
    out = []
    for w in tick.snapshot.workers:
        if w.pool != pool.view.name or w.id in tick.dead or w.busy_slots > 0:
            continue
        idle_since = w.idle_since
        if w.state is WorkerState.draining or (
            w.state is WorkerState.ready and idle_since is not None and now - idle_since >= timeout
        ):
            out.append(w)
    return sorted(out, key=lambda w: (w.idle_since or 0.0, w.id))


def _scale_down(tick: _Tick, pool: _PoolTally) -> None:
    p = pool.view
    if p.provider is ProviderKind.static:
        return
    for w in _idle_victims(tick, pool):
        if pool.live - 1 < p.min_workers:
            return
        slots = w.slots if w.state is WorkerState.ready else 0
        if pool.supply_slots - slots < pool.committed:
            continue  # demand still needs this worker's slots
        idle_s = tick.snapshot.now - (w.idle_since or tick.snapshot.now)
        reason = f"idle {idle_s:.0f}s >= idle_timeout_s={p.idle_timeout_s:.0f}"
        if w.state is WorkerState.ready:
            tick.actions.append(Drain(p.name, w.id, reason))
        tick.actions.append(_park(p, w.id, reason))
        pool.live -= 1
        pool.supply_slots -= slots


def _expire_parked(tick: _Tick, pool: _PoolTally) -> None:
    p = pool.view
    if not p.can_create:
        return  # SURF workspaces and static URLs are a fixed set: never deleted by the scaler
    limit = park_timeout_s(p)
    for w in pool.parked:
        parked_s = tick.snapshot.now - w.state_since
        if w.state is WorkerState.stopped and w.id not in tick.used and parked_s >= limit:
            why = f"parked {parked_s:.0f}s >= park_timeout_s={limit:.0f}"
            tick.actions.append(Delete(p.name, w.id, w.instance_id, why))


def _delete_orphans(tick: _Tick) -> None:
    for pool in tick.pools.values():
        for inst in pool.orphans:
            why = "orphan not needed by demand"
            tick.actions.append(Delete(pool.view.name, "", inst.instance_id, why))
