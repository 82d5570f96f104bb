"""The reconciler against real Redis and the real clients talking to the simulated clouds.

Time is a ``FakeClock`` shared by the clouds, the registry and the reconciler; the health
checker's part (booting -> ready) is done by hand with ``fleet.ready_all()``. Every outcome is
checked on the simulated cloud's own state as well as in the registry.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gpufleet.api.pools import describe
from gpufleet.domain import WorkerState
from gpufleet.providers.simulated import Fault, SimNovitaConfig
from gpufleet.scaling.actions import Adopt, Create, Delete, Drain, MarkFailed, Pause, Resume, Stop
from gpufleet.scaling.keepalive import park_timeout_s
from gpufleet.scaling.reconciler import Reconciler
from tests.reconciler_harness import COMFY, GPU, PREFIX, Fleet

CREATE = ("POST", "/gpu/instance/create")


@pytest.fixture
async def fleet(redis: aioredis.Redis) -> AsyncIterator[Fleet]:
    f = Fleet(redis, pools=[COMFY | {"slots": 2}])
    yield f
    await f.aclose()


async def test_burst_scales_from_zero_to_ceil_d_over_slots_and_no_second_wave(
    fleet: Fleet,
) -> None:
    r = fleet.reconciler()
    await fleet.enqueue(5, pool="comfy")
    report = await r.reconcile_once()
    assert report.leader
    assert len(report.of(Create)) == math.ceil(5 / 2)
    assert all(o.outcome == "ok" for o in report.of(Create))
    assert fleet.novita.count(*CREATE) == 3
    assert set((await fleet.states()).values()) == {"provisioning"}
    # worker id == provider instance id, and the cloud holds exactly those
    assert set(await fleet.states()) == set(fleet.novita.instances)

    for _ in range(4):  # replan while the boots pend: no second wave
        fleet.clock.advance(3)
        await r.reconcile_once()
    assert fleet.novita.count(*CREATE) == 3
    # the instances run now: records got their endpoint and moved to booting
    workers = await fleet.registry.list_workers("comfy")
    assert {w.state for w in workers} == {WorkerState.booting}
    assert all(w.base_url.startswith("https://") for w in workers)

    # every decision is an event with its outcome and reason, and shows in GET /pools
    events = await fleet.events.recent(50)
    creates = [e for e in events if e.get("action") == "create"]
    assert len(creates) == 3
    assert all(e["outcome"] == "ok" and "uncovered" in e["reason"] for e in creates)
    pool = await describe(
        fleet.settings.pool("comfy"),
        store=fleet.pool_state,
        registry=fleet.registry,
        events=fleet.events,
        demand=r.demand,
    )
    assert pool["workers_by_state"] == {"booting": 3}
    assert pool["demand"]["queued"] == 5
    assert any(a.get("action") == "create" for a in pool["last_actions"])
    assert pool["spend_usd"] > 0  # booting instances bill


async def one_worker_that_ran_a_task(fleet: Fleet, r: Reconciler) -> str:
    """Scale from zero for one task, let the worker boot, run the task and finish it."""
    await fleet.enqueue(1, pool="comfy")
    await r.reconcile_once()
    fleet.clock.advance(13)
    await r.reconcile_once()
    (worker_id,) = await fleet.ready_all()
    (lease,) = await fleet.queue.lease(worker_id, ["comfy"])
    await fleet.queue.ack(lease.task_id, lease.token, {"ok": True})
    return worker_id


async def test_idle_worker_is_drained_stopped_then_deleted_after_park_timeout(
    fleet: Fleet,
) -> None:
    r = fleet.reconciler()
    worker_id = await one_worker_that_ran_a_task(fleet, r)

    fleet.clock.advance(60)
    report = await r.reconcile_once()
    assert not report.of(Stop)  # not idle long enough yet
    fleet.clock.advance(61)
    report = await r.reconcile_once()
    assert [o.outcome for o in report.of(Drain)] == ["ok"]
    assert [o.outcome for o in report.of(Stop)] == ["ok"]
    assert (await fleet.states())[worker_id] == "stopping"
    fleet.clock.advance(3)
    await r.reconcile_once()
    assert (await fleet.states())[worker_id] == "stopped"
    assert fleet.novita.instances[worker_id].status == "exited"

    snapshot = (await r.reconcile_once()).snapshot
    assert snapshot is not None
    parked = park_timeout_s(snapshot.pools[0])
    assert 3600 < parked < 7 * 86400  # from cost: disk rent vs one cold start
    fleet.clock.advance(parked + 1)
    report = await r.reconcile_once()
    assert [o.outcome for o in report.of(Delete)] == ["ok"]
    assert await fleet.states() == {}
    assert fleet.novita.instances[worker_id].status in ("toRemove", "removing", "removed")
    runtime = await fleet.pool_state.runtime("comfy")
    assert runtime.spend_usd > 0


async def test_a_stopped_worker_is_started_again_on_demand(fleet: Fleet) -> None:
    r = fleet.reconciler()
    worker_id = await one_worker_that_ran_a_task(fleet, r)
    fleet.clock.advance(121)
    await r.reconcile_once()
    fleet.clock.advance(3)
    await r.reconcile_once()
    assert (await fleet.states())[worker_id] == "stopped"

    await fleet.enqueue(1, pool="comfy")
    report = await r.reconcile_once()
    assert [o.action.worker_id for o in report.outcomes if o.outcome == "ok"] == [worker_id]
    assert fleet.novita.count(*CREATE) == 1  # started, not created
    fleet.clock.advance(5)
    await r.reconcile_once()
    worker = await fleet.registry.get(worker_id)
    assert worker.state is WorkerState.booting
    assert worker.base_url


async def test_a_busy_worker_is_never_stopped(fleet: Fleet) -> None:
    r = fleet.reconciler()
    worker_id = await one_worker_that_ran_a_task(fleet, r)
    fleet.clock.advance(121)
    snapshot, seen = await r.observe()
    from gpufleet.scaling.policy import plan

    actions = plan(snapshot)
    assert any(isinstance(a, Stop) for a in actions)
    # a proxy stream takes the slot between observe and apply
    await fleet.registry.acquire_slot(worker_id)
    outcomes = await r.apply(actions, snapshot, seen)
    assert [o.outcome for o in outcomes if isinstance(o.action, Stop)] == ["skipped"]
    assert fleet.novita.instances[worker_id].status == "running"


async def test_boot_timeout_marks_failed_deletes_the_instance_and_backs_off(
    redis: aioredis.Redis,
) -> None:
    fleet = Fleet(
        redis,
        pools=[COMFY | {"boot_timeout_s": 60}],
        novita=SimNovitaConfig(create_s=2, pull_s=10, hang_in_pulling=1),
    )
    try:
        r = fleet.reconciler()
        await fleet.enqueue(1, pool="comfy")
        await r.reconcile_once()
        (worker_id,) = await fleet.states()
        fleet.clock.advance(30)
        await r.reconcile_once()
        assert fleet.novita.instances[worker_id].status == "pulling"
        fleet.clock.advance(31)
        report = await r.reconcile_once()
        assert [o.outcome for o in report.of(MarkFailed)] == ["ok"]
        assert [o.outcome for o in report.of(Delete)] == ["ok"]
        assert fleet.novita.instances[worker_id].status == "toRemove"  # no longer billing
        assert worker_id not in await fleet.states()
        runtime = await fleet.pool_state.runtime("comfy")
        assert runtime.backoff_until is not None
        assert runtime.failures == 1
        # the task still waits, but the pool is backed off: a Hold, not a create loop
        report = await r.reconcile_once()
        assert not report.of(Create)
        assert any(o.outcome == "hold" for o in report.outcomes)
        fleet.clock.advance(31)
        report = await r.reconcile_once()
        assert [o.outcome for o in report.of(Create)] == ["ok"]
    finally:
        await fleet.aclose()


async def test_orphans_are_deleted_or_adopted(fleet: Fleet) -> None:
    r = fleet.reconciler()
    provider = r.providers["novita"]
    spec = fleet.settings.pool("comfy")
    stray = await provider.create(spec, "comfy-stray")  # ours by name, unknown to the registry
    wanted = await provider.create(spec, "comfy-wanted")
    other = await provider.create(spec, "retired-pool-1")  # a pool no longer configured
    fleet.clock.advance(13)
    await fleet.enqueue(1, pool="comfy")
    report = await r.reconcile_once()
    adopted = [o for o in report.of(Adopt) if o.outcome == "ok"]
    deleted = {o.instance_id for o in report.of(Delete) if o.outcome == "ok"}
    assert len(adopted) == 1
    assert adopted[0].instance_id in (stray.id, wanted.id)
    assert deleted == {stray.id, wanted.id, other.id} - {adopted[0].instance_id}
    assert not report.of(Create)  # the adopted orphan serves the task
    assert (await fleet.states()) == {adopted[0].instance_id: "booting"}
    for inst_id in deleted:
        assert fleet.novita.instances[inst_id].status == "toRemove"


async def test_a_create_whose_record_was_lost_is_recovered_not_deleted(fleet: Fleet) -> None:
    r = fleet.reconciler()
    provider = r.providers["novita"]
    # gpufleet died between the create call and writing the record: only the intent remains
    await fleet.redis.hset(
        r.intents_key, "comfy-lost0001", f'{{"pool": "comfy", "at": {fleet.clock()}}}'
    )
    inst = await provider.create(fleet.settings.pool("comfy"), "comfy-lost0001")
    report = await r.reconcile_once()
    assert not report.of(Delete)
    assert (await fleet.states()) == {inst.id: "provisioning"}
    assert not await fleet.redis.hgetall(r.intents_key)


async def test_provider_error_storm_never_crashes_and_converges(fleet: Fleet) -> None:
    r = fleet.reconciler()
    await fleet.enqueue(3, pool="comfy")
    fleet.novita.faults.append(Fault(status=503, times=40))
    fleet.novita.faults.append(Fault(status=429, times=40, retry_after_s=2))
    for _ in range(6):
        report = await r.reconcile_once()  # never raises
        assert report.leader
        fleet.clock.advance(5)
    assert fleet.novita.instances == {}
    assert "novita" not in {k.value for k in report.snapshot.listed_providers}  # type: ignore[union-attr]
    fleet.novita.faults.clear()
    for _ in range(40):
        fleet.clock.advance(10)
        await r.reconcile_once()
        if len(await fleet.states()) == 2:
            break
    assert fleet.novita.count(*CREATE) == 2  # ceil(3 / 2), no duplicates from the retries
    assert len(fleet.novita.instances) == 2


async def test_surf_workspace_is_resumed_on_demand_and_paused_when_idle(
    redis: aioredis.Redis,
) -> None:
    fleet = Fleet(redis, pools=[GPU])
    try:
        r = fleet.reconciler()
        report = await r.reconcile_once()
        assert len([o for o in report.of(Adopt) if o.outcome == "ok"]) == 2  # pre-made workspaces
        assert set((await fleet.states()).values()) == {"paused"}

        # a proxy request waits for the pool
        waiting = f"{PREFIX}:proxy:waiting:gpu"
        await redis.zadd(waiting, {"req-1": fleet.clock() + 300})
        report = await r.reconcile_once()
        (resumed,) = [o for o in report.of(Resume) if o.outcome == "ok"]
        ws = fleet.surf.workspaces[resumed.worker_id]
        assert ws.status == "resuming"
        fleet.clock.advance(4)
        await r.reconcile_once()
        worker = await fleet.registry.get(resumed.worker_id)
        assert worker.state is WorkerState.booting
        assert worker.base_url == f"http://{ws.ip}:11434"
        await fleet.ready_all()
        await redis.zrem(waiting, "req-1")

        fleet.clock.advance(61)
        report = await r.reconcile_once()
        assert [o.outcome for o in report.of(Pause)] == ["ok"]
        fleet.clock.advance(3)
        await r.reconcile_once()
        assert ws.status == "paused"
        assert (await fleet.states())[resumed.worker_id] == "paused"
        assert fleet.surf.count("POST", "/resume/") == 1
    finally:
        await fleet.aclose()


async def test_failed_surf_resume_backs_the_pool_off(redis: aioredis.Redis) -> None:
    from gpufleet.providers.simulated import SimSurfConfig

    fleet = Fleet(redis, pools=[GPU], surf=SimSurfConfig(fail_resumes=1))
    try:
        r = fleet.reconciler()
        await r.reconcile_once()
        await fleet.enqueue(1, kind="ollama", pool="gpu")
        report = await r.reconcile_once()
        (resumed,) = [o for o in report.of(Resume) if o.outcome == "ok"]
        fleet.clock.advance(4)
        await r.reconcile_once()
        assert (await fleet.states())[resumed.worker_id] == "paused"
        runtime = await fleet.pool_state.runtime("gpu")
        assert runtime.backoff_until is not None
        assert "resume failed" in runtime.backoff_reason
    finally:
        await fleet.aclose()


async def test_metrics_show_actions_and_fleet(fleet: Fleet) -> None:
    from prometheus_client import REGISTRY

    r = fleet.reconciler()
    before = (
        REGISTRY.get_sample_value(
            "gpufleet_scale_actions_total", {"pool": "comfy", "action": "create", "outcome": "ok"}
        )
        or 0.0
    )
    await fleet.enqueue(2, pool="comfy")
    await r.reconcile_once()
    after = REGISTRY.get_sample_value(
        "gpufleet_scale_actions_total", {"pool": "comfy", "action": "create", "outcome": "ok"}
    )
    assert after == before + 1
    assert REGISTRY.get_sample_value("gpufleet_is_leader") == 1
    assert REGISTRY.get_sample_value("gpufleet_queue_depth", {"pool": "comfy"}) == 2
    fleet.clock.advance(1)
    await r.reconcile_once()
    assert (
        REGISTRY.get_sample_value("gpufleet_workers", {"pool": "comfy", "state": "provisioning"})
        == 1
    )
    await r.release()
    assert REGISTRY.get_sample_value("gpufleet_is_leader") == 0
