"""Each pool's history in Redis: the live recorder of ``scaling.history`` (shared, bounded).

The scaler learns from what a pool's past says (``scaling/history.py``: service times, boot
times per source, idle gaps per demand level, the recent arrival rate). The simulator keeps
those windows in memory (``HistoryBook``); the live service keeps the very same windows here,
with the same rules (``bucket_of``, ``day_of``, ``level_of``, ``step_levels``, ``summarize``),
so a fleet decides alike in the simulator and live. ``tests/unit/test_history_store.py`` feeds
both the same events and checks the summaries are equal.

What is recorded, and by whom (every replica records; the reconciler leader reads):

- **arrivals**: a task accepted by ``TaskQueue.enqueue`` (a task naming only an engine counts
  for that engine's cheapest pool per slot-hour, the pool ``policy`` would start first: see
  ``pool_for_engine``); a proxied request once it holds a slot (``ProxyService``);
- **service**: a queued task acked by the dispatcher (lease to ack), a proxied request (slot
  taken to slot released); pool-level, and per model for the pool's configured models;
- **boot**: ``create`` for a worker's first boot, ``revive`` for a start / resume, measured by
  the reconciler when the worker turns ready;
- **demand levels** (leader only, once a tick): per-level open gap starts and the previous
  level, closed gaps recorded as ``gap:<level>`` samples.

Redis layout (``P`` = prefix; pool names hold no ``:``; names from ``Keys.history_*``):

- ``P:history:{pool}:day:{YYYY-MM-DD}`` HASH, one UTC day's histograms: field
  ``"{metric}|{bucket}"`` -> weight (HINCRBYFLOAT), metrics ``arrivals`` (bucket = hour of
  the day, a count), ``days`` (bucket 0 set to 1 on a day with arrivals),
  ``service``, ``service@{model}``, ``boot:create``, ``boot:revive``, ``gap:1`` ..
  ``gap:16``. EXPIRE ``WINDOW_DAYS + 1`` days, renewed by every write.
- ``P:history:{pool}:arrivals:{minute}`` STRING counter of arrivals in that minute (epoch
  minute, INCRBY); EXPIRE ``RATE_WINDOW_S + 120`` s.
- ``P:history:{pool}:minutes:{YYYY-MM-DD}`` HASH, one UTC day's arrivals per minute: field
  minute of the day (``0`` .. ``1439``) -> count (HINCRBY), written in the same pipeline as
  the counter above; EXPIRE ``WINDOW_DAYS + 1`` days, renewed by every write. Only
  ``export`` reads it (``summary``, the reconciler's tick, does not).
- ``P:history:{pool}:levels`` HASH ``level`` -> the last demand level, ``open:{k}`` -> when
  level k's gap opened (epoch s). No TTL: at most ``LEVELS + 1`` fields.

Bounded: per pool at most ``WINDOW_DAYS + 1`` day hashes of (3 + models + ``LEVELS``) metrics x
at most ~100 buckets (durations cluster: in practice a few dozen fields per metric), as many
minute hashes of at most 1440 fields each (one per minute of the day that had an arrival:
~8 x 1440 = 11,520 small fields per pool at most), about 12 arrival counters and one levels
hash of <= 17 fields. Pools are the configured ones (samples for other names are dropped),
models the pool's configured ones.

Cost on hot paths: the ``note_*`` methods only add to an in-memory buffer (no Redis call, no
await); ``flush`` writes the buffer in one pipelined round trip (HINCRBYFLOAT / INCRBY are
atomic, so replicas never lose each other's samples). Every replica runs ``flush`` in a
background loop (``FLUSH_INTERVAL_S``) and once at shutdown. Recording never raises into the
caller: a failed flush is logged and its samples dropped (a lost sample is fine; a failed
request is not).

Export (``export``, ``GET /api/v1/history``, ``gpufleet history export``): the trace this
history describes, in the format of ``gpufleet simulate --trace``. It is *reconstructed* from
the bounded history, not a raw log: each minute's arrivals are spread evenly inside that
minute, and their service times are the representatives of that day's service histogram
(4 buckets per doubling: ~19 % resolution), handed out in a fixed low-discrepancy order; no
randomness, so the same history always exports the same rows. Models are not recorded per
arrival, so the ``model`` column is empty.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from gpufleet.routing import normalize_model
from gpufleet.scaling.history import (
    DAY_S,
    LEVELS,
    RATE_BUCKET_S,
    RATE_WINDOW_S,
    WINDOW_DAYS,
    Histogram,
    PoolHistory,
    bucket_of,
    bucket_value,
    day_of,
    hour_of_day,
    level_of,
    recent_rate,
    step_levels,
    summarize,
)
from gpufleet.settings import PoolSpec
from gpufleet.store.keys import Keys

logger = logging.getLogger(__name__)

# How often every replica writes its buffered samples (one pipeline, only when there are any).
FLUSH_INTERVAL_S = 1.0
DAY_TTL_S = int((WINDOW_DAYS + 1) * DAY_S)
MINUTE_TTL_S = int(RATE_WINDOW_S + 120)
# The field that marks a day as seen (``history.summarize``'s "days" metric): pre-warming
# averages hourly arrivals over the days that had any.
DAY_SEEN = "days|0"
BOOT_SOURCES = frozenset({"create", "revive"})
# A pool's arrival counters a summary reads: the minutes of the last RATE_WINDOW_S.
RATE_MINUTES = int(RATE_WINDOW_S // RATE_BUCKET_S)
# A day's arrivals per minute (the minute hashes): at most this many fields per pool and day.
MINUTES_PER_DAY = int(DAY_S // RATE_BUCKET_S)
# The longest look-back ``export`` serves: the window the scaler learns from.
EXPORT_MAX_S = WINDOW_DAYS * DAY_S
# The columns of ``gpufleet simulate --trace`` (``scaling.sim.traces.TRACE_COLUMNS``; a unit
# test checks they agree: the store may not import the simulator).
TRACE_HEADER = ("arrival", "service_s", "model", "pool", "kind")
# The fraction of N the export steps by when it hands out service quantiles: 1/golden ratio
# spreads consecutive arrivals over the distribution (a Weyl sequence on N points).
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def pool_for_engine(pools: Iterable[Any], engine: str) -> str | None:
    """The pool whose history a task naming only ``engine`` counts for: the cheapest per
    slot-hour among the pools of that engine, ties by name (``policy._by_price``'s order, so
    the pool the scaler would start first for it). None if no pool runs the engine."""
    ranked = sorted(
        (
            ((p.price_per_hour or 0.0) / max(1, p.slots), p.name)
            for p in pools
            if _engine(p) == engine
        ),
    )
    return ranked[0][1] if ranked else None


def _engine(pool: Any) -> str:
    engine = pool.engine
    return str(getattr(engine, "value", engine))


class HistoryStore:
    """Records pool history into Redis and reads the summary ``policy.plan`` gets."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "gpufleet",
        clock: Callable[[], float] = time.time,
        pools: Sequence[PoolSpec] | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.clock = clock
        self.pools: dict[str, PoolSpec] | None = (
            {p.name: p for p in pools} if pools is not None else None
        )
        self._models: dict[str, frozenset[str]] = {
            p.name: frozenset(normalize_model(m) for m in p.models) for p in pools or ()
        }
        # (pool, day) -> field -> weight; (pool, minute) -> arrivals
        self._days: dict[tuple[str, int], dict[str, float]] = {}
        self._minutes: dict[tuple[str, int], int] = {}
        self._failing = False

    def __repr__(self) -> str:
        return f"<HistoryStore {self.prefix} pending={self.pending}>"

    @property
    def pending(self) -> int:
        """Buffered fields not yet written."""
        return sum(len(f) for f in self._days.values()) + len(self._minutes)

    # -- recording: buffer now, write on flush ---------------------------------------------------

    def _known(self, pool: str) -> bool:
        return bool(pool) and (self.pools is None or pool in self.pools)

    def _add(self, pool: str, t: float, metric: str, value_s: float, weight: float = 1.0) -> None:
        fields = self._days.setdefault((pool, day_of(t)), {})
        name = f"{metric}|{bucket_of(value_s)}"
        fields[name] = fields.get(name, 0.0) + weight

    def note_arrival(self, pool: str, n: int = 1) -> None:
        """``n`` arrivals for ``pool`` now (buffered)."""
        if n <= 0 or not self._known(pool):
            return
        t = self.clock()
        fields = self._days.setdefault((pool, day_of(t)), {})
        name = f"arrivals|{hour_of_day(t)}"  # a count per hour of the day (pre-warming)
        fields[name] = fields.get(name, 0.0) + n
        fields[DAY_SEEN] = 1.0  # this day saw traffic: set, not added (see _queue_writes)
        minute = (pool, int(t // RATE_BUCKET_S))
        self._minutes[minute] = self._minutes.get(minute, 0) + n

    def note_task(self, kind: str, pool: str | None) -> None:
        """A task was accepted: an arrival for its pool, or for its engine's pool."""
        if pool is None and self.pools is not None:
            pool = pool_for_engine(self.pools.values(), kind)
        if pool:
            self.note_arrival(pool)

    def note_service(self, pool: str, seconds: float, model: str | None = None) -> None:
        """One unit of work held a slot of ``pool`` for ``seconds`` (buffered)."""
        if not self._known(pool) or not seconds >= 0:
            return
        # _add's work, once for both fields (this runs for every proxied answer)
        fields = self._days.setdefault((pool, day_of(self.clock())), {})
        bucket = bucket_of(seconds)
        field = f"service|{bucket}"
        fields[field] = fields.get(field, 0.0) + 1.0
        allowed = self._models.get(pool) if model else None
        if model and allowed:
            name = model if model in allowed else normalize_model(model)
            if name in allowed:
                field = f"service@{name}|{bucket}"
                fields[field] = fields.get(field, 0.0) + 1.0

    def note_boot(self, pool: str, source: str, seconds: float) -> None:
        """A worker of ``pool`` booted in ``seconds``; ``source`` is create or revive."""
        if source not in BOOT_SOURCES or not self._known(pool) or not seconds >= 0:
            return
        self._add(pool, self.clock(), f"boot:{source}", seconds)

    async def flush(self) -> int:
        """Write every buffered sample in one pipelined round trip; returns fields written.

        Never raises: on a Redis error the samples are dropped and the error logged (a
        warning once per outage, then debug lines).
        """
        days, self._days = self._days, {}
        minutes, self._minutes = self._minutes, {}
        if not days and not minutes:
            return 0
        written = sum(len(f) for f in days.values()) + len(minutes)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                _queue_writes(pipe, self.keys, days, minutes)
                await pipe.execute()
        except Exception as exc:
            log = logger.debug if self._failing else logger.warning
            log("history: %d sample field(s) not recorded (%s)", written, exc)
            self._failing = True
            return 0
        if self._failing:
            logger.info("history: recording again")
            self._failing = False
        return written

    async def arrival(self, pool: str, n: int = 1) -> None:
        """Record ``n`` arrivals now (one round trip; never raises)."""
        self.note_arrival(pool, n)
        await self.flush()

    async def service(self, pool: str, seconds: float, model: str | None = None) -> None:
        """Record a service duration now (one round trip; never raises)."""
        self.note_service(pool, seconds, model)
        await self.flush()

    async def boot(self, pool: str, source: str, seconds: float) -> None:
        """Record a boot duration now (one round trip; never raises)."""
        self.note_boot(pool, source, seconds)
        await self.flush()

    async def aclose(self) -> None:
        """Write what is still buffered (the lifespan calls this on shutdown)."""
        await self.flush()

    # -- demand levels (the reconciler leader, once a tick) ----------------------------------------

    async def demand(self, pool: str, demand: int, slots: int) -> None:
        """The pool's demand now (queued + waiting + in flight): advances its idle-gap clocks."""
        await self.demands({pool: (demand, slots)})

    async def demands(self, levels: Mapping[str, tuple[int, int]]) -> int:
        """``demand`` for many pools: one read and (when a level moved) one write. Returns the
        number of gaps closed. Never raises.

        Leader only: the read-modify-write of a pool's levels hash assumes one writer (the
        reconciler lock); the gap samples themselves are atomic increments.
        """
        names = [p for p in levels if self._known(p)]
        if not names:
            return 0
        now = self.clock()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for pool in names:
                    pipe.hgetall(self.keys.history_levels(pool))
                states = cast(list[dict[str, str]], await pipe.execute())
        except Exception as exc:
            logger.warning("history: demand levels not read (%s)", exc)
            return 0
        days: dict[tuple[str, int], dict[str, float]] = {}
        updates: dict[str, dict[str, str]] = {}
        dropped: dict[str, list[str]] = {}
        closed_n = 0
        for pool, state in zip(names, states, strict=True):
            demand, slots = levels[pool]
            prev, opened = _parse_levels(state)
            level = level_of(demand, slots)
            if level == prev:
                continue
            new_open, closed = step_levels(opened, prev, level, now)
            for k, gap in closed:
                fields = days.setdefault((pool, day_of(now)), {})
                name = f"gap:{k}|{bucket_of(gap)}"
                fields[name] = fields.get(name, 0.0) + 1.0
            closed_n += len(closed)
            updates[pool] = {"level": str(level)} | {
                f"open:{k}": repr(since) for k, since in new_open.items()
            }
            dropped[pool] = [f"open:{k}" for k in opened if k not in new_open]
        if not updates:
            return 0
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for pool, mapping in updates.items():
                    key = self.keys.history_levels(pool)
                    if dropped[pool]:
                        pipe.hdel(key, *dropped[pool])
                    pipe.hset(key, mapping=cast(Any, mapping))
                _queue_writes(pipe, self.keys, days, {})
                await pipe.execute()
        except Exception as exc:
            logger.warning("history: demand levels not recorded (%s)", exc)
            return 0
        return closed_n

    # -- reading ---------------------------------------------------------------------------------

    async def summary(self, pools: Iterable[str]) -> dict[str, PoolHistory]:
        """Each pool's ``PoolHistory`` now: one pipelined round trip for all pools.

        Raises on a Redis error (the reconciler's tick handles it like any observe failure).
        """
        names = list(dict.fromkeys(pools))
        if not names:
            return {}
        now = self.clock()
        today = day_of(now)
        days = [today - age for age in range(WINDOW_DAYS)]
        last = int(now // RATE_BUCKET_S)
        first = int((now - RATE_WINDOW_S) // RATE_BUCKET_S) + 1
        minutes = list(range(first, last + 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool in names:
                for day in days:
                    pipe.hgetall(self.keys.history_day(pool, day))
                pipe.mget([self.keys.history_arrivals(pool, m) for m in minutes])
            answers = await pipe.execute()
        out: dict[str, PoolHistory] = {}
        per_pool = len(days) + 1
        for i, pool in enumerate(names):
            chunk = answers[i * per_pool : (i + 1) * per_pool]
            by_day = {
                day: _parse_day(cast(dict[str, str], raw))
                for day, raw in zip(days, chunk[:-1], strict=True)
                if raw
            }
            counts = {m: float(n) for m, n in zip(minutes, chunk[-1], strict=True) if n}
            out[pool] = summarize(by_day, now, recent_rate(counts, now))
        return out

    async def model_service(self, pool: str) -> dict[str, PoolHistory]:
        """Per-model service histograms of ``pool`` over the window (for GET /pools)."""
        now = self.clock()
        today = day_of(now)
        days = [today - age for age in range(WINDOW_DAYS)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(self.keys.history_day(pool, day))
            answers = await pipe.execute()
        per_model: dict[str, dict[int, dict[str, dict[int, float]]]] = {}
        for day, raw in zip(days, answers, strict=True):
            for metric, counts in _parse_day(cast(dict[str, str], raw)).items():
                if metric.startswith("service@"):
                    model = metric.removeprefix("service@")
                    per_model.setdefault(model, {})[day] = {"service": counts}
        return {m: summarize(d, now) for m, d in sorted(per_model.items())}

    # -- export: the trace this history describes ---------------------------------------------

    async def export(self, pool: str | None, since_s: float) -> list[ExportRow]:
        """The arrivals of the last ``since_s`` seconds (at most ``EXPORT_MAX_S``, the window)
        of ``pool`` (None: every configured pool) as trace rows, sorted by arrival: the
        format of ``gpufleet simulate --trace`` (``trace_csv``).

        Reconstructed from the bounded history, not a raw log: a minute's n arrivals are
        spread evenly inside it (``minute + (j + 0.5) * 60 / n``); each day's arrivals get
        service times from that day's pool-level service histogram (the bucket
        representatives, ~19 % resolution), walked in a fixed low-discrepancy order, so the
        exported service times have the day's distribution and the same history always
        exports the same rows. A day with no service samples takes the histogram of every
        day read; a pool with none at all exports ``service_s`` 0. ``model`` is empty (not
        recorded per arrival), ``kind`` the pool's engine. A minute that straddles the start
        of the look-back is exported whole. One pipelined round trip; raises on Redis errors.
        """
        rows: list[ExportRow] = []
        for chunk in await self.export_days(pool, since_s):
            rows.extend(chunk)
        return rows

    async def export_days(self, pool: str | None, since_s: float) -> Iterator[list[ExportRow]]:
        """``export`` one UTC day at a time (oldest first): reads Redis now, builds each
        day's rows only when the iterator gets there (``GET /api/v1/history`` streams them)."""
        names = [pool] if pool is not None and self._known(pool) else []
        if pool is None:
            names = list(self.pools or ())
        now = self.clock()
        since_s = min(max(0.0, since_s), EXPORT_MAX_S) if not math.isnan(since_s) else 0.0
        first_minute = math.floor((now - since_s) / RATE_BUCKET_S)
        today = day_of(now)
        days = list(range(first_minute // MINUTES_PER_DAY, today + 1))
        window = list(range(today - WINDOW_DAYS, today + 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                for day in days:
                    pipe.hgetall(self.keys.history_minutes(name, day))
                for day in window:
                    pipe.hgetall(self.keys.history_day(name, day))
            answers = iter(await pipe.execute())
        arrivals: dict[str, dict[int, dict[int, int]]] = {}
        service: dict[str, dict[int, Histogram]] = {}
        for name in names:
            arrivals[name] = {
                day: _parse_minutes(cast(dict[str, str], next(answers)), day, first_minute)
                for day in days
            }
            service[name] = {}
            for day in window:
                raw = _parse_day(cast(dict[str, str], next(answers)))
                if raw.get("service"):
                    service[name][day] = Histogram.of(raw["service"])
        kinds = {name: _engine(self.pools[name]) if self.pools else "" for name in names}
        return _export_rows(days, arrivals, service, kinds)


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One reconstructed arrival: the columns of a ``gpufleet simulate --trace`` row
    (``scaling.sim.traces.TraceRow`` without the line number); ``arrival_s`` epoch s."""

    arrival_s: float
    service_s: float
    model: str = ""
    pool: str = ""
    kind: str = ""


def trace_csv(rows: Iterable[ExportRow], *, header: bool = True) -> str:
    """``rows`` as CSV in the ``gpufleet simulate --trace`` format (``TRACE_HEADER``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(TRACE_HEADER)
    for r in rows:
        writer.writerow((f"{r.arrival_s:.3f}", f"{r.service_s:.3f}", r.model, r.pool, r.kind))
    return out.getvalue()


def quantile_order(n: int) -> list[int]:
    """A fixed permutation of ``0 .. n-1``: the i-th arrival of a day takes the
    ``order[i]``-th of the day's n service quantiles. Steps by the integer nearest
    ``n / golden ratio`` that is coprime with n, so consecutive arrivals land far apart in
    the distribution (short and long jobs interleave, as in a shuffled sample)."""
    step = max(1, round(n * _GOLDEN))
    while math.gcd(step, n) != 1:
        step += 1
    return [(i * step) % n for i in range(n)]


def service_quantiles(hist: Histogram, n: int) -> list[float]:
    """n service times with ``hist``'s distribution: the values at quantiles
    ``(k + 0.5) / n`` (k = 0 .. n-1), each its bucket's representative. When n equals the
    histogram's (integer) sample count, every bucket gets exactly its count."""
    total = hist.total
    if not total or n <= 0:
        return [0.0] * max(0, n)
    out: list[float] = []
    counts = iter(hist.counts)
    bucket, running = next(counts)
    for k in range(n):
        target = (k + 0.5) / n * total
        while running < target:
            following = next(counts, None)
            if following is None:  # float rounding at the top: the last bucket
                break
            bucket, running = following[0], running + following[1]
        out.append(round(bucket_value(bucket), 3))
    return out


def _export_rows(
    days: Sequence[int],
    arrivals: Mapping[str, Mapping[int, Mapping[int, int]]],
    service: Mapping[str, Mapping[int, Histogram]],
    kinds: Mapping[str, str],
) -> Iterator[list[ExportRow]]:
    fallback: dict[str, Histogram] = {}
    for name, service_days in service.items():
        merged = Histogram()
        for h in service_days.values():
            merged = merged.merge(h)
        fallback[name] = merged
    for day in days:
        rows: list[ExportRow] = []
        for name, arrival_days in arrivals.items():
            minutes = arrival_days.get(day, {})
            times = [
                round(minute * RATE_BUCKET_S + (j + 0.5) * RATE_BUCKET_S / n, 3)
                for minute, n in sorted(minutes.items())
                for j in range(n)
            ]
            if not times:
                continue
            hist = service[name].get(day) or fallback[name]
            values = service_quantiles(hist, len(times))
            order = quantile_order(len(times))
            rows.extend(
                ExportRow(t, values[order[i]], "", name, kinds.get(name, ""))
                for i, t in enumerate(times)
            )
        rows.sort(key=lambda r: (r.arrival_s, r.pool))
        yield rows


def _parse_minutes(raw: Mapping[str, str], day: int, first_minute: int) -> dict[int, int]:
    """A minute hash as epoch minute -> arrivals, minutes before ``first_minute`` left out."""
    out: dict[int, int] = {}
    for field, value in raw.items():
        try:
            minute, n = day * MINUTES_PER_DAY + int(field), int(value)
        except ValueError:
            continue
        if n > 0 and minute >= first_minute and 0 <= int(field) < MINUTES_PER_DAY:
            out[minute] = n
    return out


def _queue_writes(
    pipe: Any,
    keys: Keys,
    days: Mapping[tuple[str, int], Mapping[str, float]],
    minutes: Mapping[tuple[str, int], int],
) -> None:
    for (pool, day), fields in days.items():
        key = keys.history_day(pool, day)
        for name, weight in fields.items():
            if name == DAY_SEEN:
                pipe.hset(key, name, 1)
            else:
                pipe.hincrbyfloat(key, name, weight)
        pipe.expire(key, DAY_TTL_S)
    per_day: set[str] = set()
    for (pool, minute), n in minutes.items():
        key = keys.history_arrivals(pool, minute)
        pipe.incrby(key, n)
        pipe.expire(key, MINUTE_TTL_S)
        day, of_day = divmod(minute, MINUTES_PER_DAY)  # the export's copy, kept for the window
        day_key = keys.history_minutes(pool, day)
        pipe.hincrby(day_key, str(of_day), n)
        per_day.add(day_key)
    for day_key in per_day:
        pipe.expire(day_key, DAY_TTL_S)


def _parse_day(raw: Mapping[str, str]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for name, value in raw.items():
        metric, _, bucket = name.rpartition("|")
        try:
            out.setdefault(metric, {})[int(bucket)] = float(value)
        except ValueError:
            continue
    return out


def _parse_levels(raw: Mapping[str, str]) -> tuple[int, dict[int, float]]:
    try:
        prev = int(raw.get("level", "0"))
    except ValueError:
        prev = 0
    opened: dict[int, float] = {}
    for name, value in raw.items():
        if name.startswith("open:"):
            try:
                k = int(name.removeprefix("open:"))
                if 1 <= k <= LEVELS:
                    opened[k] = float(value)
            except ValueError:
                continue
    return prev, opened


__all__ = [
    "EXPORT_MAX_S",
    "FLUSH_INTERVAL_S",
    "TRACE_HEADER",
    "ExportRow",
    "HistoryStore",
    "pool_for_engine",
    "trace_csv",
]
