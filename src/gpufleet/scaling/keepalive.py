"""Keep-alive and parking: how long an idle worker is kept, and a parked one before deletion.

The ski-rental half of the scaling decision, pure like ``policy.py`` (which calls it) and held
to the same contract: no I/O, no clock, no randomness, no logging. Each answer is a function
of a ``PoolView`` (prices, boot guesses, knobs) and the pool's ``PoolHistory`` (idle gaps,
boot times): keep paying the idle (or parked) rent while it costs less than the cold starts it
avoids, a cold start billed as the boot at the GPU price plus the users' wait at
``wait_cost_per_hour``. With too little history, the break-even rule (rent = one cold start).
Worked numbers in docs/scaling.md.

Consumers: ``policy`` (scale-down victims, start ETAs, pre-warming, parked expiry), the trace
simulator's report, and ``snapshot.PoolView``'s docs. The hot helpers are memoised
(``lru_cache``: a histogram is immutable and hashable); ``bench/reconcile_scale.py`` clears
them between runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from gpufleet.scaling.history import (
    Histogram,
    PoolHistory,
    bucket_upper,
    bucket_value,
    merged_levels,
)
from gpufleet.scaling.snapshot import PoolView

# A parked worker is never kept longer than a week, whatever the cost model says: a stopped
# instance nobody revives in a week is clutter in the provider console.
MAX_PARK_S = 7 * 24 * 3600.0
# How much history is enough to trust it (weighted sample counts, see scaling/history.py);
# below these the policy uses its defaults: the break-even idle timeout, the configured boot
# guesses.
MIN_GAP_SAMPLES = 8.0
MIN_BOOT_SAMPLES = 3.0
NO_HISTORY = PoolHistory()


def park_timeout_s(pool: PoolView, history: PoolHistory | None = None) -> float:
    """How long a stopped worker stays parked before it is deleted.

    Ski rental: keep paying the parked rent (disk) until it adds up to what one cold start
    instead of a warm start would cost — the extra boot billed at the GPU price plus the users'
    extra wait at ``wait_cost_per_hour``. With an idle-gap history (``idle_timeout_s =
    "auto"``), the threshold is the one with the least expected cost over the gaps that
    outlast the idle timeout (the empirical ski rental); else the break-even above. Worked
    numbers in docs/scaling.md.
    """
    if pool.park_timeout_s is not None:
        return pool.park_timeout_s
    if pool.parked_cost_per_hour <= 0:
        return MAX_PARK_S
    penalty_s = max(0.0, expected_boot_s(pool, history, "create") - revive_s(pool, history))
    penalty_usd = penalty_s / 3600.0 * (pool.price_per_hour + wait_cost_per_hour(pool))
    break_even = min(MAX_PARK_S, penalty_usd / pool.parked_cost_per_hour * 3600.0)
    if pool.idle_timeout_auto and history is not None and history.idle_gaps_s:
        idle_s = keep_alive(pool, history, 1).timeout_s
        rent_per_s = pool.parked_cost_per_hour / 3600.0
        learned = _learned_park(history.idle_gaps_s, idle_s, rent_per_s, penalty_usd)
        # Never shorter than the break-even: a delete turns the next burst's revives into
        # creates for every worker it needs, which one gap's cost undercounts.
        return max(break_even, learned)
    return break_even


@lru_cache(maxsize=4096)
def _learned_park(
    idle_gaps_s: tuple[Histogram, ...], idle_s: float, rent_per_s: float, penalty_usd: float
) -> float:
    """Ski rental over what is left of the gaps that outlast the idle timeout; 0 if too few."""
    later = merged_levels(idle_gaps_s, 1).above(idle_s)
    if later.total < MIN_GAP_SAMPLES:
        return 0.0
    return _ski_rental(later, rent_per_s, penalty_usd, MAX_PARK_S)[0]


def wait_cost_per_hour(pool: PoolView) -> float:
    """What an hour of users waiting costs: ``wait_cost_per_hour``, else the GPU price."""
    return pool.price_per_hour if pool.wait_cost_per_hour is None else pool.wait_cost_per_hour


def expected_boot_s(pool: PoolView, history: PoolHistory | None, source: str) -> float:
    """Mean observed boot of ``source`` ("create" or "revive"), else the pool's guess —
    scaled by what the other source showed, if it did (creates seen at 6 s where 180 s was
    guessed make a 60 s revive guess 2 s: the two guesses keep their ratio)."""
    guess = {"create": pool.create_boot_s, "revive": pool.revive_boot_s}
    other = "revive" if source == "create" else "create"
    boots = history.boot_s if history is not None else {}
    seen, seen_other = boots.get(source), boots.get(other)
    if seen is not None and seen.total >= MIN_BOOT_SAMPLES:
        return seen.mean()
    if seen_other is not None and seen_other.total >= MIN_BOOT_SAMPLES and guess[other] > 0:
        return guess[source] * seen_other.mean() / guess[other]
    return guess[source]


def revive_s(pool: PoolView, history: PoolHistory | None) -> float:
    return expected_boot_s(pool, history, "revive")


@lru_cache(maxsize=4096)
def _ski_rental(
    gaps: Histogram, rent_per_s: float, cold_usd: float, ceiling_s: float
) -> tuple[float, float, float]:
    """The threshold T minimising E[rent x min(gap, T)] + P(gap > T) x cold_usd.

    Candidates are 0, every bucket's upper edge below ``ceiling_s``, and the ceiling: the
    expected cost is linear in T between them, so the best T is one of them. One pass over
    the buckets. Returns (T, expected cost per gap, P(gap > T)). Memoised: a histogram is
    immutable and hashable.
    """
    total = gaps.total
    if total <= 0:
        return ceiling_s, 0.0, 0.0
    below_sum = 0.0  # sum of w x value over buckets at or below the threshold
    below_w = 0.0
    best_t, best_cost, best_tail = 0.0, cold_usd, 1.0  # T = 0: every gap is a cold start
    for b, w in gaps.counts:
        t = bucket_upper(b)
        if t >= ceiling_s:
            break
        below_sum += w * bucket_value(b)
        below_w += w
        tail = (total - below_w) / total
        cost = rent_per_s * (below_sum + t * (total - below_w)) / total + tail * cold_usd
        if cost < best_cost - 1e-12:
            best_t, best_cost, best_tail = t, cost, tail
    tail = gaps.tail(ceiling_s)
    cost = rent_per_s * gaps.mean_min(ceiling_s) + tail * cold_usd
    if cost < best_cost - 1e-12:
        best_t, best_cost, best_tail = ceiling_s, cost, tail
    return best_t, best_cost, best_tail


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """How long an idle worker at a demand level is kept, and why (with the numbers)."""

    timeout_s: float
    why: str
    expected_idle_s: float  # expected idle time per gap under this timeout (its rent)


def keep_alive(pool: PoolView, history: PoolHistory | None, level: int) -> KeepAlive:
    """The idle timeout of the pool's ``level``-th worker.

    A fixed ``idle_timeout_s`` is used as it is. With "auto": the empirical ski rental over
    the level's idle gaps (levels above pooled in when a level has few gaps): keep the worker
    idle for T if the rent of waiting up to T costs less than the cold starts it avoids, a
    cold start costing a revive boot billed at the GPU price plus the users' wait at
    ``wait_cost_per_hour`` (the arrival that finds no worker and those arriving during the
    boot at the recent rate). With too few gaps: the break-even timeout (rent = one cold
    start), the classic 2-competitive rule.
    """
    if not pool.idle_timeout_auto:
        t = pool.idle_timeout_s
        return KeepAlive(t, f"idle_timeout_s={t:.0f}", t)
    past = history or NO_HISTORY
    # Users hit by one cold start: the arrival that finds no worker, plus those arriving
    # during the boot (rate x boot / 2 on average, this level's share of the pool's rate).
    boot = revive_s(pool, history)
    waiting = 1.0 + past.arrivals_per_s / max(1, level) * boot / 2.0
    waiting = 2.0 ** (round(math.log2(waiting) * 4.0) / 4.0)  # ~19% steps: the memo hits
    return _learned_keep_alive(
        pool.price_per_hour,
        wait_cost_per_hour(pool) * waiting,
        pool.idle_timeout_s,
        boot,
        past.idle_gaps_s,
        level,
    )


@lru_cache(maxsize=8192)
def _learned_keep_alive(
    price: float,
    wait_cost: float,
    ceiling: float,
    boot: float,
    idle_gaps_s: tuple[Histogram, ...],
    level: int,
) -> KeepAlive:
    cold_usd = boot / 3600.0 * (price + wait_cost)
    if price <= 0:
        return KeepAlive(ceiling, f"auto: free pool, kept up to {ceiling:.0f}s", ceiling)
    gaps, which = _gaps_for(idle_gaps_s, level)
    if gaps.total < MIN_GAP_SAMPLES:
        t = min(ceiling, boot * (price + wait_cost) / price)
        why = (
            f"auto: break-even {t:.0f}s = revive {boot:.0f}s x (${price:.2f} + "
            f"${wait_cost:.2f} of waiting)/${price:.2f} per hour "
            f"({gaps.total:.0f} idle gaps seen, need {MIN_GAP_SAMPLES:.0f})"
        )
        return KeepAlive(t, why, t)
    t, cost, tail = _ski_rental(gaps, price / 3600.0, cold_usd, ceiling)
    why = (
        f"auto: learned {t:.0f}s from {gaps.total:.0f} idle gaps of {which} "
        f"(median {gaps.quantile(0.5):.0f}s; P(gap>{t:.0f}s)={tail:.2f}; "
        f"expected ${cost:.4f}/gap vs cold start ${cold_usd:.4f})"
    )
    return KeepAlive(t, why, gaps.mean_min(t))


@lru_cache(maxsize=4096)
def _gaps_for(idle_gaps_s: tuple[Histogram, ...], level: int) -> tuple[Histogram, str]:
    """Level ``level``'s gaps; if too few, pooled with every level above; if still too few, all."""
    history = PoolHistory(idle_gaps_s=idle_gaps_s)
    own = history.gaps(level)
    if own.total >= MIN_GAP_SAMPLES:
        return own, f"level {level}"
    above = history.gaps_from(level)
    if above.total >= MIN_GAP_SAMPLES:
        return above, f"levels >= {level}"
    return history.all_gaps(), "all levels"


def idle_timeout_from_cost(pool: PoolView, history: PoolHistory | None = None) -> float:
    """The break-even idle timeout: idle rent equal to one revive (boot billed + users' wait).

    What "auto" uses while a pool has too few idle gaps to learn from.
    """
    if pool.price_per_hour <= 0:
        return pool.idle_timeout_s
    price = pool.price_per_hour
    return revive_s(pool, history) * (price + wait_cost_per_hour(pool)) / price
