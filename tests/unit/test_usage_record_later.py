"""``UsageStore.record_later``: the proxy's records that no budget can see wait for the
next flush (what is written is what ``record`` writes); the others are refused, so the
caller uses ``record``."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from gpufleet.store.teams import Periods
from gpufleet.store.usage import UsageStore, usage_key

NOW = 1_780_000_000.0


def store(redis: aioredis.Redis, flush_interval_s: float = 5.0) -> UsageStore:
    return UsageStore(redis, prefix="t", flush_interval_s=flush_interval_s,
                      clock=lambda: NOW)


RECORD: dict[str, Any] = dict(key="k1", pool="llm", model="llama3.2", kind="requests", gpu_s=2.0,
              tokens_in=7, tokens_out=11)


async def test_noted_records_are_written_by_the_flush_as_record_writes_them(
    fake_redis: aioredis.Redis,
) -> None:
    later, now = store(fake_redis), UsageStore(fake_redis, prefix="u", clock=lambda: NOW)
    for _ in range(3):
        assert later.record_later(owner_team="", usd=0.5, **RECORD)
        await now.record(owner_team="", usd=0.5, **RECORD)
    day, _ = Periods().of(NOW)
    assert await fake_redis.hgetall(usage_key("t", day)) == {}  # nothing written yet
    await later.flush()
    await now.flush()
    written = await fake_redis.hgetall(usage_key("t", day))
    assert written == await fake_redis.hgetall(usage_key("u", day))
    assert float(written["|k1|llm|llama3.2|requests"]) == 3
    assert float(written["|k1|llm|llama3.2|tokens_out"]) == 33


async def test_a_teams_spend_and_write_at_once_are_refused(fake_redis: aioredis.Redis) -> None:
    assert not store(fake_redis).record_later(owner_team="ml", usd=0.5, **RECORD)
    assert not store(fake_redis, flush_interval_s=0).record_later(owner_team="", usd=0.0,
                                                                 **RECORD)
    # A team's record with nothing spent has no budget to move: it may wait.
    assert store(fake_redis).record_later(owner_team="ml", usd=0.0, **RECORD)


async def test_a_noted_record_makes_a_flush_due(fake_redis: aioredis.Redis) -> None:
    usage = store(fake_redis)
    assert not usage._flush_due()
    usage.record_later(owner_team="", usd=0.0, **RECORD)
    assert usage._flush_due()  # the last flush was at 0: long ago
