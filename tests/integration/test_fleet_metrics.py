"""The leader's fleet metrics mean what their help says (real Redis, simulated Novita).

- ``gpufleet_queue_depth`` adds tasks that name the pool and tasks any pool of the engine may
  take; with several pools of one engine the latter show as ``pool="<engine>/*"``.
- ``gpufleet_boot_seconds`` is observed once per boot, also for a worker that became ready
  before the reconciler saw it booting, and never for a ready worker that went back to booting
  after failed probes (no create/start/resume).
- ``gpufleet_cost_per_succeeded_task_dollars`` is the pool's spend over its succeeded tasks,
  and goes with the leadership.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gpufleet.domain import WorkerState
from gpufleet.metrics import is_cold_task_start
from tests.reconciler_harness import COMFY, Fleet


@pytest.fixture
async def fleet(redis: aioredis.Redis) -> AsyncIterator[Fleet]:
    f = Fleet(redis, pools=[COMFY | {"slots": 2}])
    yield f
    await f.aclose()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_queue_depth_adds_pooled_and_unpooled_work(fleet: Fleet) -> None:
    r = fleet.reconciler()
    await fleet.enqueue(2, pool="comfy")
    await fleet.enqueue(3)  # names no pool: the only ComfyUI pool takes it
    await r.reconcile_once()
    assert sample("gpufleet_queue_depth", pool="comfy") == 5
    await r.release()


async def test_unpooled_work_of_several_pools_is_its_own_series(redis: aioredis.Redis) -> None:
    fleet = Fleet(redis, pools=[COMFY, COMFY | {"name": "comfy-b"}])
    try:
        r = fleet.reconciler()
        await fleet.enqueue(1, pool="comfy-b")
        await fleet.enqueue(3)
        await r.reconcile_once()
        assert sample("gpufleet_queue_depth", pool="comfy-b") == 1
        assert sample("gpufleet_queue_depth", pool="comfyui/*") == 3
        assert REGISTRY.get_sample_value("gpufleet_queue_depth", {"pool": "comfy"}) is None
        await r.release()
    finally:
        await fleet.aclose()


async def test_boot_seconds_counts_boots_not_health_blips(fleet: Fleet) -> None:
    r = fleet.reconciler()
    before = sample("gpufleet_boot_seconds_count", pool="comfy")
    await fleet.enqueue(1, pool="comfy")
    report = await r.reconcile_once()
    (worker_id,) = {o.worker_id for o in report.outcomes if o.outcome == "ok"}
    fleet.clock.advance(30)
    # ready before the reconciler ever saw it booting (a fast boot between two ticks)
    assert await fleet.registry.transition(worker_id, WorkerState.ready, "engine answered")
    await r.reconcile_once()
    assert sample("gpufleet_boot_seconds_count", pool="comfy") == before + 1
    assert sample("gpufleet_boot_seconds_sum", pool="comfy") >= 30

    # failed probes: ready -> booting -> ready is no boot
    assert await fleet.registry.transition(worker_id, WorkerState.booting, "no answer")
    fleet.clock.advance(5)
    await r.reconcile_once()
    assert await fleet.registry.transition(worker_id, WorkerState.ready, "engine answered")
    fleet.clock.advance(5)
    await r.reconcile_once()
    assert sample("gpufleet_boot_seconds_count", pool="comfy") == before + 1
    await r.release()


async def test_cost_per_succeeded_task_is_spend_over_successes(fleet: Fleet) -> None:
    r = fleet.reconciler()
    await r.reconcile_once()
    assert REGISTRY.get_sample_value(
        "gpufleet_cost_per_succeeded_task_dollars", {"pool": "comfy"}) is None  # none yet
    await fleet.pool_state.add_spend("comfy", 3.0)
    for _ in range(4):
        await fleet.pool_state.count_succeeded("comfy")
    await r.reconcile_once()
    assert sample("gpufleet_cost_per_succeeded_task_dollars", pool="comfy") == pytest.approx(0.75)
    await r.release()  # not the leader any more: the fleet gauge goes
    assert REGISTRY.get_sample_value(
        "gpufleet_cost_per_succeeded_task_dollars", {"pool": "comfy"}) is None


def test_cold_task_start_rule() -> None:
    # queued at 100; the pool's earliest ready worker became ready at 130: cold
    assert is_cold_task_start(100.0, 1, 130.0)
    # a worker was ready since 90, before the task came: warm, even if busy at the time
    assert not is_cold_task_start(100.0, 1, 90.0)
    # a retry is not a second cold start; an unknown pool is not counted
    assert not is_cold_task_start(100.0, 2, 130.0)
    assert not is_cold_task_start(100.0, 1, None)
