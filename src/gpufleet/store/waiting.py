"""Proxy requests waiting for a slot, per pool: the demand a queue does not hold.

``P:proxy:waiting:{pool}`` (``Keys.proxy_waiting``) is a ZSET of request ids scored by the
request's deadline (epoch s). The proxy adds an entry while a request waits for a slot of the
pool, announcing it on ``P:wake`` so the reconciler on any replica looks at once, and removes
it when the request got a slot or gave up. An entry past its deadline is a dead replica's: it
counts for nobody, and the leader (who tidies shared state) drops it in ``prune_and_count``;
everyone else reads with ``live`` and leaves it.

Readers: the reconciler (``scaling/observe.py`` through ``store/demand.py``) and
``GET /api/v1/pools``. Writer: the proxy (``proxy/waiting.py``, which still writes the same
names itself; ``add``/``remove`` here are the shared form for it to move to).
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from gpufleet.store.keys import Keys


class WaitingRequests:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    def __repr__(self) -> str:
        return f"<WaitingRequests {self.keys.prefix}>"

    def key(self, pool: str) -> str:
        return self.keys.proxy_waiting(pool)

    async def add(self, pool: str, request_id: str, deadline: float) -> None:
        """One request waits for a slot of ``pool`` until ``deadline``; wakes the scaler."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.key(pool), {request_id: deadline})
            pipe.publish(self.keys.wake(), pool)
            await pipe.execute()

    async def remove(self, pool: str, request_id: str) -> None:
        await self.redis.zrem(self.key(pool), request_id)

    async def live(self, pool: str, now: float) -> int:
        """Requests waiting for ``pool`` whose deadline is after ``now`` (read only)."""
        return int(await self.redis.zcount(self.key(pool), f"({now}", "+inf"))

    async def prune_and_count(self, pools: Iterable[str], now: float) -> dict[str, int]:
        """Per pool, drop entries past their deadline and count the rest (pools with none
        left out). Leader only: it writes."""
        names = list(pools)
        if not names:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                key = self.key(name)
                pipe.zremrangebyscore(key, "-inf", now)
                pipe.zcard(key)
            answers = await pipe.execute()
        return {name: int(n) for name, n in zip(names, answers[1::2], strict=True) if int(n)}
