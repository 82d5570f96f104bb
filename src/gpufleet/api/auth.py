"""Who is calling: API-key authentication, roles, and the per-key request rate.

Every router but the public operations endpoints depends on ``authenticate``;
admin-only routes depend on ``require_admin``. Keys arrive as
``Authorization: Bearer <key>`` (what the ``ollama`` and ``openai`` SDKs send) or
``X-API-Key: <key>``. When Redis cannot be asked, the request is refused with
503 unless ``[auth] fail_open = true``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError

from gpufleet.api.deps import get_components
from gpufleet.errors import Forbidden, LimitExceeded, StoreError, Unauthenticated
from gpufleet.store.apikeys import ApiKey, ApiKeyStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """The caller. ``key`` is None when auth is disabled (local demo: everyone is admin)."""

    key: ApiKey | None

    @property
    def is_admin(self) -> bool:
        return self.key is None or self.key.role == "admin"

    @property
    def owner(self) -> str | None:
        """The owner id stamped on tasks; None when auth is off."""
        return self.key.id if self.key else None

    def can_see(self, owner: str | None) -> bool:
        if self.is_admin:
            return True
        return owner is not None and self.key is not None and owner == self.key.id


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def get_key_store(request: Request) -> ApiKeyStore:
    store = get_components(request).extras.get("apikeys")
    assert isinstance(store, ApiKeyStore), "create_app builds the key store"
    return store


# Declared so /docs and the OpenAPI document show how to authenticate (and an
# "Authorize" button); ``authenticate`` reads the headers itself, so it also works when
# the proxy calls it with just the request.
BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The API key, as an alternative header."
)


async def authenticate(
    request: Request,
    _bearer: HTTPAuthorizationCredentials | None = Security(BEARER),
    _header: str | None = Security(API_KEY_HEADER),
) -> Principal:
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    settings = get_components(request).settings.auth
    if not settings.enabled:
        principal = Principal(None)
        request.state.principal = principal
        return principal
    plaintext = presented_key(request)
    if not plaintext:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    store = get_key_store(request)
    try:
        key = await store.verify(plaintext)
        if key is not None:
            wait = await store.hit_rate_limit(key)
            if wait:
                raise LimitExceeded(
                    f"rate limit of {key.rate_limit_per_min}/min reached", retry_after=wait
                )
    except RedisError as exc:
        if settings.fail_open:
            logger.warning("auth: Redis unavailable, failing open (%s)", type(exc).__name__)
            return Principal(None)
        raise StoreError("cannot check the API key: Redis unavailable") from exc
    if key is None:
        raise Unauthenticated("invalid or revoked API key")
    principal = Principal(key)
    request.state.principal = principal
    return principal


async def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this needs an admin key")
    return principal
