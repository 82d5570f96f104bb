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

How long an idle worker is kept and a parked one waits (the ski-rental math) is
``scaling/keepalive.py``, pure under the same rules.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from gpufleet.domain import (
    BOOTING_WORKER_STATES,
    LIVE_WORKER_STATES,
    PARKED_WORKER_STATES,
    ProviderKind,
    WorkerState,
)
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
from gpufleet.scaling.history import Histogram, PoolHistory
from gpufleet.scaling.keepalive import (
    KeepAlive,
    expected_boot_s,
    keep_alive,
    park_timeout_s,
    revive_s,
    wait_cost_per_hour,
)
from gpufleet.scaling.snapshot import (
    CREATABLE_PROVIDERS,
    Demand,
    InstanceView,
    PoolView,
    Snapshot,
    WorkerView,
)

# What a pool holds as supply: live workers except draining ones (they take no new work).
SUPPLY_STATES = BOOTING_WORKER_STATES | {WorkerState.ready}
BACKOFF_BASE_S = 30.0
BACKOFF_MAX_S = 900.0
# How much service history is enough to trust it (weighted sample counts, see
# scaling/history.py); below it the policy scales up to cover every task. The idle-gap and
# boot thresholds are keepalive's.
MIN_SERVICE_SAMPLES = 5.0
# Work-aware scale-up predicts the waits of at most this many queued tasks (and as many
# expected arrivals): beyond that, the answer no longer changes.
MAX_PREDICTED_TASKS = 400
# The wait objective is checked with busy slots freeing after this quantile of the residual
# service time (the median; 0.75 and 0.9 were tried on the shipped traces: lower p95, but
# each costlier and with a worse score, so the median it is).
TARGET_QUANTILE = 0.5
# Pre-warming needs this many (decay-weighted) days of hourly arrivals: 1 + 1/2 + 1/4 = three
# days in a row, so one busy afternoon does not become a habit.
MIN_PREWARM_DAYS = 1.75


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


def next_wake_s(snapshot: Snapshot, include_due: bool = False) -> float | None:
    """The earliest future time at which ``plan`` would decide differently with no new events.

    Idle timeouts, park timeouts, boot timeouts and backoff deadlines. The reconciler may sleep
    until then (or its tick interval, whichever is sooner); the simulator skips idle time with it.
    ``include_due``: also timers already past (a learned keep-alive can shorten between two
    snapshots); the simulator then plans once more a tick later, as the live loop's next tick
    would.
    """
    pools = {p.name: p for p in snapshot.pools}
    times: list[float] = [p.backoff_until for p in snapshot.pools if p.backoff_until]
    keeps = {wid: k for p in snapshot.pools for wid, k in idle_keep_alives(snapshot, p).items()}
    parks: dict[str, float] = {}
    for w in snapshot.workers:
        p = pools.get(w.pool)
        if p is None:
            continue
        if w.state in BOOTING_WORKER_STATES:
            times.append((w.boot_started_at or w.state_since) + p.boot_timeout_s)
        elif w.state is WorkerState.ready and w.idle_since is not None and w.id in keeps:
            times.append(w.idle_since + keeps[w.id].timeout_s)
        elif w.state is WorkerState.stopped and p.can_create:
            if p.name not in parks:
                parks[p.name] = park_timeout_s(p, snapshot.history.get(p.name))
            times.append(w.state_since + parks[p.name])
    times += _prewarm_wakes(snapshot)
    future = [t for t in times if include_due or t > snapshot.now]
    return min(future) if future else None


def idle_keep_alives(snapshot: Snapshot, pool: PoolView) -> dict[str, KeepAlive]:
    """The keep-alive of every idle ready worker of ``pool``, by the demand level it holds.

    Busy and booting workers hold the lowest levels; idle ones are ranked from the most
    recently idle (the next level up) to the longest idle (the highest level).
    """
    mine = [w for w in snapshot.workers if w.pool == pool.name]
    idle = [w for w in mine if w.state is WorkerState.ready and w.idle_since is not None]
    held = sum(1 for w in mine if w.state in SUPPLY_STATES) - len(idle)
    idle.sort(key=lambda w: (-(w.idle_since or 0.0), w.id))
    history = snapshot.history.get(pool.name)
    return {w.id: keep_alive(pool, history, held + rank) for rank, w in enumerate(idle, 1)}


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
    # The most constrained work claims supply first (a task only one pool fits before work any
    # pool may take), so flexible work never takes the one slot constrained work could use.
    for demand in sorted(snapshot.demand, key=lambda d: (len(d.pools), d.key)):
        need = _claim_supply(tick, demand.pools, demand.total)
        if need > 0:
            starts, why = _worth_starting(tick, demand, need)
            if starts > 0:
                _scale_up(
                    tick, demand.pools, need, f"{demand.total} tasks of {demand.key}{why}", starts
                )
    for name in sorted(tick.pools):
        _keep_minimum(tick, tick.pools[name])
        _prewarm(tick, tick.pools[name])
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
        if w.state in BOOTING_WORKER_STATES:
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
        if w.state in LIVE_WORKER_STATES:
            pool.live += 1
            pool.rate_per_hour += pool.view.price_per_hour
            # A draining worker only supplies the slots its in-flight work already holds.
            slots = w.slots if w.state in SUPPLY_STATES else w.busy_slots
            pool.supply_slots += slots
            pool.unclaimed_slots += slots
        elif w.state in PARKED_WORKER_STATES:
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
    return _balance_blocker(tick, pool)


def _balance_blocker(tick: _Tick, pool: _PoolTally) -> tuple[str, str] | None:
    """Hold when the cloud account's balance would not pay the next hour of everything
    billed to it (all pools of the provider: one account) plus the worker to start. An
    account whose balance is unknown holds nothing."""
    provider = pool.view.provider
    balance = tick.snapshot.balances_usd.get(provider.value)
    if balance is None:
        return None
    burn = sum(p.rate_per_hour for p in tick.pools.values() if p.view.provider is provider)
    need = burn + pool.view.price_per_hour
    if need > balance:
        return (
            "balance",
            f"{provider.value} balance ${balance:.2f} would not cover the next hour "
            f"(${need:.2f}/h with this worker)",
        )
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


def _scale_up(
    tick: _Tick, names: tuple[str, ...], need: int, why: str, max_starts: int | None = None
) -> None:
    starts = 0
    while need > 0 and (max_starts is None or starts < max_starts):
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
        starts += 1


def _worth_starting(tick: _Tick, demand: Demand, need: int) -> tuple[int, str]:
    """How many workers to start for ``demand``'s ``need`` uncovered slots, and why.

    Without enough service history: ceil(need / slots), today's rule (every waiting task gets
    a slot). With it, a start must shorten the wait: predict when each waiting task (and the
    arrivals expected meanwhile) would start on the current supply — free slots now, busy
    slots after the mean residual service time, booting workers at their expected boot end —
    and add workers one at a time (each ready after its source's expected boot) while either
    the wait it saves, valued at ``wait_cost_per_hour``, outweighs its rent (boot + the idle
    tail its keep-alive expects), or the predicted longest wait is over ``target_wait_s`` and
    the start shortens it. Never more than ceil(need / slots): a burst starts at most
    ceil(D / slots) workers.
    """
    pools = _by_price(tick, demand.pools)
    if not pools:
        return 0, ""
    cheapest = pools[0].view
    most = -(-need // cheapest.slots)
    history = tick.snapshot.history.get(cheapest.name)
    service = history.service_s if history is not None else Histogram()
    if service.total < MIN_SERVICE_SAMPLES:
        return most, ""
    snap, names = tick.snapshot, set(demand.pools)
    mean_s, residual_s = service.mean(), service.mean_residual()
    slots_at: list[float] = []
    for w in snap.workers:
        if w.pool not in names or w.id in tick.dead:
            continue
        if w.state is WorkerState.ready:
            busy = min(w.busy_slots, w.slots)
            slots_at += [0.0] * (w.slots - busy) + [residual_s] * busy
        elif w.state in BOOTING_WORKER_STATES:
            source = "create" if w.ready_since is None else "revive"
            started = w.boot_started_at if w.boot_started_at is not None else w.state_since
            eta = expected_boot_s(cheapest, history, source) - (snap.now - started)
            slots_at += [max(0.0, eta)] * w.slots
    etas = _start_etas(tick, pools, history, most)
    rate = history.arrivals_per_s if history is not None and len(names) == 1 else 0.0
    horizon = (etas[0] if etas else 0.0) + mean_s
    expected = min(MAX_PREDICTED_TASKS, int(rate * horizon))
    arrivals = [0.0] * min(MAX_PREDICTED_TASKS, demand.queued + demand.waiting)
    arrivals += [(j + 0.5) / rate for j in range(expected)]
    waits = _predicted_waits(slots_at, arrivals, mean_s)
    cautious_busy = service.residual_quantile(TARGET_QUANTILE)
    cautious_at = [cautious_busy if t == residual_s else t for t in slots_at]
    cautious = _predicted_waits(cautious_at, arrivals, mean_s)
    first_max = max(cautious, default=0.0)
    price, wait_cost = cheapest.price_per_hour, wait_cost_per_hour(cheapest)
    live = sum(1 for w in snap.workers if w.pool == cheapest.name and w.state in SUPPLY_STATES)
    starts, saved_total = 0, 0.0
    for eta in etas:
        trial = _predicted_waits(slots_at + [eta] * cheapest.slots, arrivals, mean_s)
        cautious_trial = _predicted_waits(cautious_at + [eta] * cheapest.slots, arrivals, mean_s)
        saved = sum(waits) - sum(trial)
        tail = keep_alive(cheapest, history, live + starts + 1).expected_idle_s
        worth = saved * wait_cost >= (eta + tail) * price
        longest = max(cautious, default=0.0)
        late = longest > cheapest.target_wait_s and max(cautious_trial) < longest
        if not (worth or late):
            break
        slots_at += [eta] * cheapest.slots
        cautious_at += [eta] * cheapest.slots
        waits, cautious = trial, cautious_trial
        starts, saved_total = starts + 1, saved_total + saved
    if starts == 0:
        return 0, ""
    why = (
        f" ({len(arrivals)} waiting or expected; predicted longest wait {_secs(first_max)} -> "
        f"{_secs(max(cautious, default=0.0))} with {starts} start(s), saving "
        f"{_secs(saved_total)} of waiting; service mean {mean_s:.0f}s from "
        f"{service.total:.0f} samples, next boot ~{etas[0]:.0f}s, "
        f"target_wait_s={cheapest.target_wait_s:.0f})"
    )
    return starts, why


def _secs(value: float) -> str:
    return "unbounded" if math.isinf(value) else f"{value:.0f}s"


def _start_etas(
    tick: _Tick, pools: list[_PoolTally], history: PoolHistory | None, most: int
) -> list[float]:
    """Expected boot of the next ``most`` starts, in the order ``_sources`` would take them."""
    etas: list[float] = []
    for pool in pools:
        etas += [0.0] * len(pool.orphans)
    for pool in pools:
        parked = sum(1 for w in pool.parked if w.id not in tick.used)
        etas += [revive_s(pool.view, history)] * parked
    if any(p.view.can_create for p in pools):
        create = expected_boot_s(pools[0].view, history, "create")
        etas += [create] * max(0, most - len(etas))
    return etas[:most]


def _predicted_waits(slots_at: list[float], arrivals: list[float], service_s: float) -> list[float]:
    """FIFO list scheduling: each task takes the first slot free at or after it arrives and
    holds it ``service_s``. ``inf`` for every task when there is no slot at all."""
    if not slots_at:
        return [math.inf] * len(arrivals)
    heap = list(slots_at)
    heapq.heapify(heap)
    waits = []
    for at in arrivals:
        free = heapq.heappop(heap)
        start = max(free, at)
        waits.append(start - at)
        heapq.heappush(heap, start + service_s)
    return waits


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


def prewarm_gain(pool: PoolView, history: PoolHistory | None, at: float) -> tuple[float, str]:
    """Expected $ a worker started now saves (negative: costs), for an empty, idle pool.

    Demand recurring by time of day: with arrivals at rate r (this hour of day, averaged over
    the days seen) a worker ready after a revive B and kept T (its keep-alive) meets an
    arrival with p = 1 - exp(-r T). It saves that arrival's wait, B at ``wait_cost_per_hour``,
    with probability p; it costs its boot when nobody comes (probability 1 - p) and its idle
    rent until the arrival, E[min(first arrival, T)] = p / r. (Shahrad et al., ATC 2020:
    histogram keep-alive plus pre-warming.)
    """
    if history is None or history.days_observed < MIN_PREWARM_DAYS:
        return -math.inf, ""
    boot = revive_s(pool, history)
    rate = history.hourly_rate_per_s(at + boot)
    if rate <= 0:
        return -math.inf, ""
    keep = keep_alive(pool, history, 1).timeout_s
    p = 1.0 - math.exp(-rate * keep)
    saved = p * boot / 3600.0 * wait_cost_per_hour(pool)
    cost = pool.price_per_hour / 3600.0 * (boot * (1.0 - p) + p / rate)
    why = (
        f"pre-warm: {rate * 3600:.0f} arrivals/h expected at this hour (over "
        f"{history.days_observed:.1f} weighted days); P(arrival within keep-alive "
        f"{keep:.0f}s)={p:.2f}; saves ${saved:.4f} of waiting vs ${cost:.4f} boot+idle"
    )
    return saved - cost, why


def _prewarm(tick: _Tick, pool: _PoolTally) -> None:
    """Start one worker ahead of demand that recurs at this hour, when it pays (above)."""
    p = pool.view
    if pool.live > 0 or pool.committed > 0 or _blocker(tick, pool) is not None:
        return
    gain, why = prewarm_gain(p, tick.snapshot.history.get(p.name), tick.snapshot.now)
    if gain <= 0:
        return
    choice = next(iter(_sources(tick, [pool])), None)
    if choice is not None:
        _take(tick, pool, choice[1], why)


def _prewarm_wakes(snapshot: Snapshot) -> list[float]:
    """When the hour a revive would land in changes, for empty pools with hourly history."""
    out = []
    for p in snapshot.pools:
        h = snapshot.history.get(p.name)
        if h is None or h.days_observed < MIN_PREWARM_DAYS:
            continue
        boot = revive_s(p, h)
        out.append((math.floor((snapshot.now + boot) / 3600.0) + 1) * 3600.0 - boot)
    return out


# --- 4. scale down ---------------------------------------------------------------------------


def _park(pool: PoolView, worker_id: str, reason: str) -> Action:
    if pool.provider is ProviderKind.surf:
        return Pause(pool.name, worker_id, reason)
    return Stop(pool.name, worker_id, reason)


def _idle_victims(tick: _Tick, pool: _PoolTally) -> list[tuple[WorkerView, str]]:
    """Idle workers past their keep-alive (and draining ones), longest idle first, with why."""
    now = tick.snapshot.now
    keeps = idle_keep_alives(tick.snapshot, pool.view)
    out = []
    for w in tick.snapshot.workers:
        if w.pool != pool.view.name or w.id in tick.dead or w.busy_slots > 0:
            continue
        if w.state is WorkerState.draining:
            out.append((w, "draining"))
            continue
        keep = keeps.get(w.id)
        if keep is None or w.idle_since is None or now - w.idle_since < keep.timeout_s:
            continue
        idle_s = now - w.idle_since
        if pool.view.idle_timeout_auto:
            why = f"idle {idle_s:.0f}s >= idle timeout {keep.timeout_s:.0f}s ({keep.why})"
        else:
            why = f"idle {idle_s:.0f}s >= idle_timeout_s={keep.timeout_s:.0f}"
        out.append((w, why))
    return sorted(out, key=lambda pair: (pair[0].idle_since or 0.0, pair[0].id))


def _scale_down(tick: _Tick, pool: _PoolTally) -> None:
    p = pool.view
    if p.provider is ProviderKind.static:
        return
    for w, reason in _idle_victims(tick, pool):
        if pool.live - 1 < p.min_workers:
            return
        slots = w.slots if w.state is WorkerState.ready else 0
        if pool.supply_slots - slots < pool.committed:
            continue  # demand still needs this worker's slots
        if w.state is WorkerState.ready:
            tick.actions.append(Drain(p.name, w.id, reason))
        tick.actions.append(_park(p, w.id, reason))
        pool.live -= 1
        pool.supply_slots -= slots


def _expire_parked(tick: _Tick, pool: _PoolTally) -> None:
    p = pool.view
    if not p.can_create:
        return  # SURF workspaces and static URLs are a fixed set: never deleted by the scaler
    stopped = [w for w in pool.parked if w.state is WorkerState.stopped and w.id not in tick.used]
    if not stopped:
        return
    limit = park_timeout_s(p, tick.snapshot.history.get(p.name))
    for w in stopped:
        parked_s = tick.snapshot.now - w.state_since
        if parked_s >= limit:
            why = f"parked {parked_s:.0f}s >= park_timeout_s={limit:.0f}"
            tick.actions.append(Delete(p.name, w.id, w.instance_id, why))


def _delete_orphans(tick: _Tick) -> None:
    for pool in tick.pools.values():
        for inst in pool.orphans:
            why = "orphan not needed by demand"
            tick.actions.append(Delete(pool.view.name, "", inst.instance_id, why))
