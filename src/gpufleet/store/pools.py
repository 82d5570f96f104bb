"""Run-time pool state in Redis: operator overrides, scale floors, spend and backoff.

Config (``[[pools]]``) is the baseline; ``PATCH /api/v1/pools/{name}`` writes
overrides here, and every replica applies them over the config when it reads a
pool (``effective``), so a change survives restarts and reaches all replicas. A
scale floor (``POST /pools/{name}/scale``) is a min_workers that expires by
itself. Spend is a float counter per pool and per UTC day; backoff is a
deadline per pool written by the reconciler after capacity/quota errors or
failed boots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from gpufleet.settings import PoolSpec
from gpufleet.store.keys import Keys
from gpufleet.store.teams import Periods
from gpufleet.store.usage import usage_key

OVERRIDABLE = ("min_workers", "max_workers", "idle_timeout_s")
# An idle_timeout_s override of "auto" is stored as this number (overrides are numbers).
AUTO_OVERRIDE = -1.0


@dataclass(frozen=True)
class PoolRuntime:
    """What Redis adds to a pool's config."""

    overrides: dict[str, float]
    floor: int
    floor_until: float | None
    spend_usd: float
    spend_today_usd: float
    backoff_until: float | None
    backoff_reason: str
    failures: int
    succeeded: int = 0  # queued tasks that succeeded on the pool's workers (cost per task)


class PoolStateStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "gpufleet",
        clock: Callable[[], float] = time.time,
        periods: Periods | None = None,
        usage_retention_days: int = 400,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.clock = clock
        # The usage aggregates' calendar (``[usage] timezone``): a pool's spend also goes to
        # its day there, so usage reports show overhead = spend - attributed.
        self.periods = periods or Periods()
        self.usage_ttl_s = usage_retention_days * 86400

    def _key(self, pool: str) -> str:
        return self.keys.pool_state(pool)

    def _day(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.clock()))

    async def runtime(self, pool: str) -> PoolRuntime:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key(pool))
            pipe.hget(self.keys.spend(self._day()), pool)
            data, today = await pipe.execute()
        data = cast(dict[str, str], data)
        now = self.clock()
        floor_until = float(data["floor_until"]) if data.get("floor_until") else None
        floor = int(data.get("floor", "0")) if floor_until and floor_until > now else 0
        backoff_until = float(data["backoff_until"]) if data.get("backoff_until") else None
        return PoolRuntime(
            overrides={k: float(data[k]) for k in OVERRIDABLE if data.get(k)},
            floor=floor,
            floor_until=floor_until if floor else None,
            spend_usd=float(data.get("spend_usd", "0")),
            spend_today_usd=float(today or 0),
            backoff_until=backoff_until if backoff_until and backoff_until > now else None,
            backoff_reason=data.get("backoff_reason", ""),
            failures=int(data.get("failures", "0")),
            succeeded=int(data.get("succeeded", "0")),
        )

    async def effective(self, spec: PoolSpec) -> tuple[PoolSpec, PoolRuntime]:
        """The pool's config with overrides and an active floor applied."""
        runtime = await self.runtime(spec.name)
        update: dict[str, Any] = {
            k: (int(v) if k != "idle_timeout_s" else ("auto" if v == AUTO_OVERRIDE else v))
            for k, v in runtime.overrides.items()
        }
        merged = spec.model_copy(update=update)
        min_workers = max(merged.min_workers, min(runtime.floor, merged.max_workers))
        if min_workers > merged.min_workers:
            merged = merged.model_copy(update={"min_workers": min_workers})
        if merged.min_workers > merged.max_workers:
            merged = merged.model_copy(update={"min_workers": merged.max_workers})
        return merged, runtime

    async def set_overrides(self, pool: str, **values: float | None) -> None:
        """Set (a number) or clear (None) run-time overrides."""
        key = self._key(pool)
        clear = [k for k, v in values.items() if v is None and k in OVERRIDABLE]
        mapping = {k: v for k, v in values.items() if v is not None and k in OVERRIDABLE}
        async with self.redis.pipeline(transaction=True) as pipe:
            if mapping:
                pipe.hset(key, mapping=cast(Any, mapping))
            if clear:
                pipe.hdel(key, *clear)
            await pipe.execute()

    async def set_floor(self, pool: str, workers: int, duration_s: float) -> float:
        until = self.clock() + duration_s
        await self.redis.hset(self._key(pool), mapping={"floor": workers, "floor_until": until})
        return until

    async def add_spend(self, pool: str, usd: float) -> None:
        if usd <= 0:
            return
        day_key = self.keys.spend(self._day())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrbyfloat(self._key(pool), "spend_usd", usd)
            pipe.hincrbyfloat(day_key, pool, usd)
            pipe.expire(day_key, 3 * 86400)  # a day's counter is only read while that day lasts
            usage = usage_key(self.prefix, self.periods.of(self.clock())[0])
            pipe.hincrbyfloat(usage, f"pool|{pool}|spend_usd", usd)
            pipe.expire(usage, self.usage_ttl_s)
            await pipe.execute()

    async def count_succeeded(self, pool: str) -> None:
        await self.redis.hincrby(self._key(pool), "succeeded", 1)

    async def back_off(
        self, pool: str, reason: str, *, base_s: float = 30.0, cap_s: float = 900.0
    ) -> float:
        """Push the pool's backoff out exponentially (base · 2^failures, capped)."""
        failures = int(await self.redis.hincrby(self._key(pool), "failures", 1))
        delay = min(cap_s, base_s * 2.0 ** (failures - 1))
        until = self.clock() + delay
        await self.redis.hset(
            self._key(pool), mapping={"backoff_until": until, "backoff_reason": reason}
        )
        return until

    async def clear_backoff(self, pool: str) -> None:
        await self.redis.hdel(self._key(pool), "backoff_until", "backoff_reason", "failures")
