"""Worker registry on a real Redis: records, compare-and-set transitions, shared slots."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gpufleet.domain import WorkerState
from gpufleet.store.workers import WorkerRegistry


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(redis: aioredis.Redis, clock: Clock) -> WorkerRegistry:
    return WorkerRegistry(redis, slot_ttl_s=15, clock=clock)


async def test_add_costs_adds_to_live_records_and_never_recreates_a_removed_one(
    registry: WorkerRegistry, redis: aioredis.Redis
) -> None:
    await registry.register(pool="p", provider="novita", slots=1, worker_id="w1")
    await registry.register(pool="p", provider="novita", slots=1, worker_id="w2")
    await registry.remove("w2")
    await registry.add_costs({"w1": 0.25, "w2": 0.5})
    await registry.add_costs({"w1": 0.5})
    await registry.add_costs({})
    assert (await registry.get("w1")).cost_usd == pytest.approx(0.75)
    assert await registry.find("w2") is None
    assert not await redis.exists("gpufleet:worker:w2")  # the script wrote nothing for it


async def test_register_get_list_and_update(registry: WorkerRegistry) -> None:
    w = await registry.register(pool="p", provider="static", slots=2, worker_id="w1",
                                base_url="http://h:1", models_present=["llama3"])
    assert (w.id, w.pool, w.state, w.slots, w.busy_slots) == ("w1", "p", "provisioning", 2, 0)
    assert w.models_present == ("llama3",)
    await registry.register(pool="q", provider="static", slots=1, worker_id="w2")
    assert [x.id for x in await registry.list_workers()] == ["w1", "w2"]
    assert [x.id for x in await registry.list_workers("q")] == ["w2"]
    await registry.update("w1", models_loaded=["llama3"], cost_usd=1.5)
    again = await registry.get("w1")
    assert again.models_loaded == ("llama3",)
    assert again.cost_usd == 1.5
    with pytest.raises(KeyError):
        await registry.update("nope", cost_usd=1)
    await registry.remove("w1")
    assert await registry.find("w1") is None
    assert [x.id for x in await registry.list_workers()] == ["w2"]


async def test_transitions_follow_the_table(registry: WorkerRegistry, clock: Clock) -> None:
    await registry.register(pool="p", provider="static", slots=1, worker_id="w")
    assert not await registry.transition("w", WorkerState.stopped)  # provisioning -/-> stopped
    clock.now = 1010
    assert await registry.transition("w", WorkerState.booting, "instance running")
    clock.now = 1020
    assert await registry.transition("w", WorkerState.ready, "engine answered")
    w = await registry.get("w")
    assert (w.state, w.ready_since, w.last_busy_at, w.state_since) == ("ready", 1020, 1020, 1020)
    assert await registry.transition("w", WorkerState.failed, "health")
    assert (await registry.get("w")).last_error == "health"
    assert not await registry.transition("w", WorkerState.ready)
    assert not await registry.transition("missing", WorkerState.ready)


async def test_racing_transitions_have_one_winner(registry: WorkerRegistry) -> None:
    await registry.register(pool="p", provider="static", slots=1, worker_id="w",
                            state=WorkerState.ready)
    results = await asyncio.gather(
        *(registry.transition("w", WorkerState.draining) for _ in range(20))
    )
    assert sum(results) == 1


async def test_slots_are_never_given_twice(redis: aioredis.Redis, clock: Clock) -> None:
    registries = [WorkerRegistry(redis, clock=clock) for _ in range(3)]  # three "replicas"
    await registries[0].register(pool="p", provider="static", slots=4, worker_id="w",
                                 state=WorkerState.ready)
    tokens = await asyncio.gather(*(registries[i % 3].acquire_slot("w") for i in range(100)))
    held = [t for t in tokens if t]
    assert len(held) == 4
    assert await registries[0].busy("w") == 4
    assert (await registries[0].get("w")).free_slots == 0
    assert await registries[1].release_slot("w", held[0])
    assert not await registries[1].release_slot("w", held[0])
    assert await registries[2].acquire_slot("w") is not None
    assert await registries[2].acquire_slot("w") is None


async def test_slot_of_a_dead_holder_expires(registry: WorkerRegistry, clock: Clock) -> None:
    await registry.register(pool="p", provider="static", slots=1, worker_id="w",
                            state=WorkerState.ready)
    token = await registry.acquire_slot("w")
    assert token is not None
    clock.now += 10
    assert await registry.renew_slot("w", token)
    clock.now += 10  # renewed 10 s ago, TTL 15: still held
    assert await registry.acquire_slot("w") is None
    clock.now += 6  # holder stopped renewing: slot frees itself
    assert await registry.busy("w") == 0
    assert await registry.acquire_slot("w") is not None


async def test_no_slot_unless_ready(registry: WorkerRegistry, clock: Clock) -> None:
    await registry.register(pool="p", provider="static", slots=2, worker_id="w",
                            state=WorkerState.booting)
    assert await registry.acquire_slot("w") is None
    assert await registry.transition("w", WorkerState.ready)
    token = await registry.acquire_slot("w")
    assert token is not None
    assert await registry.transition("w", WorkerState.draining)
    assert await registry.acquire_slot("w") is None  # draining takes no new work
    clock.now += 5
    await registry.release_slot("w", token)
    assert (await registry.get("w")).last_busy_at == clock.now


async def test_health_failures_count_and_reset(registry: WorkerRegistry) -> None:
    await registry.register(pool="p", provider="static", slots=1, worker_id="w")
    assert [await registry.record_health("w", False) for _ in range(3)] == [1, 2, 3]
    assert await registry.record_health("w", True) == 0


async def test_list_skips_an_unreadable_record(
    registry: WorkerRegistry, redis: aioredis.Redis
) -> None:
    await registry.register(pool="p", provider="static", slots=1, worker_id="good")
    await registry.register(pool="p", provider="static", slots=1, worker_id="bad")
    await redis.hset("gpufleet:worker:bad", "state", "exploded")
    assert [w.id for w in await registry.list_workers()] == ["good"]
