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

from gpufleet.store import scripts
from gpufleet.store.keys import Keys


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
        self._take = scripts.register(redis, "stream_take")
        self._renew = scripts.register(redis, "stream_renew")

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
