"""Budgets from config: at a pool or global cap the reconciler holds scale-up (the reason is
an event), and work already running is not stopped."""

from __future__ import annotations

import redis.asyncio as aioredis

from gpufleet.scaling.actions import Create, Hold, Stop
from gpufleet.settings import ScalingSettings
from tests.reconciler_harness import COMFY, Fleet

CREATE = ("POST", "/gpu/instance/create")


async def test_pool_budget_per_hour_caps_scale_up(redis: aioredis.Redis) -> None:
    # 0.67 $/h per worker; a 1.5 $/h cap allows two workers, not the five the burst wants.
    fleet = Fleet(redis, pools=[COMFY | {"max_spend_per_hour": 1.5}])
    try:
        await fleet.enqueue(5, pool="comfy")
        report = await fleet.reconciler().reconcile_once()
        assert len(report.of(Create)) == 2
        assert fleet.novita.count(*CREATE) == 2
        holds = [o.action for o in report.of(Hold)]
        assert [h.code for h in holds] == ["budget"]
        assert "pool $/h budget 1.50" in holds[0].reason
        events = await fleet.events.recent(20)
        assert any(e.get("outcome") == "hold" and "budget" in e.get("reason", "") for e in events)
    finally:
        await fleet.aclose()


async def test_global_daily_budget_holds_every_pool_but_stops_nothing(
    redis: aioredis.Redis,
) -> None:
    fleet = Fleet(redis, pools=[COMFY])
    try:
        await fleet.enqueue(1, pool="comfy")
        first = await fleet.reconciler().reconcile_once()
        assert len(first.of(Create)) == 1
        # The day's spend so far (kept in Redis by the reconciler) reaches a new global cap.
        await fleet.pool_state.add_spend("comfy", 10.0)
        fleet.settings = fleet.settings.model_copy(
            update={"scaling": ScalingSettings(max_spend_per_day=5.0)}
        )
        await fleet.enqueue(3, pool="comfy")
        capped = await fleet.reconciler().reconcile_once()
        assert capped.of(Create) == []
        assert capped.of(Stop) == []
        (hold,) = [o.action for o in capped.of(Hold)]
        assert "global $/day budget 5.00" in hold.reason
        assert fleet.novita.count(*CREATE) == 1
        assert len(fleet.novita.instances) == 1  # the running worker is left alone
    finally:
        await fleet.aclose()


async def test_leader_lease_comes_from_config(redis: aioredis.Redis) -> None:
    from gpufleet.scaling.reconciler import Reconciler

    fleet = Fleet(redis, pools=[COMFY], interval_s=1.0)
    try:
        default = Reconciler(fleet.settings, redis, registry=fleet.registry, events=None,
                             providers={})
        assert default.lock.ttl_s == 15.0
        fleet.settings = fleet.settings.model_copy(
            update={"scaling": ScalingSettings(interval_s=1.0, leader_lease_s=4.0)}
        )
        short = Reconciler(fleet.settings, redis, registry=fleet.registry, events=None,
                           providers={})
        assert short.lock.ttl_s == 4.0
        assert await short.lock.acquire()
        assert 0 < await redis.pttl(short.lock.key) <= 4000
    finally:
        await fleet.aclose()
