"""Leader lock on a real Redis: one leader, takeover after expiry, stale tokens refused."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from gpufleet.store.leader import LeaderLock


async def test_only_one_of_many_replicas_leads(redis: aioredis.Redis) -> None:
    locks = [LeaderLock(redis, replica_id=f"r{i}") for i in range(10)]
    tokens = await asyncio.gather(*(lock.acquire() for lock in locks))
    assert len([t for t in tokens if t]) == 1
    leader = locks[tokens.index(next(t for t in tokens if t))]
    assert await leader.acquire() == leader.token  # renew keeps the same token
    assert await leader.check()


async def test_takeover_after_expiry_fences_the_old_leader(redis: aioredis.Redis) -> None:
    old = LeaderLock(redis, replica_id="old", ttl_s=0.2)
    new = LeaderLock(redis, replica_id="new", ttl_s=5)
    first = await old.acquire()
    assert first is not None
    assert await new.acquire() is None
    await asyncio.sleep(0.3)  # the old leader is "paused" past its lease
    second = await new.acquire()
    assert second is not None
    assert second > first
    # The old leader still believes its token; Redis refuses it.
    assert old.token == first
    assert not await old.check()
    assert await new.check()
    assert await old.acquire() is None
    assert old.token is None


async def test_release_hands_over_at_once(redis: aioredis.Redis) -> None:
    a = LeaderLock(redis, replica_id="a", ttl_s=60)
    b = LeaderLock(redis, replica_id="b", ttl_s=60)
    assert await a.acquire()
    assert await b.acquire() is None
    await b.release()  # not the holder: must not delete a's lock
    assert await a.check()
    await a.release()
    assert await b.acquire() is not None
