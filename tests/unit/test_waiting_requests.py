"""``store/waiting.py``: the proxy's waiting requests per pool, as the scaler reads them."""

from __future__ import annotations

import redis.asyncio as aioredis

from gpufleet.proxy.waiting import waiting_key, wake_channel
from gpufleet.store.keys import Keys
from gpufleet.store.waiting import WaitingRequests


async def test_same_names_as_the_proxy_writes(fake_redis: aioredis.Redis) -> None:
    waiting = WaitingRequests(fake_redis, Keys("P"))
    assert waiting.key("llm") == waiting_key("P", "llm")
    assert Keys("P").wake() == wake_channel("P")


async def test_live_reads_and_prune_drops_only_the_expired(fake_redis: aioredis.Redis) -> None:
    waiting = WaitingRequests(fake_redis, Keys("P"))
    await waiting.add("llm", "r1", 100.0)
    await waiting.add("llm", "r2", 200.0)
    await waiting.add("img", "r3", 50.0)
    assert await waiting.live("llm", 150.0) == 1
    assert await waiting.live("llm", 99.0) == 2
    assert await fake_redis.zcard(waiting.key("llm")) == 2  # reading drops nothing
    assert await waiting.prune_and_count(["llm", "img", "none"], 150.0) == {"llm": 1}
    assert await fake_redis.zrange(waiting.key("llm"), 0, -1) == ["r2"]
    assert await fake_redis.exists(waiting.key("img")) == 0
    await waiting.remove("llm", "r2")
    assert await waiting.live("llm", 0.0) == 0
    assert await waiting.prune_and_count([], 0.0) == {}
