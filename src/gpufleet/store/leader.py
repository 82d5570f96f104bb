"""Exactly one replica reconciles: a Redis lease lock with a fencing token.

``acquire()`` takes or renews the lock and returns the fencing token (an epoch
that only ever grows) while this replica holds it, else ``None``. Whoever acts
on the lock's behalf passes the token to ``check()`` right before acting; a
replica that was paused past its lease finds a newer epoch there and stops, so
a stale leader's actions are refused even if it still believes it leads.
"""

from __future__ import annotations

import logging
import uuid
from typing import cast

import redis.asyncio as aioredis

from gpufleet.store import scripts
from gpufleet.store.keys import Keys

logger = logging.getLogger(__name__)

class LeaderLock:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "gpufleet",
        name: str = "reconciler",
        replica_id: str | None = None,
        ttl_s: float = 15.0,
    ) -> None:
        self.redis = redis
        keys = Keys(prefix)
        self.key = keys.leader(name)
        self.epoch_key = keys.leader_epoch(name)
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.ttl_s = ttl_s
        self.token: int | None = None
        self._acquire = scripts.register(redis, "leader_acquire")
        self._check = scripts.register(redis, "leader_check")
        self._release = scripts.register(redis, "leader_release")

    def __repr__(self) -> str:
        return f"<LeaderLock {self.key} replica={self.replica_id} token={self.token}>"

    async def acquire(self) -> int | None:
        """Take or renew the lock; the fencing token while we lead, else None."""
        epoch = int(
            cast(
                int,
                await self._acquire(
                    keys=[self.key, self.epoch_key],
                    args=[self.replica_id, int(self.ttl_s * 1000)],
                ),
            )
        )
        previous, self.token = self.token, (epoch or None)
        if self.token != previous:
            if self.token is None:
                logger.warning("replica %s lost leadership (token %s)", self.replica_id, previous)
            else:
                logger.info("replica %s is leader (token %s)", self.replica_id, self.token)
        return self.token

    async def check(self, token: int | None = None) -> bool:
        """True only if this replica still holds the lock with ``token``."""
        token = token if token is not None else self.token
        if token is None:
            return False
        ok = await self._check(keys=[self.key], args=[self.replica_id, token])
        return bool(ok)

    async def release(self) -> None:
        """Give the lock up at once (graceful shutdown), so another replica takes over."""
        if self.token is not None:
            await self._release(keys=[self.key], args=[self.replica_id, self.token])
            logger.info("replica %s released leadership", self.replica_id)
        self.token = None
