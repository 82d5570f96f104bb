"""Places for open event streams, counted per API key across every replica.

``P:streams:{bucket}`` is a ZSET of stream tokens scored by their lease deadline (epoch
ms). Taking a place first drops the expired leases, so a replica that died with streams
open frees their places within ``lease_s``; a live stream renews its lease while it is
open and removes its token when it closes. The key itself carries a TTL of one lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis.asyncio as aioredis

from gpufleet.store.keys import Keys

# KEYS: the bucket's zset. ARGV: now ms, deadline ms, token, max, ttl ms.
# Returns 1 if a place was taken, 0 if the bucket is full.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: the bucket's zset. ARGV: deadline ms, token, ttl ms. Renews a held place only.
_RENEW = """
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


class StreamPlaces:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "gpufleet",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.clock = clock
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)

    def key(self, bucket: str) -> str:
        return self.keys.streams(bucket)

    async def take(self, bucket: str, token: str, *, limit: int, lease_s: float) -> bool:
        now_ms = int(self.clock() * 1000)
        lease_ms = int(lease_s * 1000)
        taken = await self._take(
            keys=[self.key(bucket)], args=[now_ms, now_ms + lease_ms, token, limit, lease_ms]
        )
        return bool(taken)

    async def renew(self, bucket: str, token: str, *, lease_s: float) -> bool:
        lease_ms = int(lease_s * 1000)
        deadline = int(self.clock() * 1000) + lease_ms
        return bool(await self._renew(keys=[self.key(bucket)], args=[deadline, token, lease_ms]))

    async def release(self, bucket: str, token: str) -> None:
        await self.redis.zrem(self.key(bucket), token)

    async def held(self, bucket: str) -> int:
        """Places held now (expired leases not counted)."""
        now_ms = int(self.clock() * 1000)
        count: int = await self.redis.zcount(self.key(bucket), f"({now_ms}", "+inf")
        return count
