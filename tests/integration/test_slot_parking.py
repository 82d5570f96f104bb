"""Parked slots (``[proxy] slot_park_s``): the end of an answer keeps its slot held in Redis
for this replica's next request to the same worker; on real Redis, nothing is over-granted,
nothing is kept from a waiter for longer than the park, and a failure never parks."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gpufleet.domain import WorkerState
from gpufleet.proxy.waiting import SlotBroker
from gpufleet.settings import PoolSpec, ProxySettings
from gpufleet.store.workers import WorkerRegistry

MODEL = "llama3.2"
POOLS = [
    PoolSpec(name="llm", provider="simulated", engine="ollama", models=[MODEL]),
    PoolSpec(name="other", provider="simulated", engine="ollama", models=["qwen2.5:7b"]),
]


def broker_for(redis: aioredis.Redis, park_s: float, **proxy: float) -> SlotBroker:
    settings = ProxySettings(**proxy)
    # model_copy skips validation: a park longer than the allowed 0.5 s makes the tests
    # below independent of how fast this machine is.
    settings = settings.model_copy(update={"slot_park_s": park_s})
    return SlotBroker(WorkerRegistry(redis), redis, POOLS, settings)


@pytest.fixture
async def registry(redis: aioredis.Redis) -> WorkerRegistry:
    registry = WorkerRegistry(redis)
    await registry.register(pool="llm", provider="static", slots=1, worker_id="w1",
                            state=WorkerState.ready)
    return registry


async def test_the_next_request_takes_the_parked_slot_itself(
    redis: aioredis.Redis, registry: WorkerRegistry
) -> None:
    broker = broker_for(redis, park_s=60)
    first = await broker.acquire(MODEL)
    broker.release_now(first)
    assert "parked=1" in repr(broker)
    assert await registry.busy("w1") == 1  # still held in Redis: no other replica has it
    second = await broker.acquire(MODEL)
    assert second.token == first.token  # the same hold: no acquire went to Redis
    assert await registry.busy("w1") == 1
    broker.release_now(first)  # a second release of a lease does nothing
    assert "parked=0" in repr(broker)
    await broker.release(second)
    assert await registry.busy("w1") == 0
    await broker.aclose()


async def test_a_slot_nobody_takes_is_given_back_after_the_park(
    redis: aioredis.Redis, registry: WorkerRegistry
) -> None:
    broker = broker_for(redis, park_s=0.05)
    broker.release_now(await broker.acquire(MODEL))
    assert await registry.busy("w1") == 1
    for _ in range(200):
        if await registry.busy("w1") == 0:
            break
        await asyncio.sleep(0.01)
    assert await registry.busy("w1") == 0
    assert "held=0 parked=0" in repr(broker)
    await broker.aclose()


async def test_another_replica_waiting_for_the_worker_gets_the_slot_after_the_park(
    redis: aioredis.Redis, registry: WorkerRegistry
) -> None:
    here, there = broker_for(redis, park_s=0.05), broker_for(redis, park_s=0.05)
    here.release_now(await here.acquire(MODEL))
    lease = await asyncio.wait_for(there.acquire(MODEL), timeout=30)
    assert lease.worker.id == "w1"
    assert lease.waited_s > 0  # it waited for the parked slot to come back
    assert "held=0 parked=0" in repr(here)
    await there.release(lease)
    await here.aclose()
    await there.aclose()


async def test_a_request_that_must_wait_here_gives_the_parked_slots_back_first(
    redis: aioredis.Redis, registry: WorkerRegistry
) -> None:
    await registry.register(pool="other", provider="static", slots=1, worker_id="w2",
                            state=WorkerState.ready)
    broker = broker_for(redis, park_s=60)
    broker.release_now(await broker.acquire(MODEL))
    assert await registry.busy("w1") == 1
    blocker = await registry.acquire_slot("w2")  # the other pool's only slot, taken
    assert blocker is not None
    waiting = asyncio.ensure_future(broker.acquire("qwen2.5:7b"))
    for _ in range(500):
        if "waiting=1" in repr(broker):
            break
        await asyncio.sleep(0.01)
    assert "waiting=1" in repr(broker)
    # long before the 60 s park ended: the registry's counts are true while anyone waits
    assert await registry.busy("w1") == 0
    assert "parked=0" in repr(broker)
    assert await registry.release_slot("w2", blocker)
    lease = await asyncio.wait_for(waiting, timeout=30)
    assert lease.worker.id == "w2"
    broker.release_now(lease)  # somebody waited a moment ago, nobody does now: parked
    assert "parked=1" in repr(broker)
    await broker.aclose()
    assert await registry.busy("w2") == 0  # shutting down gives parked slots back


async def test_a_failed_or_abandoned_answer_gives_its_slot_back_at_once(
    redis: aioredis.Redis, registry: WorkerRegistry
) -> None:
    broker = broker_for(redis, park_s=60)
    lease = await broker.acquire(MODEL)
    await broker.release(lease)  # the error and disconnect paths
    assert await registry.busy("w1") == 0
    assert "held=0 parked=0" in repr(broker)
    broker.release_now(lease)  # already given back: not parked
    assert "parked=0" in repr(broker)
    await broker.aclose()


async def test_parking_never_grants_a_slot_twice_across_replicas(
    redis: aioredis.Redis, registry: WorkerRegistry
) -> None:
    await registry.register(pool="llm", provider="static", slots=3, worker_id="w3",
                            state=WorkerState.ready)
    brokers = [broker_for(redis, park_s=0.05, max_wait_s=60) for _ in range(3)]
    in_use: set[str] = set()
    peak = 0
    served = 0

    async def client(broker: SlotBroker) -> None:
        nonlocal peak, served
        for _ in range(25):
            lease = await broker.acquire(MODEL)
            assert lease.token not in in_use  # one token, one request at a time
            in_use.add(lease.token)
            peak = max(peak, len(in_use))
            await asyncio.sleep(0.002)
            in_use.discard(lease.token)
            served += 1
            broker.release_now(lease)

    await asyncio.gather(*(client(brokers[n % 3]) for n in range(12)))
    assert served == 12 * 25
    assert 2 <= peak <= 4  # w1's one slot and w3's three, never more
    for broker in brokers:
        await broker.aclose()
    assert await registry.busy("w1") == 0
    assert await registry.busy("w3") == 0
