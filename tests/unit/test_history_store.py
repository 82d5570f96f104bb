"""``HistoryStore`` (Redis) and ``HistoryBook`` (the simulator's, in memory) fed the same
events give the same ``PoolHistory``: the live fleet and the simulator decide alike.

fakeredis here (fast); tests/integration/test_history_live.py runs the store on real Redis.
"""

from __future__ import annotations

import random

import pytest
import redis.asyncio as aioredis

from gpufleet.scaling.history import DAY_S, HistoryBook, PoolHistory
from gpufleet.settings import load_settings
from gpufleet.store.history import HistoryStore, pool_for_engine
from gpufleet.store.keys import Keys

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings_pools() -> list:  # type: ignore[type-arg]
    return load_settings(
        env_file=None,
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui", "slots": 1,
             "urls": ["http://127.0.0.1:1"], "price_per_hour": 0.5},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 4,
             "models": ["llama3.2"], "urls": ["http://127.0.0.1:1"], "price_per_hour": 1.2},
            {"name": "llm-big", "provider": "static", "engine": "ollama", "slots": 2,
             "models": ["llama3.2"], "urls": ["http://127.0.0.1:1"], "price_per_hour": 0.4},
        ],
    ).pools


async def feed_both(store: HistoryStore, book: HistoryBook, clock: Clock, seed: int) -> None:
    """Random service / boot / arrival / demand events over three days, into both."""
    rng = random.Random(seed)
    for _ in range(400):
        clock.now += rng.expovariate(1 / 900)  # ~96 events a day
        t = clock.now
        pool = rng.choice(["comfy", "llm"])
        kind = rng.random()
        if kind < 0.3:
            n = rng.randint(1, 3)
            store.note_arrival(pool, n)
            book.arrival(pool, t, n)
        elif kind < 0.55:
            s = rng.lognormvariate(3, 1.2)
            store.note_service(pool, s)
            book.service(pool, t, s)
        elif kind < 0.65:
            source = rng.choice(["create", "revive"])
            s = rng.uniform(20, 300)
            store.note_boot(pool, source, s)
            book.boot(pool, t, source, s)
        else:
            slots = 1 if pool == "comfy" else 4
            demand = rng.choice([0, 0, 1, 2, 3, 5, 9, 80])
            await store.demand(pool, demand, slots)
            book.demand(pool, t, demand, slots)
        if rng.random() < 0.2:
            await store.flush()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_store_and_book_fed_the_same_events_summarize_alike(
    fake_redis: aioredis.Redis, seed: int
) -> None:
    clock = Clock(T0)
    store = HistoryStore(fake_redis, prefix="h", clock=clock, pools=settings_pools())
    book = HistoryBook()
    await feed_both(store, book, clock, seed)
    await store.flush()
    assert clock.now - T0 > 2 * DAY_S  # the events span at least three UTC days

    seen = []
    for later in (0.0, 30.0, 700.0, DAY_S, 3 * DAY_S, 8 * DAY_S):
        clock.now += later
        live = await store.summary(["comfy", "llm"])
        for pool in ("comfy", "llm"):
            assert live[pool] == book.summary(pool, clock.now), (pool, later)
        seen.append(live["comfy"])
    # something was learned (not two empty summaries compared), and it ages out of the window
    first = seen[0]
    assert first.service_s.total > 0
    assert first.all_gaps().total > 0
    assert first.boot_s
    assert first.arrivals > 0
    assert first.arrivals_per_s >= 0
    assert seen[-1].service_s.total == 0
    assert seen[-1].arrivals == 0


async def test_demand_levels_open_and_close_gaps_like_the_book(
    fake_redis: aioredis.Redis,
) -> None:
    clock = Clock(T0 + DAY_S - 50)  # the gaps straddle midnight
    store = HistoryStore(fake_redis, prefix="h", clock=clock, pools=settings_pools())
    book = HistoryBook()
    for dt, demand in [(0, 3), (10, 1), (20, 0), (40, 2), (5, 2), (30, 7), (100, 0), (1, 1)]:
        clock.now += dt
        await store.demand("comfy", demand, 1)
        book.demand("comfy", clock.now, demand, 1)
    summary = (await store.summary(["comfy"]))["comfy"]
    assert summary == book.summary("comfy", clock.now)
    # level 1 idled 40 s (t=30..70) and 1 s (t=205..206), too short to count
    # (history.MIN_GAP_S); level 2 60 s; level 3 95 s
    assert [h.total for h in summary.idle_gaps_s] == [1, 1, 1]
    assert summary.gaps(2).quantile(0.5) == pytest.approx(60, rel=0.1)
    state = await fake_redis.hgetall(Keys("h").history_levels("comfy"))
    assert state["level"] == "1"
    assert "open:1" not in state
    assert sorted(state) == ["level", *(f"open:{k}" for k in range(2, 8))]


async def test_a_summary_of_a_pool_without_history_is_empty(fake_redis: aioredis.Redis) -> None:
    store = HistoryStore(fake_redis, prefix="h", clock=Clock(T0), pools=settings_pools())
    assert await store.summary(["comfy"]) == {"comfy": PoolHistory()}
    assert await store.summary([]) == {}


async def test_samples_of_unknown_pools_models_and_sources_are_dropped(
    fake_redis: aioredis.Redis,
) -> None:
    clock = Clock(T0)
    store = HistoryStore(fake_redis, prefix="h", clock=clock, pools=settings_pools())
    store.note_arrival("nope")
    store.note_service("nope", 3.0)
    store.note_boot("comfy", "teleport", 3.0)
    store.note_service("comfy", float("nan"))
    assert store.pending == 0
    store.note_service("llm", 2.0, model="llama3.2")  # configured: also per model
    store.note_service("llm", 2.0, model="mistral")  # not configured: pool level only
    assert await store.flush() == 2
    per_model = await store.model_service("llm")
    assert list(per_model) == ["llama3.2:latest"]
    assert per_model["llama3.2:latest"].service_s.total == 1
    assert (await store.summary(["llm"]))["llm"].service_s.total == 2


async def test_a_task_naming_only_an_engine_counts_for_its_cheapest_pool_per_slot(
    fake_redis: aioredis.Redis,
) -> None:
    pools = settings_pools()
    # llm: 1.2 $/h / 4 slots = 0.30 per slot-hour; llm-big: 0.4 / 2 = 0.20 -> llm-big
    assert pool_for_engine(pools, "ollama") == "llm-big"
    assert pool_for_engine(pools, "comfyui") == "comfy"
    assert pool_for_engine(pools, "vllm") is None
    store = HistoryStore(fake_redis, prefix="h", clock=Clock(T0), pools=pools)
    store.note_task("ollama", None)
    store.note_task("ollama", "llm")
    await store.flush()
    got = await store.summary(["llm", "llm-big"])
    assert got["llm"].arrivals == 1
    assert got["llm-big"].arrivals == 1


async def test_a_failed_flush_drops_its_samples_and_never_raises(
    fake_redis: aioredis.Redis,
) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    store = HistoryStore(dead, prefix="h", clock=Clock(T0), pools=settings_pools())
    store.note_arrival("comfy")
    await store.arrival("comfy")
    await store.service("comfy", 3.0)
    await store.boot("comfy", "create", 30.0)
    assert await store.demands({"comfy": (3, 1)}) == 0
    assert store.pending == 0  # dropped, not piling up
    await dead.aclose()
