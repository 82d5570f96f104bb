"""Two replicas on one Redis against one simulated cloud; the fence; wake on enqueue."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from gpufleet.scaling.actions import Create
from gpufleet.scaling.policy import plan
from tests.reconciler_harness import COMFY, Fleet

CREATE = ("POST", "/gpu/instance/create")


@pytest.fixture
async def fleet(redis: aioredis.Redis) -> AsyncIterator[Fleet]:
    f = Fleet(redis, pools=[COMFY])
    yield f
    await f.aclose()


async def test_two_replicas_never_double_create(fleet: Fleet) -> None:
    a, b = fleet.reconciler("a"), fleet.reconciler("b")
    await fleet.enqueue(4, pool="comfy")
    for _ in range(6):
        reports = await asyncio.gather(a.reconcile_once(), b.reconcile_once())
        assert sum(r.leader for r in reports) == 1
        fleet.clock.advance(3)
    assert fleet.novita.count(*CREATE) == 4
    assert len(fleet.novita.instances) == 4
    assert len(await fleet.states()) == 4


async def test_a_stale_leaders_create_is_refused_by_the_fence(fleet: Fleet) -> None:
    old, new = fleet.reconciler("old"), fleet.reconciler("new")
    await fleet.enqueue(2, pool="comfy")
    assert await old.lock.acquire() is not None
    snapshot, seen = await old.observe()
    actions = plan(snapshot)
    assert len([a for a in actions if isinstance(a, Create)]) == 2
    # "old" stalls past its lease (the key expires) and "new" takes over
    await fleet.redis.delete(old.lock.key)
    report = await new.reconcile_once()
    assert report.leader
    assert fleet.novita.count(*CREATE) == 2
    # "old" wakes up and applies what it planned: every action is refused, nothing is sent
    outcomes = await old.apply(actions, snapshot, seen)
    assert {o.outcome for o in outcomes if isinstance(o.action, Create)} == {"refused"}
    assert fleet.novita.count(*CREATE) == 2
    assert (await old.reconcile_once()).leader is False
    events = await fleet.events.recent(20)
    assert any(e.get("outcome") == "refused" and e.get("replica") == "old" for e in events)


async def test_release_on_shutdown_hands_over_at_once(fleet: Fleet) -> None:
    a, b = fleet.reconciler("a", lock_ttl_s=600), fleet.reconciler("b", lock_ttl_s=600)
    assert (await a.reconcile_once()).leader
    assert not (await b.reconcile_once()).leader
    await a.release()
    assert (await b.reconcile_once()).leader


async def test_wake_on_enqueue_ticks_without_waiting_for_the_interval(
    redis: aioredis.Redis,
) -> None:
    fleet = Fleet(redis, pools=[COMFY], interval_s=3600)  # only a wake can make a second tick
    r = fleet.reconciler()
    stop = asyncio.Event()
    task = r.spawn(stop)
    try:
        await eventually(lambda: r.last_report is not None)
        await eventually_async(subscribed, redis, r.wake_channel)
        assert fleet.novita.count(*CREATE) == 0  # the first tick saw no demand
        await fleet.enqueue(1, pool="comfy")  # the queue publishes on {prefix}:wake
        await eventually(lambda: fleet.novita.count(*CREATE) > 0)
        assert fleet.novita.count(*CREATE) == 1
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fleet.aclose()
    assert not await redis.exists(r.lock.key)  # released on shutdown


async def subscribed(redis: aioredis.Redis, channel: str) -> bool:
    answer = await redis.pubsub_numsub(channel)
    return bool(answer and int(answer[0][1]) > 0)


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(0.01)


async def eventually_async(
    condition: Callable[..., Awaitable[bool]], *args: object, timeout_s: float = 10.0
) -> None:
    async with asyncio.timeout(timeout_s):
        for _ in itertools.count():
            if await condition(*args):
                return
            await asyncio.sleep(0.01)
