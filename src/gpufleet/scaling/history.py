"""What a pool's past says: service, boot and idle-gap distributions, arrival rates (pure).

The scaling policy learns from each pool's history instead of fixed guesses. This module holds
the data types and the arithmetic; it does no I/O and reads no clock (``policy.py`` imports it,
and the purity test covers it). Two recorders fill the same windows with the same rules:

- the live service (``store/history.py``): task and proxied-request arrivals when they are
  accepted, service durations when work finishes, boot durations when a worker becomes ready,
  idle gaps from the reconciler's demand levels; kept in Redis, shared by replicas, bounded;
- the simulator (``HistoryBook`` below): the same records from the simulated past.

Both hand ``policy.plan`` a ``PoolHistory`` (``Snapshot.history[pool]``), so simulated and live
fleets decide alike.

Bounded: every distribution is a log-bucketed histogram (4 buckets per doubling, ~19 % wide,
from 0.1 s to ~2 weeks: at most ~100 buckets) kept per UTC day; a summary sums the last
``WINDOW_DAYS`` days, each older day weighing half as much as the next
(``DAY_DECAY``), so a pool's traffic of last week still counts but today's counts most.

Idle gaps are measured per demand *level*: level k is "at least k workers' worth of work"
(``ceil(demand / slots) >= k``). When demand falls below k, level k's gap opens; when demand
reaches k again, the gap closes and is recorded. The k-th worker of a pool is the one that
level k keeps busy, so its keep-alive is chosen from level k's gaps (``idle_gaps_s[k-1]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache

# --- log-bucketed histograms ----------------------------------------------------------------

BUCKETS_PER_DOUBLING = 4
BUCKET_FLOOR_S = 0.1  # values below fall into bucket 0
MAX_BUCKET = 100  # 0.1 s * 2**(100/4) ~ 39 days: everything longer lands here
DAY_S = 86400.0
WINDOW_DAYS = 7
DAY_DECAY = 0.5  # yesterday's samples weigh half of today's, the day before a quarter, ...
LEVELS = 16  # idle gaps are kept for levels 1..LEVELS; higher levels share the last one
RATE_WINDOW_S = 600.0  # the recent arrival rate is measured over the last ten minutes
RATE_BUCKET_S = 60.0  # arrivals are counted per minute for it
# Idle gaps shorter than this are not recorded: no scaler parks a worker that fast (the
# reconciler ticks every few seconds), so they carry no information about keep-alive, and
# demand that flickers between levels within a second would drown the real gaps.
MIN_GAP_S = 5.0


def bucket_of(value_s: float) -> int:
    """The bucket a duration falls into (0 for anything at or below ``BUCKET_FLOOR_S``)."""
    if not value_s > BUCKET_FLOOR_S:  # also catches NaN
        return 0
    if math.isinf(value_s):
        return MAX_BUCKET
    i = int(math.floor(BUCKETS_PER_DOUBLING * math.log2(value_s / BUCKET_FLOOR_S)))
    return max(0, min(MAX_BUCKET, i))


_VALUES = tuple(
    float(BUCKET_FLOOR_S * 2.0 ** ((i + 0.5) / BUCKETS_PER_DOUBLING)) for i in range(MAX_BUCKET + 1)
)
_UPPERS = tuple(
    float(BUCKET_FLOOR_S * 2.0 ** ((i + 1) / BUCKETS_PER_DOUBLING)) for i in range(MAX_BUCKET + 1)
)


def bucket_value(i: int) -> float:
    """The representative (geometric middle) of bucket ``i``, in seconds."""
    if 0 <= i <= MAX_BUCKET:
        return _VALUES[i]
    return float(BUCKET_FLOOR_S * 2.0 ** ((i + 0.5) / BUCKETS_PER_DOUBLING))


def bucket_upper(i: int) -> float:
    """The upper edge of bucket ``i``: every value in buckets <= i is below it."""
    if 0 <= i <= MAX_BUCKET:
        return _UPPERS[i]
    return float(BUCKET_FLOOR_S * 2.0 ** ((i + 1) / BUCKETS_PER_DOUBLING))


@dataclass(frozen=True)
class Histogram:
    """Weighted counts of durations per log bucket. Immutable: ``merge`` returns a new one;
    its total, mean and hash are computed once (the policy asks for them on every tick)."""

    counts: tuple[tuple[int, float], ...] = ()  # (bucket, weight), sorted by bucket

    def __hash__(self) -> int:
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash(self.counts)

    @classmethod
    def of(cls, counts: Mapping[int, float]) -> Histogram:
        return cls(tuple(sorted((int(b), float(w)) for b, w in counts.items() if w > 0)))

    @classmethod
    def from_samples(cls, samples: Iterable[float]) -> Histogram:
        counts: dict[int, float] = {}
        for s in samples:
            b = bucket_of(s)
            counts[b] = counts.get(b, 0.0) + 1.0
        return cls.of(counts)

    def as_dict(self) -> dict[int, float]:
        return dict(self.counts)

    def merge(self, other: Histogram, weight: float = 1.0) -> Histogram:
        out = self.as_dict()
        for b, w in other.counts:
            out[b] = out.get(b, 0.0) + w * weight
        return Histogram.of(out)

    @cached_property
    def total(self) -> float:
        return sum(w for _, w in self.counts)

    def mean(self) -> float:
        return self._mean

    @cached_property
    def _mean(self) -> float:
        total = self.total
        return sum(w * bucket_value(b) for b, w in self.counts) / total if total else 0.0

    def mean_residual(self) -> float:
        """E[S^2] / (2 E[S]): how long a job caught in progress still runs, on average
        (renewal theory). Half the mean for equal jobs, more when some jobs are long."""
        return self._mean_residual

    @cached_property
    def _mean_residual(self) -> float:
        total = self.total
        if not total:
            return 0.0
        m1 = sum(w * bucket_value(b) for b, w in self.counts) / total
        m2 = sum(w * bucket_value(b) ** 2 for b, w in self.counts) / total
        return m2 / (2.0 * m1) if m1 > 0 else 0.0

    @lru_cache(maxsize=64)  # noqa: B019 - a frozen, hashable value: the cache holds nothing alive
    def residual_quantile(self, q: float) -> float:
        """The q-quantile of how long a job caught in progress still runs (renewal theory:
        density (1 - F(x)) / mean), from the bucket representatives."""
        total, mean = self.total, self.mean()
        if not total or mean <= 0:
            return 0.0
        running, prev, area, left = 0.0, 0.0, 0.0, 1.0
        for b, w in self.counts:
            v = bucket_value(b)
            step = left * (v - prev) / mean  # 1 - F stays `left` on [prev, v)
            if area + step >= q:
                return prev + (q - area) * mean / left
            area += step
            running += w
            left = max(0.0, 1.0 - running / total)
            prev = v
        return prev

    def quantile(self, q: float) -> float:
        total = self.total
        if not total:
            return 0.0
        running = 0.0
        for b, w in self.counts:
            running += w
            if running >= q * total:
                return bucket_value(b)
        return bucket_value(self.counts[-1][0])

    def tail(self, threshold_s: float) -> float:
        """P(X > threshold), values taken at their bucket's representative."""
        total = self.total
        if not total:
            return 0.0
        return sum(w for b, w in self.counts if bucket_value(b) > threshold_s) / total

    def mean_min(self, threshold_s: float) -> float:
        """E[min(X, threshold)]."""
        total = self.total
        if not total:
            return 0.0
        return sum(w * min(bucket_value(b), threshold_s) for b, w in self.counts) / total

    def above(self, threshold_s: float) -> Histogram:
        """The distribution above ``threshold_s``, shifted down by it: X - t given X > t."""
        shifted: dict[int, float] = {}
        for b, w in self.counts:
            v = bucket_value(b)
            if v > threshold_s:
                nb = bucket_of(v - threshold_s)
                shifted[nb] = shifted.get(nb, 0.0) + w
        return Histogram.of(shifted)


# --- the summary plan() reads ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolHistory:
    """One pool's past, as ``policy.plan`` sees it (``Snapshot.history[pool]``).

    Empty histograms mean "not known yet": the policy then falls back to its documented
    defaults (today's rules).
    """

    service_s: Histogram = Histogram()
    # "create" (a fresh instance) and "revive" (start of a stopped one, resume of a paused one)
    boot_s: Mapping[str, Histogram] = field(default_factory=dict)
    # idle_gaps_s[k-1]: gaps of demand level k (the last entry also collects higher levels)
    idle_gaps_s: tuple[Histogram, ...] = ()
    arrivals_per_s: float = 0.0  # lately (see ``recent_rate``)
    arrivals: float = 0.0  # weighted count of arrivals in the window (days, decayed)
    # Mean arrivals in each hour of the (UTC) day over the days observed, and how many
    # (weighted) days that mean rests on: what pre-warming reads.
    arrivals_by_hour: tuple[float, ...] = ()
    days_observed: float = 0.0

    def hourly_rate_per_s(self, at: float) -> float:
        """Expected arrivals per second in the hour of day that contains ``at``."""
        if not self.arrivals_by_hour:
            return 0.0
        return self.arrivals_by_hour[hour_of_day(at)] / 3600.0

    def gaps(self, level: int) -> Histogram:
        """Level ``level``'s idle gaps (1-based); empty when none were seen."""
        if not self.idle_gaps_s or level < 1:
            return Histogram()
        return self.idle_gaps_s[min(level, len(self.idle_gaps_s)) - 1]

    def gaps_from(self, level: int) -> Histogram:
        """Gaps of ``level`` and every level above it, merged (the pooled fallback)."""
        return merged_levels(self.idle_gaps_s, level)

    def all_gaps(self) -> Histogram:
        return self.gaps_from(1)


@lru_cache(maxsize=4096)
def merged_levels(idle_gaps_s: tuple[Histogram, ...], level: int) -> Histogram:
    """Levels ``level`` and up merged into one histogram (memoised: histograms are immutable)."""
    out: dict[int, float] = {}
    for h in idle_gaps_s[max(0, level - 1) :]:
        for b, w in h.counts:
            out[b] = out.get(b, 0.0) + w
    return Histogram.of(out)


# --- recording: the rules both recorders follow -----------------------------------------------


def day_of(t: float) -> int:
    return int(t // DAY_S)


def hour_of_day(t: float) -> int:
    return int((t % DAY_S) // 3600.0)


def day_weight(day: int, today: int) -> float:
    """How much a day's samples count in a summary made on ``today`` (0 outside the window)."""
    age = today - day
    if age >= WINDOW_DAYS:
        return 0.0
    return float(DAY_DECAY ** max(0, age))


def level_of(demand: int, slots: int) -> int:
    """Workers' worth of demand: ceil(demand / slots)."""
    return -(-max(0, demand) // max(1, slots))


def step_levels(
    open_since: Mapping[int, float], prev_level: int, level: int, now: float
) -> tuple[dict[int, float], list[tuple[int, float]]]:
    """Advance the per-level gap clocks from ``prev_level`` to ``level`` at ``now``.

    Returns the new open gaps (level -> since when) and the gaps that closed, as
    (level, seconds); gaps under ``MIN_GAP_S`` close without being returned. Levels that
    drop open a gap; levels that come back close theirs. Only levels up to ``LEVELS`` are
    tracked individually; anything above is clipped, so the state stays bounded.
    """
    cap = LEVELS
    prev_level, level = min(prev_level, cap), min(level, cap)
    opened = dict(open_since)
    closed: list[tuple[int, float]] = []
    for k in range(level + 1, prev_level + 1):  # levels falling idle
        opened.setdefault(k, now)
    for k in range(1, level + 1):  # levels in use: close their gaps
        since = opened.pop(k, None)
        if since is not None and now - since >= MIN_GAP_S:
            closed.append((k, now - since))
    return opened, closed


def recent_rate(per_minute: Mapping[int, float], now: float) -> float:
    """Arrivals per second lately, from counts per minute (minute = int(t // 60)).

    The higher of the rate over the last two minutes (this one so far and the one before:
    a burst shows within seconds) and over the last ``RATE_WINDOW_S`` (steady traffic).
    """
    minute = int(now // RATE_BUCKET_S)
    first = minute - int(RATE_WINDOW_S // RATE_BUCKET_S) + 1
    window = sum(n for m, n in per_minute.items() if first <= m <= minute)
    lately = per_minute.get(minute, 0.0) + per_minute.get(minute - 1, 0.0)
    lately_s = RATE_BUCKET_S + (now - minute * RATE_BUCKET_S)
    return max(window / RATE_WINDOW_S, lately / max(1.0, lately_s))


def summarize(
    days: Mapping[int, Mapping[str, Mapping[int, float]]],
    now: float,
    arrivals_per_s: float = 0.0,
) -> PoolHistory:
    """Build the ``PoolHistory`` from per-day histogram counts (metric -> bucket -> weight).

    Metric names: ``service``, ``boot:create``, ``boot:revive``, ``gap:<level>`` (buckets of
    ``bucket_of``), ``arrivals`` (bucket = the hour of day, 0-23: a count per hour) and
    ``days`` (bucket 0 set to 1 once on each day that saw an arrival). ``arrivals_per_s`` is
    the arrival rate lately (``recent_rate``). The live store and the simulator both call this.
    """
    today = day_of(now)
    merged: dict[str, dict[int, float]] = {}
    for day, metrics in days.items():
        w = day_weight(day, today)
        if w <= 0:
            continue
        for metric, counts in metrics.items():
            into = merged.setdefault(metric, {})
            for b, c in counts.items():
                into[int(b)] = into.get(int(b), 0.0) + float(c) * w
    hists = {metric: Histogram.of(counts) for metric, counts in merged.items()}
    return assemble(hists, arrivals_per_s)


def assemble(hists: Mapping[str, Histogram], arrivals_per_s: float = 0.0) -> PoolHistory:
    """A ``PoolHistory`` from per-metric histograms (see ``summarize`` for the names)."""
    gaps = [hists.get(f"gap:{level}", Histogram()) for level in range(1, LEVELS + 1)]
    while gaps and not gaps[-1].total:
        gaps.pop()
    by_hour = hists.get("arrivals", Histogram()).as_dict()
    days = hists.get("days", Histogram()).total
    hourly = tuple(by_hour.get(h, 0.0) / days for h in range(24)) if days > 0 else ()
    return PoolHistory(
        arrivals_by_hour=hourly,
        days_observed=days,
        service_s=hists.get("service", Histogram()),
        boot_s={
            src: hists[f"boot:{src}"] for src in ("create", "revive") if f"boot:{src}" in hists
        },
        idle_gaps_s=tuple(gaps),
        arrivals_per_s=arrivals_per_s,
        arrivals=sum(by_hour.values()),
    )


class HistoryBook:
    """An in-memory recorder with the live store's rules (used by the simulator and tests).

    Keeps, per pool, the per-day counts and their decayed merge for the current day, so a
    summary costs one histogram build per metric that changed (the simulator asks for one on
    every event). Not shared: the live service keeps the same windows in Redis
    (``store/history.py``).
    """

    def __init__(self) -> None:
        self._days: dict[str, dict[int, dict[str, dict[int, float]]]] = {}
        self._merged: dict[str, dict[str, dict[int, float]]] = {}
        self._today: dict[str, int] = {}
        self._hists: dict[str, dict[str, Histogram]] = {}  # pool -> metric -> built
        self._built: dict[str, PoolHistory] = {}
        self._levels: dict[str, tuple[int, dict[int, float]]] = {}
        self._recent: dict[str, dict[int, float]] = {}  # pool -> minute -> arrivals

    def _roll(self, pool: str, t: float) -> None:
        today = day_of(t)
        if self._today.get(pool) == today:
            return
        days = self._days.setdefault(pool, {})
        for d in [d for d in days if today - d >= WINDOW_DAYS]:
            del days[d]
        merged: dict[str, dict[int, float]] = {}
        for day, metrics in days.items():
            w = day_weight(day, today)
            for metric, counts in metrics.items():
                into = merged.setdefault(metric, {})
                for b, c in counts.items():
                    into[b] = into.get(b, 0.0) + c * w
        self._merged[pool], self._today[pool] = merged, today
        self._hists.pop(pool, None)
        self._built.pop(pool, None)

    def _add(self, pool: str, t: float, metric: str, value_s: float, weight: float = 1.0) -> None:
        self._add_to(pool, t, metric, bucket_of(value_s), weight)

    def _add_to(self, pool: str, t: float, metric: str, b: int, weight: float = 1.0) -> None:
        self._roll(pool, t)
        weight_now = day_weight(day_of(t), self._today[pool])
        day = self._days.setdefault(pool, {}).setdefault(day_of(t), {}).setdefault(metric, {})
        day[b] = day.get(b, 0.0) + weight
        merged = self._merged[pool].setdefault(metric, {})
        merged[b] = merged.get(b, 0.0) + weight * weight_now
        self._hists.get(pool, {}).pop(metric, None)
        self._built.pop(pool, None)

    def arrival(self, pool: str, t: float, n: int = 1) -> None:
        day = self._days.get(pool, {}).get(day_of(t), {})
        if "days" not in day:
            self._add_to(pool, t, "days", 0, 1.0)
        self._add_to(pool, t, "arrivals", hour_of_day(t), float(n))
        minutes = self._recent.setdefault(pool, {})
        m = int(t // RATE_BUCKET_S)
        minutes[m] = minutes.get(m, 0.0) + n
        for old in [k for k in minutes if k < m - RATE_WINDOW_S / RATE_BUCKET_S]:
            del minutes[old]

    def service(self, pool: str, t: float, seconds: float) -> None:
        self._add(pool, t, "service", seconds)

    def boot(self, pool: str, t: float, source: str, seconds: float) -> None:
        self._add(pool, t, f"boot:{source}", seconds)

    def demand(self, pool: str, t: float, demand: int, slots: int) -> None:
        """The pool's demand (queued + waiting + in flight) at ``t``: tracks level gaps."""
        prev, opened = self._levels.get(pool, (0, {}))
        level = level_of(demand, slots)
        if level == prev:
            return
        opened, closed = step_levels(opened, prev, level, t)
        for k, gap in closed:
            self._add(pool, t, f"gap:{k}", gap)
        self._levels[pool] = (level, opened)

    def summary(self, pool: str, now: float) -> PoolHistory:
        self._roll(pool, now)
        rate = recent_rate(self._recent.get(pool, {}), now)
        built = self._built.get(pool)
        if built is None:
            hists = self._hists.setdefault(pool, {})
            for metric, counts in self._merged[pool].items():
                if metric not in hists:
                    hists[metric] = Histogram.of(counts)
            built = assemble(hists)
            self._built[pool] = built
        return replace(built, arrivals_per_s=rate)
