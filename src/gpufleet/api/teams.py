"""``/api/v1/teams``: teams (tenants), for admins. A team owns its keys' work and has
limits and a spend budget of its own; see ``gpufleet.store.teams``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, status
from pydantic import BaseModel, ConfigDict, Field

from gpufleet.api.auth import get_key_store, get_team_store, require_admin
from gpufleet.errors import Conflict, NotFound
from gpufleet.store.apikeys import ApiKeyStore
from gpufleet.store.teams import Team, TeamError, TeamStore

router = APIRouter(prefix="/api/v1/teams", tags=["teams"], dependencies=[Depends(require_admin)])

TEAM_NAME = Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Team name.")


class TeamLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field("", max_length=500)
    max_concurrent: int | None = Field(
        None, ge=1, le=100_000, description="Proxied requests of the team's keys in flight."
    )
    max_queued: int | None = Field(
        None, ge=1, le=10_000_000, description="Waiting tasks of the team (all its keys)."
    )
    max_priority: int | None = Field(None, ge=0, le=9, description="Highest task priority.")
    rate_limit_per_min: int | None = Field(
        None, ge=1, le=1_000_000, description="Requests per minute, all the team's keys."
    )
    budget_day_usd: float | None = Field(
        None, ge=0, le=1e9, description="Spend per calendar day ([usage] timezone); then 402."
    )
    budget_month_usd: float | None = Field(
        None, ge=0, le=1e9, description="Spend per calendar month; then 402."
    )


class TeamCreate(TeamLimits):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")


class TeamOut(BaseModel):
    name: str
    description: str
    created_at: float
    max_concurrent: int | None
    max_queued: int | None
    max_priority: int | None
    rate_limit_per_min: int | None
    budget_day_usd: float | None
    budget_month_usd: float | None
    keys: int = Field(0, description="Live keys in the team.")
    spent_today_usd: float = 0.0
    spent_this_month_usd: float = 0.0

    @classmethod
    async def of(cls, team: Team, teams: TeamStore, keys: ApiKeyStore) -> TeamOut:
        members = [k for k in await keys.list_keys() if k.team == team.name and not k.revoked]
        day, month = await teams.spent(team.name)
        return cls(
            **team.public(),
            keys=len(members),
            spent_today_usd=round(day, 6),
            spent_this_month_usd=round(month, 6),
        )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TeamOut,
    responses={409: {"description": "The team exists, or there are [usage] max_teams."}},
)
async def create_team(
    body: TeamCreate,
    teams: TeamStore = Depends(get_team_store),
    keys: ApiKeyStore = Depends(get_key_store),
) -> TeamOut:
    fields = body.model_dump()
    try:
        team = await teams.create(fields.pop("name"), **fields)
    except TeamError as exc:
        raise Conflict(str(exc)) from None
    return await TeamOut.of(team, teams, keys)


@router.get("", response_model=list[TeamOut])
async def list_teams(
    teams: TeamStore = Depends(get_team_store), keys: ApiKeyStore = Depends(get_key_store)
) -> list[TeamOut]:
    return [await TeamOut.of(t, teams, keys) for t in await teams.list_teams()]


@router.get("/{name}", response_model=TeamOut)
async def get_team(
    name: str = TEAM_NAME,
    teams: TeamStore = Depends(get_team_store),
    keys: ApiKeyStore = Depends(get_key_store),
) -> TeamOut:
    team = await teams.get(name)
    if team is None:
        raise NotFound(f"no team {name!r}")
    return await TeamOut.of(team, teams, keys)


class TeamUpdate(TeamLimits):
    """Only the fields sent change; a limit sent as null is cleared."""

    description: str | None = Field(None, max_length=500)  # type: ignore[assignment]


@router.patch("/{name}", response_model=TeamOut)
async def update_team(
    body: TeamUpdate,
    name: str = TEAM_NAME,
    teams: TeamStore = Depends(get_team_store),
    keys: ApiKeyStore = Depends(get_key_store),
) -> TeamOut:
    fields: dict[str, Any] = body.model_dump(exclude_unset=True)
    if fields.get("description", "") is None:
        fields["description"] = ""
    try:
        team = await teams.update(name, **fields)
    except TeamError as exc:
        raise NotFound(str(exc)) from None
    return await TeamOut.of(team, teams, keys)


@router.delete(
    "/{name}",
    response_model=TeamOut,
    responses={409: {"description": "The team still has live keys."}},
)
async def delete_team(
    name: str = TEAM_NAME,
    teams: TeamStore = Depends(get_team_store),
    keys: ApiKeyStore = Depends(get_key_store),
) -> TeamOut:
    team = await teams.get(name)
    if team is None:
        raise NotFound(f"no team {name!r}")
    out = await TeamOut.of(team, teams, keys)
    if out.keys:
        raise Conflict(f"team {name!r} still has {out.keys} key(s): move or revoke them first")
    await teams.delete(name)
    return out
