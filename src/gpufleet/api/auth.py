"""Who is calling: API-key authentication, roles, and the per-key request rate.

Every router but the public operations endpoints depends on ``authenticate``;
admin-only routes depend on ``require_admin``; routes that start new work (task submit,
the proxy's inference POSTs) on ``authenticate_work``, which also refuses a team whose
spend budget is spent (402). A key in a team acts for the team: its work is owned by
``team:<name>``, and the team's limits apply next to the key's. Keys arrive as
``Authorization: Bearer <key>`` (what the ``ollama`` and ``openai`` SDKs send) or
``X-API-Key: <key>``. When Redis cannot be asked, the request is refused with
503 unless ``[auth] fail_open = true``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError

from gpufleet.api.deps import get_apikeys, get_services, get_settings, get_teams
from gpufleet.errors import (
    BudgetExhausted,
    Forbidden,
    LimitExceeded,
    StoreError,
    Unauthenticated,
)
from gpufleet.store.apikeys import ApiKey, ApiKeyStore, Refusal
from gpufleet.store.teams import Team, TeamStore

logger = logging.getLogger(__name__)


# Who a caller is while ``[auth] fail_open`` lets it through unchecked: any string passes
# as a key then, so it is a plain user (no fleet internals, no keys, no clouds), never an
# admin, with no limits (they cannot be counted without Redis).
FAIL_OPEN_KEY = ApiKey(id="fail-open", name="unchecked (Redis unavailable)", email="",
                       role="user", created_at=0.0)


@dataclass(frozen=True)
class Principal:
    """The caller. ``key`` is None when auth is disabled (local demo: everyone is admin);
    ``team`` is the key's team (None: no team, or one deleted since)."""

    key: ApiKey | None
    team: Team | None = None

    @property
    def is_admin(self) -> bool:
        return self.key is None or self.key.role == "admin"

    @property
    def is_team_admin(self) -> bool:
        return self.key is not None and self.key.role == "team_admin" and bool(self.key.team)

    @property
    def team_name(self) -> str | None:
        return self.key.team if self.key is not None and self.key.team else None

    @property
    def owner(self) -> str | None:
        """The owner id stamped on tasks: ``team:<name>`` for a team's key, else the key's
        id; None when auth is off."""
        if self.key is None:
            return None
        return f"team:{self.key.team}" if self.key.team else self.key.id

    def can_see(self, owner: str | None) -> bool:
        if self.is_admin:
            return True
        return owner is not None and owner == self.owner

    @property
    def max_priority(self) -> int | None:
        """The highest priority this caller may ask for: the key's and the team's cap."""
        caps = [
            c
            for c in (
                self.key.max_priority if self.key else None,
                self.team.max_priority if self.team else None,
            )
            if c is not None
        ]
        return min(caps) if caps else None


def presented_key(request: Request) -> str | None:
    """The key in ``Authorization: Bearer <key>``, else in ``X-API-Key`` (the first of each
    header counts). Read from the ASGI scope: no Headers object on every proxied request."""
    authorization = api_key = None
    for name, value in request.scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return api_key or None


def get_key_store(request: Request) -> ApiKeyStore:
    return get_apikeys(request)


def get_team_store(request: Request) -> TeamStore:
    return get_teams(request)


# Declared so /docs and the OpenAPI document show how to authenticate (and an
# "Authorize" button); ``authenticate`` reads the headers itself, so it also works when
# the proxy calls it with just the request.
BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The API key, as an alternative header."
)


def _noted(request: Request, name: str) -> Any:
    """What this request's ``request.state`` holds under ``name``, else None. Not
    ``getattr(request.state, name, None)``: Starlette's State raises (and formats) an
    AttributeError for a missing name, a measurable cost on every proxied request."""
    state = request.scope.get("state")
    return state.get(name) if isinstance(state, dict) else None


def _note(request: Request, name: str, value: Any) -> None:
    """``request.state.<name> = value``, without building Starlette's State object (the
    same dict: ``request.state`` reads it back)."""
    request.scope.setdefault("state", {})[name] = value


async def authenticate(
    request: Request,
    _bearer: HTTPAuthorizationCredentials | None = Security(BEARER),
    _header: str | None = Security(API_KEY_HEADER),
) -> Principal:
    cached = _noted(request, "principal")
    if isinstance(cached, Principal):
        return cached
    services = get_services(request)
    settings = services.settings.auth
    if not settings.enabled:
        principal = Principal(None)
        _note(request, "principal", principal)
        return principal
    plaintext = presented_key(request)
    if not plaintext:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    store = services.apikeys
    team: Team | None = None
    try:
        key = await store.verify(plaintext)
        if key is not None and key.team:
            team = await _team_checks(request, store, key)
        elif key is not None and key.rate_limit_per_min:
            wait = await store.hit_rate_limit(key)
            if wait:
                raise LimitExceeded(
                    f"rate limit of {key.rate_limit_per_min}/min reached", retry_after=wait
                )
    except RedisError as exc:
        if settings.fail_open:
            logger.warning("auth: Redis unavailable, failing open (%s)", type(exc).__name__)
            return Principal(FAIL_OPEN_KEY)
        raise StoreError("cannot check the API key: Redis unavailable") from exc
    if key is None:
        raise Unauthenticated("invalid or revoked API key")
    principal = Principal(key, team)
    _note(request, "principal", principal)
    return principal


async def _team_checks(request: Request, store: ApiKeyStore, key: ApiKey) -> Team | None:
    """A team key's rate limits (its own and the team's) and, for new work, the team's
    budgets: one Lua call. Returns the team (None if it was deleted)."""
    teams = get_team_store(request)
    team = await teams.cached(str(key.team))
    if team is None:
        wait = await store.hit_rate_limit(key)
        if wait:
            raise LimitExceeded(
                f"rate limit of {key.rate_limit_per_min}/min reached", retry_after=wait
            )
        return None
    work = bool(_noted(request, "new_work"))
    now = teams.clock()
    refusal, value = await store.admit(key, team, teams.spend_keys(team.name, now),
                                       check_budget=work)
    if work:
        request.state.budget_checked = True
    _raise_refusal(refusal, value, key, team, teams, now)
    return team


def _raise_refusal(
    refusal: Refusal | None, value: float, key: ApiKey, team: Team, teams: TeamStore, now: float
) -> None:
    if refusal is None:
        return
    if refusal == "key_rate":
        raise LimitExceeded(
            f"rate limit of {key.rate_limit_per_min}/min reached", retry_after=value
        )
    if refusal == "team_rate":
        raise LimitExceeded(
            f"team {team.name!r}: rate limit of {team.rate_limit_per_min}/min reached",
            retry_after=value,
        )
    period = "day" if refusal == "budget_day" else "month"
    budget = team.budget_day_usd if period == "day" else team.budget_month_usd
    resets_at = teams.periods.resets_at(now, period)
    raise BudgetExhausted(
        f"team {team.name!r} has spent its {period}'s budget "
        f"(${value:.2f} of ${budget or 0:.2f}); new work is refused until the {period} "
        f"ends in {teams.periods.tz.key}",
        team=team.name,
        period=period,
        resets_at=round(resets_at, 3),
    )


async def check_budget(request: Request, principal: Principal) -> None:
    """Refuse new work (402) when the caller's team has spent its day's or month's budget."""
    team = principal.team
    if team is None or principal.key is None or not team.has_budget:
        return
    teams = get_team_store(request)
    now = teams.clock()
    try:
        day, month = await teams.spent(team.name, now)
    except RedisError as exc:
        if get_settings(request).auth.fail_open:
            return
        raise StoreError("cannot check the team's budget: Redis unavailable") from exc
    if team.budget_day_usd is not None and day >= team.budget_day_usd:
        _raise_refusal("budget_day", day, principal.key, team, teams, now)
    if team.budget_month_usd is not None and month >= team.budget_month_usd:
        _raise_refusal("budget_month", month, principal.key, team, teams, now)


async def authenticate_work(request: Request) -> Principal:
    """``authenticate`` for a request that starts new work: a team over its budget gets 402.
    The check rides on the rate-limit script when the key is looked at now (one call)."""
    _note(request, "new_work", True)
    principal = await authenticate(request, None, None)
    if not _noted(request, "budget_checked"):
        _note(request, "budget_checked", True)
        if _has_budget(principal):
            await check_budget(request, principal)
    return principal


def _has_budget(principal: Principal) -> bool:
    """The caller's team has a budget to check (most callers' has none)."""
    return principal.key is not None and principal.team is not None and principal.team.has_budget


async def require_budget(
    request: Request, principal: Principal = Depends(authenticate)
) -> Principal:
    """The REST form of ``authenticate_work`` (task submit): the caller, after the budget
    check (a separate read; the proxy's hot path uses ``authenticate_work``)."""
    if not _noted(request, "budget_checked"):
        request.state.budget_checked = True
        await check_budget(request, principal)
    return principal


async def require_key_manager(principal: Principal = Depends(authenticate)) -> Principal:
    """Admins, and team admins (who manage their own team's keys only)."""
    if not (principal.is_admin or principal.is_team_admin):
        raise Forbidden("this needs an admin or team_admin key")
    return principal


async def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this needs an admin key")
    return principal
