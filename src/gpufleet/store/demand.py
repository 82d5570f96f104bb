"""Demand as Redis holds it: the queue's counters and the proxy's waiting requests.

Two readers of one thing: the reconciler (``scaling/observe.py``) reads it every tick to build
the ``Snapshot``'s demand groups, and ``GET /api/v1/pools`` shows each pool's demand now
(``pool_demand``). Both go through this module, so what a pool "has waiting" means the same
on the page as in the scaling decision.

The proxy's waiting requests are ``store/waiting.py``'s (``WaitingRequests``).

This module reads counters only, never the tasks, and does not decide anything: grouping the
demand by the pools that may serve it is the reconciler's (``scaling.observe.demand_groups``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis

from gpufleet.settings import PoolSpec
from gpufleet.store.keys import Keys
from gpufleet.store.queue import TaskQueue
from gpufleet.store.waiting import WaitingRequests
from gpufleet.tasks import QueueStats


class DemandReader:
    """Reads queued, waiting and in-flight work per pool; shared by the reconciler and the API."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        queue: TaskQueue | None,
        pools: Iterable[PoolSpec] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.waiting_requests = WaitingRequests(redis, self.keys)
        self.queue = queue
        self.specs = {p.name: p for p in pools}
        self.clock = clock

    def __repr__(self) -> str:
        return f"<DemandReader prefix={self.prefix} pools={len(self.specs)}>"

    async def stats(self) -> QueueStats | None:
        """The queue's counters (None when this process has no queue)."""
        return await self.queue.stats() if self.queue is not None else None

    async def waiting(self, pools: Iterable[str], now: float) -> dict[str, int]:
        """Proxy requests waiting per pool (pools with none left out); entries past their
        deadline (a dead replica's) are dropped here. Leader only: it writes."""
        return await self.waiting_requests.prune_and_count(pools, now)

    async def pool_demand(self, pool: str) -> dict[str, Any]:
        """The pool's demand now, from queue counters and the proxy's waiting set (read only:
        expired waiting entries are not counted, and left for the leader to drop)."""
        spec = self.specs.get(pool)
        now = self.clock()
        stats = await self.stats()
        waiting = await self.waiting_requests.live(pool, now)
        if stats is None or spec is None:
            return {"queued": 0, "waiting": waiting, "in_flight": 0, "oldest_wait_s": 0.0}
        oldest = stats.oldest_by_pool.get(pool)
        return {
            "queued": stats.queued_by_pool.get(pool, 0),
            "queued_any_pool": stats.queued_unpooled.get(spec.engine.value, 0),
            "waiting": waiting,
            "in_flight": stats.running_by_pool.get(pool, 0),
            "oldest_wait_s": round(max(0.0, now - oldest), 3) if oldest else 0.0,
        }
