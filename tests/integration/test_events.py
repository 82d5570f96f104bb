"""Event log on a real Redis: capped, newest first, followable."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from gpufleet.store.events import EventLog


async def test_emit_recent_and_filter(redis: aioredis.Redis) -> None:
    log = EventLog(redis, clock=lambda: 42.0)
    await log.emit("scale", pool="a", action="Create", reason="2 queued", count=2)
    await log.emit("scale", pool="b", action="Stop", reason="idle 600 s")
    events = await log.recent()
    assert [e["pool"] for e in events] == ["b", "a"]
    assert events[1]["count"] == 2
    assert events[1]["ts"] == 42.0
    assert [e["action"] for e in await log.recent(pool="a")] == ["Create"]


async def test_stream_is_capped(redis: aioredis.Redis) -> None:
    log = EventLog(redis, maxlen=100)
    for i in range(1000):
        await log.emit("tick", n=i)
    assert await redis.xlen(log.key) < 300


async def test_follow_sees_new_events(redis: aioredis.Redis) -> None:
    log = EventLog(redis)
    await log.emit("old")
    stream = log.follow(block_ms=2000)
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.05)
    await log.emit("new", pool="p")
    event = await asyncio.wait_for(first, 5)
    assert event is not None
    assert event["kind"] == "new"
    await stream.aclose()
