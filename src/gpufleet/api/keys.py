"""``/api/v1/keys``: API keys, for admins. A key's secret is shown once, in the create answer."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field

from gpufleet.api.auth import get_key_store, require_admin
from gpufleet.errors import NotFound
from gpufleet.store.apikeys import ApiKey, ApiKeyStore

router = APIRouter(prefix="/api/v1/keys", tags=["keys"], dependencies=[Depends(require_admin)])


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    email: str = Field("", max_length=320)
    role: Literal["admin", "user"] = "user"
    rate_limit_per_min: int | None = Field(None, ge=1, le=1_000_000)
    max_concurrent: int | None = Field(None, ge=1, le=100_000)
    max_queued: int | None = Field(None, ge=1, le=10_000_000)
    max_priority: int | None = Field(None, ge=0, le=9)


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

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(**key.public())


class KeyCreated(KeyOut):
    key: str = Field(description="The API key. Shown only now: store it.")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
async def create_key(body: KeyCreate, store: ApiKeyStore = Depends(get_key_store)) -> KeyCreated:
    key, plaintext = await store.create(**body.model_dump())
    return KeyCreated(**key.public(), key=plaintext)


@router.get("", response_model=list[KeyOut])
async def list_keys(store: ApiKeyStore = Depends(get_key_store)) -> list[KeyOut]:
    return [KeyOut.of(k) for k in await store.list_keys()]


@router.delete("/{key_id}", response_model=KeyOut)
async def revoke_key(key_id: str, store: ApiKeyStore = Depends(get_key_store)) -> KeyOut:
    if not await store.revoke(key_id):
        raise NotFound(f"key {key_id!r} not found")
    key = await store.get(key_id)
    assert key is not None
    return KeyOut.of(key)


@router.post("/{key_id}/rotate", response_model=KeyCreated)
async def rotate_key(key_id: str, store: ApiKeyStore = Depends(get_key_store)) -> KeyCreated:
    rotated = await store.rotate(key_id)
    if rotated is None:
        raise NotFound(f"key {key_id!r} not found or revoked")
    key, plaintext = rotated
    return KeyCreated(**key.public(), key=plaintext)
