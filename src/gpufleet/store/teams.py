"""Teams (tenants): a bounded, configured set of named groups of API keys, kept in Redis.

A key belongs to at most one team (``ApiKey.team``). Work from a team's keys is owned by
the team (tasks carry ``owner = "team:<name>"``), so its members see the team's tasks and
nobody else does. A team has limits of its own, checked next to the key's (both must
allow): requests per minute, proxied requests in flight, waiting tasks, the highest
priority, and a spend budget per calendar day and month (USD) in ``[usage] timezone``.

Redis layout (``P`` is the prefix):

- ``P:team:{name}`` HASH, the team's record; ``P:teams`` SET of names (at most
  ``max_teams``: names go into metric labels, so the set must stay small);
- ``P:teamspend:{name}:d:{YYYY-MM-DD}`` / ``:m:{YYYY-MM}`` STRING float, dollars
  attributed to the team in that calendar day / month (written by ``store.usage``),
  with a TTL a little past the period's end.

Limits and budgets are checked by one Lua script per request (``admit``), so they are
exact across replicas. ``cached`` keeps the whole (small) set in this process for
``cache_ttl_s``, as ``ApiKeyStore.verify`` does for keys: a change made through another
replica applies here within that time.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis

from gpufleet.store.keys import Keys

logger = logging.getLogger(__name__)

TEAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
OWNER_PREFIX = "team:"
INT_LIMITS = ("max_concurrent", "max_queued", "max_priority", "rate_limit_per_min")
USD_LIMITS = ("budget_day_usd", "budget_month_usd")
# A day counter outlives its day by this much (read only while the day lasts, kept a little
# longer for late writes and for `usage` to show "today" across a time-zone edge).
DAY_TTL_S = 3 * 86400
MONTH_TTL_S = 40 * 86400


class TeamError(ValueError):
    """A team cannot be created/changed as asked (exists, unknown, too many)."""


@dataclass(frozen=True)
class Team:
    name: str
    description: str = ""
    created_at: float = 0.0
    max_concurrent: int | None = None
    max_queued: int | None = None
    max_priority: int | None = None
    rate_limit_per_min: int | None = None
    budget_day_usd: float | None = None
    budget_month_usd: float | None = None

    def __repr__(self) -> str:
        return f"<Team {self.name}>"

    @property
    def owner(self) -> str:
        """The owner id stamped on the team's tasks and proxied requests."""
        return OWNER_PREFIX + self.name

    @property
    def has_budget(self) -> bool:
        return self.budget_day_usd is not None or self.budget_month_usd is not None

    def public(self) -> dict[str, Any]:
        return asdict(self)


def team_of_owner(owner: str | None) -> str:
    """The team name in an owner id ("team:ml" -> "ml"), or "" for a key-owned one."""
    if owner and owner.startswith(OWNER_PREFIX):
        return owner[len(OWNER_PREFIX) :]
    return ""


def _from_hash(data: dict[str, str]) -> Team:
    def opt_int(name: str) -> int | None:
        raw = data.get(name, "")
        return int(raw) if raw else None

    def opt_usd(name: str) -> float | None:
        raw = data.get(name, "")
        return float(raw) if raw else None

    return Team(
        name=data["name"],
        description=data.get("description", ""),
        created_at=float(data.get("created_at", "0")),
        max_concurrent=opt_int("max_concurrent"),
        max_queued=opt_int("max_queued"),
        max_priority=opt_int("max_priority"),
        rate_limit_per_min=opt_int("rate_limit_per_min"),
        budget_day_usd=opt_usd("budget_day_usd"),
        budget_month_usd=opt_usd("budget_month_usd"),
    )


def _to_hash(team: Team) -> dict[str, str]:
    out = {"name": team.name, "description": team.description, "created_at": repr(team.created_at)}
    for name in (*INT_LIMITS, *USD_LIMITS):
        value = getattr(team, name)
        out[name] = "" if value is None else repr(value)
    return out


class Periods:
    """Calendar day and month of an instant in one time zone (budgets reset on their edge)."""

    def __init__(self, timezone: str = "UTC") -> None:
        self.tz = ZoneInfo(timezone)
        self._memo: tuple[int, str, str] = (-1, "", "")

    def __repr__(self) -> str:
        return f"<Periods {self.tz.key}>"

    def of(self, now: float) -> tuple[str, str]:
        """("YYYY-MM-DD", "YYYY-MM") of ``now`` (epoch seconds), memoised per second."""
        second = int(now)
        if self._memo[0] != second:
            local = datetime.fromtimestamp(second, self.tz)
            self._memo = (second, local.strftime("%Y-%m-%d"), local.strftime("%Y-%m"))
        return self._memo[1], self._memo[2]

    def resets_at(self, now: float, period: str) -> float:
        """When the current ``period`` ("day" or "month") ends (epoch seconds)."""
        local = datetime.fromtimestamp(now, self.tz)
        if period == "day":
            edge = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        else:
            first = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            edge = (first + timedelta(days=32)).replace(day=1)
        return edge.timestamp()


class TeamStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "gpufleet",
        clock: Callable[[], float] = time.time,
        cache_ttl_s: float = 5.0,
        max_teams: int = 200,
        periods: Periods | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.clock = clock
        self.cache_ttl_s = cache_ttl_s
        self.max_teams = max_teams
        self.periods = periods or Periods()
        self._cache: dict[str, Team] = {}
        self._cache_until = 0.0

    def __repr__(self) -> str:
        return f"<TeamStore prefix={self.prefix}>"

    def _key(self, name: str) -> str:
        return Keys(self.prefix).team(name)

    @property
    def _index(self) -> str:
        return Keys(self.prefix).teams()

    def spend_keys(self, name: str, now: float | None = None) -> tuple[str, str]:
        """The day and month spend counters of team ``name`` at ``now``."""
        day, month = self.periods.of(self.clock() if now is None else now)
        keys = Keys(self.prefix)
        return keys.team_spend(name, f"d:{day}"), keys.team_spend(name, f"m:{month}")

    # -- records ---------------------------------------------------------------------------

    async def create(self, name: str, *, description: str = "", **limits: Any) -> Team:
        if not TEAM_NAME.fullmatch(name):
            raise TeamError(f"team name {name!r}: lowercase letters, digits, '-', '_' (≤ 63)")
        unknown = set(limits) - {*INT_LIMITS, *USD_LIMITS}
        if unknown:
            raise TeamError(f"unknown team field(s): {', '.join(sorted(unknown))}")
        if await self.redis.scard(self._index) >= self.max_teams:
            raise TeamError(f"there are already {self.max_teams} teams ([usage] max_teams)")
        team = Team(name=name, description=description, created_at=self.clock(), **limits)
        if not await self.redis.sadd(self._index, name):
            raise TeamError(f"team {name!r} already exists")
        await self.redis.hset(self._key(name), mapping=cast(Any, _to_hash(team)))
        self._forget()
        logger.info("team %s created", name)
        return team

    async def get(self, name: str) -> Team | None:
        data = cast(dict[str, str], await self.redis.hgetall(self._key(name)))
        return _from_hash(data) if data.get("name") else None

    async def list_teams(self) -> list[Team]:
        names = sorted(cast(set[str], await self.redis.smembers(self._index)))
        if not names:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._key(name))
            rows = await pipe.execute()
        return [_from_hash(row) for row in rows if row.get("name")]

    async def update(self, name: str, **fields: Any) -> Team:
        """Set the given fields (a limit of None clears it); unknown team -> ``TeamError``."""
        team = await self.get(name)
        if team is None:
            raise TeamError(f"no team {name!r}")
        allowed = {"description", *INT_LIMITS, *USD_LIMITS}
        unknown = set(fields) - allowed
        if unknown:
            raise TeamError(f"unknown team field(s): {', '.join(sorted(unknown))}")
        updated = replace(team, **fields)
        await self.redis.hset(self._key(name), mapping=cast(Any, _to_hash(updated)))
        self._forget()
        logger.info("team %s updated (%s)", name, ", ".join(sorted(fields)))
        return updated

    async def delete(self, name: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(self._index, name)
            pipe.delete(self._key(name))
            removed, _ = await pipe.execute()
        self._forget()
        if removed:
            logger.info("team %s deleted", name)
        return bool(removed)

    # -- the per-process cache ---------------------------------------------------------------

    def _forget(self) -> None:
        self._cache_until = 0.0

    async def cached(self, name: str) -> Team | None:
        """Team ``name`` from this process's copy of the set (refreshed every cache_ttl_s)."""
        now = self.clock()
        if now >= self._cache_until:
            self._cache = {t.name: t for t in await self.list_teams()}
            self._cache_until = now + self.cache_ttl_s
        return self._cache.get(name)

    # -- spend ---------------------------------------------------------------------------------

    async def spent(self, name: str, now: float | None = None) -> tuple[float, float]:
        """Dollars attributed to the team in the current day and month."""
        day, month = await self.redis.mget(self.spend_keys(name, now))
        return float(day or 0), float(month or 0)
