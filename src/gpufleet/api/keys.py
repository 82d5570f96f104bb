"""``/api/v1/keys``: API keys, for admins. A key's secret is shown once, in the create answer.

A ``team_admin`` key manages its own team's keys and nothing else: it lists, creates,
changes, rotates and revokes keys of its team only (other keys are 404 to it), and may not
make admins or move a key to another team. Nor may it give any key (its own included) a
limit looser than its own key's: a limit an admin set on the team admin's key is a ceiling
for every key it makes or changes (a new key inherits it when the field is left out).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field

from gpufleet.api.auth import Principal, get_key_store, get_team_store, require_key_manager
from gpufleet.errors import Forbidden, NotFound
from gpufleet.store.apikeys import ApiKey, ApiKeyStore
from gpufleet.store.teams import TeamStore

router = APIRouter(
    prefix="/api/v1/keys", tags=["keys"], dependencies=[Depends(require_key_manager)]
)
TEAM_FIELD = Field(
    None,
    pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
    description="The team that owns this key's work (a configured team).",
)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    email: str = Field("", max_length=320)
    role: Literal["admin", "team_admin", "user"] = "user"
    rate_limit_per_min: int | None = Field(None, ge=1, le=1_000_000)
    max_concurrent: int | None = Field(None, ge=1, le=100_000)
    max_queued: int | None = Field(None, ge=1, le=10_000_000)
    max_priority: int | None = Field(None, ge=0, le=9)
    team: str | None = TEAM_FIELD


class KeyUpdate(BaseModel):
    """Only the fields sent change; a limit or team sent as null is cleared."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    email: str | None = Field(None, max_length=320)
    role: Literal["admin", "team_admin", "user"] | None = None
    rate_limit_per_min: int | None = Field(None, ge=1, le=1_000_000)
    max_concurrent: int | None = Field(None, ge=1, le=100_000)
    max_queued: int | None = Field(None, ge=1, le=10_000_000)
    max_priority: int | None = Field(None, ge=0, le=9)
    team: str | None = TEAM_FIELD


class KeyOut(BaseModel):
    id: str
    name: str
    email: str
    role: str
    created_at: float
    revoked: bool
    rate_limit_per_min: int | None
    max_concurrent: int | None
    max_queued: int | None
    max_priority: int | None
    team: str | None = None

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(**key.public())


class KeyCreated(KeyOut):
    key: str = Field(description="The API key. Shown only now: store it.")


async def _check_team(
    principal: Principal, teams: TeamStore, team: str | None, role: str | None
) -> None:
    """What a key manager may set: admins any configured team and role; a team admin only
    its own team, and no admin role."""
    if team is not None and await teams.get(team) is None:
        raise NotFound(f"no team {team!r}: create it first (gpufleet teams create)")
    if principal.is_admin:
        return
    if team != principal.team_name:
        raise Forbidden("a team_admin key manages keys of its own team only")
    if role == "admin":
        raise Forbidden("a team_admin key cannot create or make admin keys")


LIMITS = ("rate_limit_per_min", "max_concurrent", "max_queued", "max_priority")


def _check_limits(principal: Principal, fields: dict[str, Any], *, creating: bool) -> None:
    """A team admin's own key's limits are a ceiling for the keys it manages: no limit
    above it, none cleared (null: no limit) while it has one. On create, a limit left out
    is the team admin's own."""
    own = principal.key
    if principal.is_admin or own is None:
        return
    for name in LIMITS:
        ceiling = getattr(own, name)
        if ceiling is None:
            continue
        if creating and fields.get(name) is None:
            fields[name] = ceiling
        elif name in fields and (fields[name] is None or fields[name] > ceiling):
            raise Forbidden(
                f"{name}: a team_admin key cannot set a limit above its own ({ceiling})"
            )


async def _managed(key_id: str, principal: Principal, store: ApiKeyStore) -> ApiKey:
    """The key, if ``principal`` may manage it (a team admin: its team's keys only)."""
    key = await store.get(key_id)
    if key is None or not (principal.is_admin or key.team == principal.team_name):
        raise NotFound(f"key {key_id!r} not found")
    if not principal.is_admin and key.role == "admin":
        raise NotFound(f"key {key_id!r} not found")
    return key


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
    responses={404: {"description": "The team named does not exist."}},
)
async def create_key(
    body: KeyCreate,
    principal: Principal = Depends(require_key_manager),
    store: ApiKeyStore = Depends(get_key_store),
    teams: TeamStore = Depends(get_team_store),
) -> KeyCreated:
    fields = body.model_dump()
    if not principal.is_admin and fields["team"] is None:
        fields["team"] = principal.team_name  # a team admin's keys join its team
    await _check_team(principal, teams, fields["team"], fields["role"])
    _check_limits(principal, fields, creating=True)
    key, plaintext = await store.create(**fields)
    return KeyCreated(**key.public(), key=plaintext)


@router.get("", response_model=list[KeyOut])
async def list_keys(
    principal: Principal = Depends(require_key_manager),
    store: ApiKeyStore = Depends(get_key_store),
) -> list[KeyOut]:
    keys = await store.list_keys()
    if not principal.is_admin:
        keys = [k for k in keys if k.team == principal.team_name and k.role != "admin"]
    return [KeyOut.of(k) for k in keys]


@router.patch("/{key_id}", response_model=KeyOut)
async def update_key(
    body: KeyUpdate,
    key_id: str,
    principal: Principal = Depends(require_key_manager),
    store: ApiKeyStore = Depends(get_key_store),
    teams: TeamStore = Depends(get_team_store),
) -> KeyOut:
    key = await _managed(key_id, principal, store)
    fields = body.model_dump(exclude_unset=True)
    for name in ("name", "email", "role"):
        if name in fields and fields[name] is None:
            del fields[name]
    await _check_team(
        principal, teams, fields.get("team", key.team), fields.get("role", key.role)
    )
    _check_limits(principal, fields, creating=False)
    updated = await store.update(key.id, **fields)
    if updated is None:
        raise NotFound(f"key {key_id!r} not found")
    return KeyOut.of(updated)


@router.delete("/{key_id}", response_model=KeyOut)
async def revoke_key(
    key_id: str,
    principal: Principal = Depends(require_key_manager),
    store: ApiKeyStore = Depends(get_key_store),
) -> KeyOut:
    await _managed(key_id, principal, store)
    if not await store.revoke(key_id):
        raise NotFound(f"key {key_id!r} not found")
    key = await store.get(key_id)
    assert key is not None
    return KeyOut.of(key)


@router.post("/{key_id}/rotate", response_model=KeyCreated)
async def rotate_key(
    key_id: str,
    principal: Principal = Depends(require_key_manager),
    store: ApiKeyStore = Depends(get_key_store),
) -> KeyCreated:
    await _managed(key_id, principal, store)
    rotated = await store.rotate(key_id)
    if rotated is None:
        raise NotFound(f"key {key_id!r} not found or revoked")
    key, plaintext = rotated
    return KeyCreated(**key.public(), key=plaintext)
