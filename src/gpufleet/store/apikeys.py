"""API keys: only an HMAC-SHA256 of each key is stored, plus per-key limits.

A key is shown once, when it is created or rotated. Redis holds, per key id, a
hash with the name, e-mail, role, limits and the key's HMAC (hex), and one index
``digest -> id`` so a presented key is found with one HMAC and two lookups; the
stored digest is then compared in constant time.

Limits are exact across replicas because they live in Redis and every check is
one Lua script; every counter a script writes carries a TTL, so a replica that
dies mid-request leaves nothing behind for longer than that TTL.

``verify`` keeps each live key it found for ``cache_ttl_s`` (default 5 s) in this
process, so a request with a known key costs no Redis round trip for the lookup
(the rate-limit and concurrency scripts still run per request). The price: a key
revoked or rotated through *another* replica (or the CLI) keeps working here for
at most ``cache_ttl_s``; through this replica's API it stops at once. Unknown and
revoked keys are not cached, so a new key works everywhere at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import redis.asyncio as aioredis

from gpufleet.store import scripts
from gpufleet.store.keys import Keys
from gpufleet.store.teams import Team

logger = logging.getLogger(__name__)

Role = Literal["admin", "team_admin", "user"]
ROLES: tuple[Role, ...] = ("admin", "team_admin", "user")
KEY_PREFIX = "gpf_"
# Entries in the per-process cache of verified keys before it is emptied and refilled.
_CACHE_MAX = 10_000


Refusal = Literal["key_rate", "team_rate", "budget_day", "budget_month"]
_REFUSALS: dict[int, Refusal] = {
    1: "key_rate",
    2: "team_rate",
    3: "budget_day",
    4: "budget_month",
}


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    email: str
    role: Role
    created_at: float
    revoked: bool = False
    rate_limit_per_min: int | None = None
    max_concurrent: int | None = None
    max_queued: int | None = None
    max_priority: int | None = None
    team: str | None = None  # the team that owns this key's work (None: the key itself)

    def __repr__(self) -> str:
        return f"<ApiKey {self.id} {self.name!r} {self.role}{' revoked' if self.revoked else ''}>"

    def public(self) -> dict[str, Any]:
        return asdict(self)


def _from_hash(data: dict[str, str]) -> ApiKey:
    def opt(name: str) -> int | None:
        raw = data.get(name, "")
        return int(raw) if raw else None

    role = data.get("role", "user")
    return ApiKey(
        id=data["id"],
        name=data.get("name", ""),
        email=data.get("email", ""),
        role=role if role in ROLES else "user",
        created_at=float(data.get("created_at", "0")),
        revoked=data.get("revoked") == "1",
        rate_limit_per_min=opt("rate_limit_per_min"),
        max_concurrent=opt("max_concurrent"),
        max_queued=opt("max_queued"),
        max_priority=opt("max_priority"),
        team=data.get("team") or None,
    )


_LIMIT_FIELDS = ("rate_limit_per_min", "max_concurrent", "max_queued", "max_priority")


class ApiKeyStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        secret: bytes,
        *,
        prefix: str = "gpufleet",
        clock: Callable[[], float] = time.time,
        cache_ttl_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self._secret = secret
        self.prefix = prefix
        self.clock = clock
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, ApiKey]] = {}  # digest -> (expires, key)
        # plaintext -> digest of keys that verified (an HMAC is ~8 us a request); bounded
        # as the cache; a revoked key is still refused (its record is read as before).
        self._digests: dict[str, str] = {}
        self.keys = Keys(prefix)
        self._rate = scripts.register(redis, "key_rate")
        self._concurrent = scripts.register(redis, "key_place")
        self._admit = scripts.register(redis, "team_admit")
        self._concurrent2 = scripts.register(redis, "team_place")

    def __repr__(self) -> str:
        return f"<ApiKeyStore prefix={self.prefix}>"

    @classmethod
    async def open(
        cls,
        redis: aioredis.Redis,
        configured: str | None,
        *,
        prefix: str = "gpufleet",
        cache_ttl_s: float = 5.0,
    ) -> ApiKeyStore:
        """Use the configured server secret, else the one kept in Redis (made once)."""
        if configured:
            return cls(redis, configured.encode(), prefix=prefix, cache_ttl_s=cache_ttl_s)
        key = Keys(prefix).auth_secret()
        await redis.set(key, secrets.token_hex(32), nx=True)
        stored = cast(str, await redis.get(key))
        return cls(redis, stored.encode(), prefix=prefix, cache_ttl_s=cache_ttl_s)

    # -- keys ----------------------------------------------------------------------------

    def derive_key(self, purpose: str) -> bytes:
        """A key for another use (e.g. page cursors), derived from the server secret: the same
        on every replica, and telling nothing about the secret itself."""
        return hmac.new(self._secret, f"gpufleet:{purpose}".encode(), hashlib.sha256).digest()

    def _digest(self, plaintext: str) -> str:
        return hmac.digest(self._secret, plaintext.encode(), "sha256").hex()  # one-shot C

    def _key(self, key_id: str) -> str:
        return self.keys.apikey(key_id)

    @property
    def _index(self) -> str:
        return self.keys.apikeys()

    @property
    def _by_digest(self) -> str:
        return self.keys.apikeys_by_digest()

    async def create(
        self,
        name: str,
        *,
        email: str = "",
        role: Role = "user",
        plaintext: str | None = None,
        rate_limit_per_min: int | None = None,
        max_concurrent: int | None = None,
        max_queued: int | None = None,
        max_priority: int | None = None,
        team: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Store a new key; return it with its plaintext (the only time it is known)."""
        key_id = uuid.uuid4().hex[:12]
        plaintext = plaintext or KEY_PREFIX + secrets.token_urlsafe(32)
        digest = self._digest(plaintext)
        record = {
            "id": key_id,
            "name": name,
            "email": email,
            "role": role,
            "created_at": self.clock(),
            "revoked": "0",
            "digest": digest,
            "rate_limit_per_min": rate_limit_per_min or "",
            "max_concurrent": max_concurrent or "",
            "max_queued": max_queued or "",
            "max_priority": "" if max_priority is None else max_priority,
            "team": team or "",
        }
        if not await self.redis.hsetnx(self._by_digest, digest, key_id):
            raise ValueError("this key already exists")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(key_id), mapping=cast(Any, record))
            pipe.sadd(self._index, key_id)
            await pipe.execute()
        logger.info("api key %s created for %r (%s)", key_id, name, role)
        return _from_hash({k: str(v) for k, v in record.items()}), plaintext

    async def verify(self, plaintext: str) -> ApiKey | None:
        """The live key matching ``plaintext``, or None (unknown or revoked)."""
        if not plaintext or len(plaintext) > 512:
            return None
        digest = self._digests.get(plaintext) or self._digest(plaintext)
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        key_id = await self.redis.hget(self._by_digest, digest)
        if not key_id:
            return None
        data = cast(dict[str, str], await self.redis.hgetall(self._key(str(key_id))))
        if not data or not hmac.compare_digest(data.get("digest", ""), digest):
            return None
        key = _from_hash(data)
        if key.revoked:
            return None
        if self.cache_ttl_s > 0:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
                self._digests.clear()
            self._cache[digest] = (now + self.cache_ttl_s, key)
            self._digests[plaintext] = digest
        return key

    def _forget(self, key_id: str) -> None:
        """Drop a key from this process's cache (it was revoked or rotated here)."""
        for digest in [d for d, (_, k) in self._cache.items() if k.id == key_id]:
            del self._cache[digest]
            for plaintext in [p for p, d in self._digests.items() if d == digest]:
                del self._digests[plaintext]

    async def get(self, key_id: str) -> ApiKey | None:
        data = cast(dict[str, str], await self.redis.hgetall(self._key(key_id)))
        return _from_hash(data) if data else None

    async def list_keys(self) -> list[ApiKey]:
        ids = sorted(cast(set[str], await self.redis.smembers(self._index)))
        keys = [await self.get(key_id) for key_id in ids]
        return sorted((k for k in keys if k), key=lambda k: k.created_at)

    async def revoke(self, key_id: str) -> bool:
        data = cast(dict[str, str], await self.redis.hgetall(self._key(key_id)))
        if not data:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(key_id), "revoked", "1")
            pipe.hdel(self._by_digest, data.get("digest", ""))
            await pipe.execute()
        self._forget(key_id)
        logger.info("api key %s revoked", key_id)
        return True

    async def rotate(self, key_id: str) -> tuple[ApiKey, str] | None:
        """Give a key a new secret; the old one stops working at once."""
        data = cast(dict[str, str], await self.redis.hgetall(self._key(key_id)))
        if not data or data.get("revoked") == "1":
            return None
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = self._digest(plaintext)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._by_digest, data.get("digest", ""))
            pipe.hset(self._by_digest, digest, key_id)
            pipe.hset(self._key(key_id), "digest", digest)
            await pipe.execute()
        self._forget(key_id)
        logger.info("api key %s rotated", key_id)
        return _from_hash({**data, "digest": digest}), plaintext

    async def update(self, key_id: str, **fields: Any) -> ApiKey | None:
        """Change a key's name, e-mail, role, team or limits (None clears a limit or the
        team); the secret stays. None if there is no such key."""
        allowed = {"name", "email", "role", "team", *_LIMIT_FIELDS}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown key field(s): {', '.join(sorted(unknown))}")
        data = cast(dict[str, str], await self.redis.hgetall(self._key(key_id)))
        if not data:
            return None
        mapping = {name: "" if value is None else str(value) for name, value in fields.items()}
        if mapping:
            await self.redis.hset(self._key(key_id), mapping=cast(Any, mapping))
        self._forget(key_id)
        logger.info("api key %s updated (%s)", key_id, ", ".join(sorted(mapping)))
        return _from_hash({**data, **mapping})

    async def import_json(self, raw: Any) -> list[ApiKey]:
        """Import the parsed SURF controller ``api_keys.json`` (entries with name, email, key).

        Accepts a list of entries or ``{"keys": [...]}``. Keys already imported are skipped,
        so a second import changes nothing.
        """
        entries: list[dict[str, Any]] = (
            raw.get("keys", raw.get("api_keys")) or [] if isinstance(raw, dict) else raw
        )
        imported = []
        for entry in entries:
            plaintext = str(entry.get("key") or entry.get("api_key") or "")
            if not plaintext or await self.verify(plaintext):
                continue
            role: Role = "admin" if entry.get("role") == "admin" else "user"
            key, _ = await self.create(
                str(entry.get("name", "")),
                email=str(entry.get("email", "")),
                role=role,
                plaintext=plaintext,
            )
            imported.append(key)
        return imported

    # -- limits --------------------------------------------------------------------------

    async def hit_rate_limit(self, key: ApiKey) -> float:
        """Count one request; 0 if allowed, else seconds until the next is allowed."""
        if not key.rate_limit_per_min:
            return 0.0
        window = int(self.clock() // 60)
        wait = await self._rate(
            keys=[self.keys.ratelimit(key.id, window)],
            args=[key.rate_limit_per_min, 60],
        )
        return float(cast(int, wait))

    async def enter(self, key: ApiKey, token: str, *, ttl_s: float = 600.0) -> bool:
        """Take one of the key's concurrent-request places (held up to ``ttl_s``)."""
        if not key.max_concurrent:
            return True
        now = self.clock()
        ok = await self._concurrent(
            keys=[self.keys.concurrent(key.id)],
            args=[now, now + ttl_s, token, key.max_concurrent, int(ttl_s * 1000)],
        )
        return bool(ok)

    async def leave(self, key: ApiKey, token: str) -> None:
        if key.max_concurrent:
            await self.redis.zrem(self.keys.concurrent(key.id), token)

    # -- a team key's limits ------------------------------------------------------------------

    async def admit(
        self,
        key: ApiKey,
        team: Team,
        spend_keys: tuple[str, str],
        *,
        check_budget: bool,
    ) -> tuple[Refusal | None, float]:
        """One round trip for a team key's request: the team's budgets (new work only), then
        the key's and the team's rate. (None, 0) allows it; else why not and the seconds to
        wait (rates) or the dollars spent (budgets)."""
        day = month = ""
        if check_budget:
            day = "" if team.budget_day_usd is None else repr(team.budget_day_usd)
            month = "" if team.budget_month_usd is None else repr(team.budget_month_usd)
        if not (key.rate_limit_per_min or team.rate_limit_per_min or day or month):
            return None, 0.0
        window = int(self.clock() // 60)
        code, value = await self._admit(
            keys=[
                self.keys.ratelimit(key.id, window),
                self.keys.team_ratelimit(team.name, window),
                *spend_keys,
            ],
            args=[key.rate_limit_per_min or 0, team.rate_limit_per_min or 0, 60, day, month],
        )
        return _REFUSALS.get(int(code)), float(value)

    async def take_place(
        self, key: ApiKey, team: Team | None, token: str, *, ttl_s: float = 600.0
    ) -> str:
        """Take a place among the key's and its team's requests in flight (held up to
        ``ttl_s``): "" when taken, else "key" or "team" (which one is full)."""
        team_max = team.max_concurrent if team is not None else None
        if not team_max:
            return "" if await self.enter(key, token, ttl_s=ttl_s) else "key"
        now = self.clock()
        full = await self._concurrent2(
            keys=[self.keys.concurrent(key.id), self._team_places(team)],
            args=[now, now + ttl_s, token, key.max_concurrent or 0, team_max, int(ttl_s * 1000)],
        )
        return {0: "", 1: "key"}.get(int(full), "team")

    async def give_place(self, key: ApiKey, team: Team | None, token: str) -> None:
        if team is None or not team.max_concurrent:
            await self.leave(key, token)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.keys.concurrent(key.id), token)
            pipe.zrem(self._team_places(team), token)
            await pipe.execute()

    def _team_places(self, team: Team | None) -> str:
        return self.keys.team_concurrent(team.name if team else "")
