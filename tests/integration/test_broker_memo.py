"""The slot broker remembers which pools serve a model and ``pick_worker``'s order while its
cached worker list is the same; on real Redis, a changed fleet, an excluded worker or a
flood of unknown model names never gets a stale answer."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from gpufleet.domain import WorkerState
from gpufleet.proxy import waiting
from gpufleet.proxy.waiting import ModelNotServed, SlotBroker
from gpufleet.settings import PoolSpec, ProxySettings
from gpufleet.store.workers import WorkerRegistry

MODEL = "llama3.2"
POOLS = [PoolSpec(name="llm", provider="simulated", engine="ollama", models=[MODEL])]


@pytest.fixture
async def registry(redis: aioredis.Redis) -> WorkerRegistry:
    registry = WorkerRegistry(redis)
    await registry.register(pool="llm", provider="static", slots=4, worker_id="w1",
                            state=WorkerState.ready)
    return registry


def broker_for(redis: aioredis.Redis) -> SlotBroker:
    # No parking: every acquire asks Redis for a slot of the worker the order names.
    settings = ProxySettings().model_copy(update={"slot_park_s": 0.0})
    return SlotBroker(WorkerRegistry(redis), redis, POOLS, settings)


async def test_a_refreshed_worker_list_is_routed_afresh(
    redis: aioredis.Redis, registry: WorkerRegistry
) -> None:
    broker = broker_for(redis)
    first = await broker.acquire(MODEL)
    assert first.worker.id == "w1"
    await broker.release(first)
    # The fleet changes: w1 drains, w2 is ready. Once the broker reads the registry again,
    # the remembered order (w1) must not be used.
    await registry.transition("w1", WorkerState.draining)
    await registry.register(pool="llm", provider="static", slots=4, worker_id="w2",
                            state=WorkerState.ready)
    await broker.workers(fresh=True)
    second = await broker.acquire(MODEL)
    assert second.worker.id == "w2"
    await broker.release(second)
    await broker.aclose()


async def test_an_excluded_worker_is_skipped_though_it_is_first_in_the_remembered_order(
    redis: aioredis.Redis, registry: WorkerRegistry
) -> None:
    await registry.register(pool="llm", provider="static", slots=1, worker_id="w2",
                            state=WorkerState.ready)
    broker = broker_for(redis)
    lease = await broker.acquire(MODEL)
    assert lease.worker.id == "w1"  # most free slots first
    await broker.release(lease)
    other = await broker.acquire(MODEL, exclude={"w1"})
    assert other.worker.id == "w2"
    await broker.release(other)
    again = await broker.acquire(MODEL)
    assert again.worker.id == "w1"
    await broker.release(again)
    await broker.aclose()


async def test_unknown_models_past_the_memo_size_change_nothing(
    redis: aioredis.Redis, registry: WorkerRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiting, "_SERVING_MEMO", 4)
    broker = broker_for(redis)
    for i in range(10):
        with pytest.raises(ModelNotServed):
            await broker.acquire(f"nobody-serves-{i}")
        assert len(broker._serving_memo) <= 4
    lease = await broker.acquire(MODEL)
    assert lease.worker.id == "w1"
    await broker.release(lease)
    await broker.aclose()
