"""``HistoryStore.export``: the trace a pool's recorded history describes (fakeredis, a fixed
clock). Per-minute arrival counts come back exactly, service times with the day's
distribution, the same rows on every call, in the ``gpufleet simulate --trace`` format."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gpufleet.api.history import parse_since
from gpufleet.scaling.history import DAY_S, Histogram, bucket_of
from gpufleet.scaling.sim.traces import TRACE_COLUMNS, read_trace
from gpufleet.settings import load_settings
from gpufleet.store.history import (
    EXPORT_MAX_S,
    TRACE_HEADER,
    HistoryStore,
    quantile_order,
    service_quantiles,
    trace_csv,
)
from gpufleet.store.keys import Keys

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY0 = int(T0 // DAY_S)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pools() -> list:  # type: ignore[type-arg]
    return load_settings(
        env_file=None,
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui",
             "urls": ["http://127.0.0.1:1"]},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 4,
             "models": ["llama3.2"], "urls": ["http://127.0.0.1:1"]},
        ],
    ).pools


# (seconds after T0, pool, arrivals) and (seconds after T0, pool, service seconds)
ARRIVALS = [
    (10.0, "comfy", 3), (50.0, "comfy", 1), (130.0, "comfy", 2), (3601.0, "llm", 5),
    (DAY_S + 70.0, "comfy", 4), (DAY_S + 7200.0, "comfy", 2),
]
SERVICE_DAY0 = [2.0, 2.0, 3.0, 40.0, 40.0, 300.0]  # six arrivals for comfy on day 0
SERVICE_DAY1 = [1.0, 1.0, 1.0, 9.0, 9.0, 9.0]  # and six on day 1
LLM_SERVICE = [0.5, 0.5, 0.5, 0.5, 20.0]


async def recorded(redis: aioredis.Redis) -> tuple[HistoryStore, Clock]:
    clock = Clock(T0)
    store = HistoryStore(redis, prefix="h", clock=clock, pools=pools())
    for at, pool, n in ARRIVALS:
        clock.now = T0 + at
        store.note_arrival(pool, n)
        if at < DAY_S:
            for s in (SERVICE_DAY0 if pool == "comfy" and at == 10.0 else []):
                store.note_service("comfy", s)
            for s in (LLM_SERVICE if pool == "llm" else []):
                store.note_service("llm", s, model="llama3.2")
        elif at == DAY_S + 70.0:
            for s in SERVICE_DAY1:
                store.note_service("comfy", s)
        await store.flush()
    clock.now = T0 + DAY_S + 3 * 3600.0
    return store, clock


async def test_per_minute_counts_come_back_spread_evenly_in_their_minute(
    fake_redis: aioredis.Redis,
) -> None:
    store, _ = await recorded(fake_redis)
    rows = await store.export(None, EXPORT_MAX_S)
    assert len(rows) == sum(n for _, _, n in ARRIVALS)
    assert [r.arrival_s for r in rows] == sorted(r.arrival_s for r in rows)
    per_minute = Counter((r.pool, int(r.arrival_s // 60)) for r in rows)
    expected: Counter[tuple[str, int]] = Counter()
    for at, pool, n in ARRIVALS:
        expected[(pool, int((T0 + at) // 60))] += n
    assert per_minute == expected
    first_minute = [r.arrival_s - T0 for r in rows if r.pool == "comfy" and r.arrival_s < T0 + 60]
    assert first_minute == [7.5, 22.5, 37.5, 52.5]  # 3 + 1 arrivals in minute 0: 4 evenly
    assert {r.model for r in rows} == {""}
    assert {(r.pool, r.kind) for r in rows} == {("comfy", "comfyui"), ("llm", "ollama")}


async def test_service_times_follow_each_days_histogram(fake_redis: aioredis.Redis) -> None:
    store, _ = await recorded(fake_redis)
    rows = await store.export("comfy", EXPORT_MAX_S)
    day0 = [r.service_s for r in rows if r.arrival_s < T0 + DAY_S]
    day1 = [r.service_s for r in rows if r.arrival_s >= T0 + DAY_S]
    # as many arrivals as service samples that day: every bucket gets exactly its count
    assert Counter(bucket_of(s) for s in day0) == Counter(bucket_of(s) for s in SERVICE_DAY0)
    assert Counter(bucket_of(s) for s in day1) == Counter(bucket_of(s) for s in SERVICE_DAY1)
    # each value is within its bucket (~19 %) of a recorded one
    for s in day0:
        assert min(abs(s / v - 1) for v in SERVICE_DAY0) < 0.2
    # interleaved, not sorted short to long
    assert day0 != sorted(day0)
    llm = [r.service_s for r in await store.export("llm", EXPORT_MAX_S)]
    assert Counter(bucket_of(s) for s in llm) == Counter(bucket_of(s) for s in LLM_SERVICE)


async def test_the_same_history_exports_the_same_rows(fake_redis: aioredis.Redis) -> None:
    store, clock = await recorded(fake_redis)
    first = await store.export(None, EXPORT_MAX_S)
    assert await store.export(None, EXPORT_MAX_S) == first
    # a fresh store (another replica) on the same Redis exports the same
    other = HistoryStore(fake_redis, prefix="h", clock=clock, pools=pools())
    assert await other.export(None, EXPORT_MAX_S) == first
    assert trace_csv(first) == trace_csv(await other.export(None, EXPORT_MAX_S))


async def test_since_limits_the_look_back_and_the_window_caps_it(
    fake_redis: aioredis.Redis,
) -> None:
    store, clock = await recorded(fake_redis)
    # the clock is at day 1 03:00; comfy had 4 arrivals at 00:01:10 and 2 at 02:00 that day
    recent = await store.export("comfy", 3600.0)
    assert [int(r.arrival_s - T0 - DAY_S) // 60 for r in recent] == [120, 120]
    assert len(await store.export("comfy", 3 * 3600.0 - 120)) == 2  # from 00:02
    assert len(await store.export("comfy", 3 * 3600.0 - 90)) == 6  # 00:01 straddles: whole
    assert len(await store.export("comfy", 3 * 3600.0)) == 6  # day 1 only
    everything = await store.export("comfy", EXPORT_MAX_S)
    assert await store.export("comfy", 10 * EXPORT_MAX_S) == everything
    assert await store.export("comfy", 0) == []
    assert await store.export("nope", EXPORT_MAX_S) == []  # not a configured pool
    # nine days later the window has passed: nothing read beyond it
    clock.now += 9 * DAY_S
    assert await store.export(None, EXPORT_MAX_S) == []


async def test_a_day_without_service_samples_borrows_the_window(
    fake_redis: aioredis.Redis,
) -> None:
    clock = Clock(T0)
    store = HistoryStore(fake_redis, prefix="h", clock=clock, pools=pools())
    store.note_service("comfy", 30.0)
    store.note_arrival("comfy", 1)  # day 0: one arrival, one sample
    clock.now += DAY_S
    store.note_arrival("comfy", 2)  # day 1: arrivals only (still running, say)
    store.note_arrival("llm", 2)  # llm never served anything
    await store.flush()
    rows = await store.export(None, EXPORT_MAX_S)
    assert len(rows) == 5
    assert sorted(r.service_s for r in rows if r.pool == "llm") == [0.0, 0.0]
    assert {bucket_of(r.service_s) for r in rows if r.pool == "comfy"} == {bucket_of(30.0)}


async def test_minute_hashes_are_bounded_and_expire_with_the_window(
    fake_redis: aioredis.Redis,
) -> None:
    store, clock = await recorded(fake_redis)
    key = Keys("h").history_minutes("comfy", DAY0)
    assert key == "h:history:comfy:minutes:2026-01-01"
    assert await fake_redis.hgetall(key) == {"0": "4", "2": "2"}
    assert await fake_redis.hgetall(Keys("h").history_minutes("comfy", DAY0 + 1)) == {
        "1": "4", "120": "2"
    }
    assert 7 * DAY_S < await fake_redis.ttl(key) <= 8 * DAY_S
    # the minute of the day is the field: a whole day of traffic is at most 1440 fields
    for minute in range(0, 2 * 1440, 7):
        clock.now = T0 + 2 * DAY_S + minute * 60.0
        store.note_arrival("comfy")
    await store.flush()
    assert await fake_redis.hlen(Keys("h").history_minutes("comfy", DAY0 + 2)) <= 1440
    assert await fake_redis.hlen(Keys("h").history_minutes("comfy", DAY0 + 3)) <= 1440


async def test_the_summary_is_unchanged_by_the_minute_hashes(fake_redis: aioredis.Redis) -> None:
    store, _ = await recorded(fake_redis)
    before = await store.summary(["comfy", "llm"])
    async for name in fake_redis.scan_iter("h:history:*:minutes:*"):
        await fake_redis.delete(name)
    assert await store.summary(["comfy", "llm"]) == before  # the tick never reads them


async def test_the_csv_is_the_simulate_trace_format(
    fake_redis: aioredis.Redis, tmp_path: Path
) -> None:
    assert TRACE_HEADER == TRACE_COLUMNS
    store, _ = await recorded(fake_redis)
    rows = await store.export(None, EXPORT_MAX_S)
    path = tmp_path / "trace.csv"
    path.write_text(trace_csv(rows))
    parsed = read_trace(path)
    assert [(p.arrival_s, p.service_s, p.model, p.pool, p.kind) for p in parsed] == [
        (r.arrival_s, r.service_s, r.model, r.pool, r.kind) for r in rows
    ]
    assert trace_csv([]) == "arrival,service_s,model,pool,kind\n"


@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 99, 1000])
def test_quantile_order_is_a_permutation(n: int) -> None:
    assert sorted(quantile_order(n)) == list(range(n))


def test_service_quantiles_hand_out_each_bucket_its_share() -> None:
    hist = Histogram.from_samples([1.0] * 3 + [10.0])
    assert [bucket_of(v) for v in service_quantiles(hist, 8)] == [bucket_of(1.0)] * 6 + [
        bucket_of(10.0)
    ] * 2
    assert service_quantiles(Histogram(), 3) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800.0), ("12h", 43200.0), ("7d", 604800.0), ("3600", 3600.0), ("90s", 90.0),
     ("1.5h", 5400.0), (" 2d ", 172800.0)],
)
def test_since_accepts_durations(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0m", "8d", "604801", "7w", "-1h", "1e3", "abc", "h"])
def test_since_refuses_others(text: str) -> None:
    with pytest.raises(ValueError, match="duration|more than 0|longer than the history"):
        parse_since(text)
