"""API keys on a real Redis: every route guarded, roles, rotation, limits across replicas."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gpufleet.app import create_app
from gpufleet.settings import load_settings
from gpufleet.store.apikeys import ApiKeyStore

PUBLIC = {
    "/",  # Ollama clients probe it ("Ollama is running"); browsers go to /ui
    "",  # the same route, as FastAPI >= 0.165 reports an included router's root
    "/api/version",
    "/health",
    "/ready",
    "/ui",
    "/metrics",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
}


def all_routes(app: Any) -> list[tuple[str, set[str]]]:
    """(path, methods) of every HTTP route, looking inside included routers."""
    out = []
    for route in app.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:  # FastAPI >= 0.165 keeps included routers as one entry
            out.extend((c.path, set(c.methods or {"GET"})) for c in contexts())
        elif hasattr(route, "path"):
            out.append((route.path, set(getattr(route, "methods", None) or {"GET"})))
    return out


def guarded_routes(app: Any) -> list[tuple[str, str]]:
    out = []
    for path, methods in all_routes(app):
        if path in PUBLIC:
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        out.extend((m, concrete) for m in sorted(methods) if m != "HEAD")
    return out


async def test_every_non_public_route_rejects_missing_and_bad_keys(api: Any) -> None:
    routes = guarded_routes(api.app)
    assert len(routes) >= 5, routes
    for method, path in routes:
        missing = await api.request(method, path, headers={"Authorization": ""})
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.headers["www-authenticate"] == "Bearer"
        bad = await api.request(method, path, headers={"Authorization": "Bearer gpf_nope"})
        assert bad.status_code == 401, (method, path)
    for path in ("/health", "/ready", "/metrics"):
        assert (await api.get(path, headers={"Authorization": ""})).status_code == 200


async def test_roles_create_rotate_revoke(api: Any) -> None:
    created = await api.post("/api/v1/keys", json={"name": "alice", "email": "a@x.org"})
    assert created.status_code == 201
    body = created.json()
    user_key = body["key"]
    assert body["role"] == "user"
    assert user_key.startswith("gpf_")
    user = {"Authorization": f"Bearer {user_key}"}
    assert (await api.get("/api/v1/workers", headers=user)).status_code == 200
    forbidden = await api.get("/api/v1/keys", headers=user)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "forbidden"
    x_api_key = await api.get(
        "/api/v1/workers", headers={"Authorization": "", "X-API-Key": user_key}
    )
    assert x_api_key.status_code == 200

    listed = (await api.get("/api/v1/keys")).json()
    assert {k["name"] for k in listed} == {"test-admin", "alice"}
    assert all("key" not in k and "digest" not in k for k in listed)

    rotated = (await api.post(f"/api/v1/keys/{body['id']}/rotate")).json()
    assert (await api.get("/api/v1/workers", headers=user)).status_code == 401
    new = {"Authorization": f"Bearer {rotated['key']}"}
    assert (await api.get("/api/v1/workers", headers=new)).status_code == 200
    assert (await api.delete(f"/api/v1/keys/{body['id']}")).json()["revoked"] is True
    assert (await api.get("/api/v1/workers", headers=new)).status_code == 401
    assert (await api.delete("/api/v1/keys/nope")).status_code == 404
    bad = await api.post("/api/v1/keys", json={"name": "", "role": "root"})
    assert bad.status_code == 422


async def test_only_a_hash_is_stored(api: Any, redis: aioredis.Redis) -> None:
    plaintext = (await api.post("/api/v1/keys", json={"name": "bob"})).json()["key"]
    dump = []
    async for key in redis.scan_iter("*"):
        kind = await redis.type(key)
        if kind == "hash":
            dump.append(str(await redis.hgetall(key)))
        elif kind == "string":
            dump.append(str(await redis.get(key)))
    assert dump
    assert all(plaintext not in text for text in dump)


def two_replicas(redis_url: str) -> list[Any]:
    return [create_app(load_settings(env_file=None, redis={"url": redis_url})) for _ in range(2)]


async def test_rate_limit_is_shared_across_two_replicas(
    redis_url: str, redis: aioredis.Redis
) -> None:
    apps = two_replicas(redis_url)
    async with apps[0].router.lifespan_context(apps[0]), apps[1].router.lifespan_context(apps[1]):
        store: ApiKeyStore = apps[0].state.services.apikeys
        _, key = await store.create("limited", rate_limit_per_min=5)
        answers = []
        for i in range(8):
            transport = httpx.ASGITransport(app=apps[i % 2])
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answers.append(
                    await client.get("/api/v1/workers", headers={"Authorization": f"Bearer {key}"})
                )
        assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
        assert 1 <= int(answers[-1].headers["retry-after"]) <= 60
        # Every counter the limiter wrote carries a TTL.
        async for name in redis.scan_iter("gpufleet:ratelimit:*"):
            assert 0 < await redis.ttl(name) <= 120


async def test_concurrency_limit_and_expiry(redis: aioredis.Redis) -> None:
    now = [100.0]
    store = ApiKeyStore(redis, b"s", clock=lambda: now[0])
    key, _ = await store.create("c", max_concurrent=2)
    assert await store.enter(key, "a", ttl_s=10)
    assert await store.enter(key, "b", ttl_s=10)
    assert not await store.enter(key, "c", ttl_s=10)
    await store.leave(key, "a")
    assert await store.enter(key, "c", ttl_s=10)
    now[0] += 11  # holders that crashed free their place
    assert await store.enter(key, "d", ttl_s=10)
    assert 0 < await redis.pttl("gpufleet:concurrent:" + key.id) <= 10_000


async def test_import_surf_controller_keys_once(redis: aioredis.Redis) -> None:
    store = ApiKeyStore(redis, b"secret")
    data = [
        {"name": "Ann", "email": "ann@uni.nl", "key": "legacy-key-1"},
        {"name": "Ben", "email": "ben@uni.nl", "key": "legacy-key-2"},
    ]
    assert [k.name for k in await store.import_json(data)] == ["Ann", "Ben"]
    assert await store.import_json({"keys": data}) == []
    found = await store.verify("legacy-key-2")
    assert found is not None
    assert found.email == "ben@uni.nl"


async def test_auth_disabled_lets_anyone_in_and_warns(
    redis_url: str, redis: aioredis.Redis, assert_logs: Callable[..., None]
) -> None:
    app = create_app(
        load_settings(env_file=None, redis={"url": redis_url}, auth={"enabled": False})
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/api/v1/keys")).status_code == 200
    assert_logs([r"AUTH IS DISABLED"])


@pytest.mark.parametrize("given", [None, "Bearer wrong"])
async def test_metrics_token(redis_url: str, redis: aioredis.Redis, given: str | None) -> None:
    app = create_app(
        load_settings(env_file=None, redis={"url": redis_url}, auth={"metrics_token": "m-tok"})
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"Authorization": given} if given else {}
            assert (await client.get("/metrics", headers=headers)).status_code == 401
            ok = await client.get("/metrics", headers={"Authorization": "Bearer m-tok"})
            assert ok.status_code == 200


async def test_security_headers_and_no_cors_by_default(api: Any) -> None:
    answer = await api.get("/health", headers={"Origin": "http://evil.example"})
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "DENY"
    assert "access-control-allow-origin" not in answer.headers


async def test_keys_never_logged(api: Any, assert_logs: Callable[..., None]) -> None:
    plaintext = (await api.post("/api/v1/keys", json={"name": "carol"})).json()["key"]
    await api.get("/api/v1/workers", headers={"Authorization": f"Bearer {plaintext}"})
    await api.get("/api/v1/workers", headers={"Authorization": "Bearer gpf_wrong"})
    assert_logs(prohibited=[plaintext, api.admin_key, "gpf_wrong"])


async def test_fail_open_lets_a_caller_through_as_a_user_never_an_admin(
    redis_url: str, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[auth] fail_open``: while keys cannot be checked, any string passes as a key, so
    it must not make its bearer an admin (keys, teams, the clouds' instances and balance)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    app = create_app(
        load_settings(env_file=None, redis={"url": redis_url}, auth={"fail_open": True})
    )
    async with app.router.lifespan_context(app):
        store: ApiKeyStore = app.state.services.apikeys

        async def down(plaintext: str) -> None:
            raise RedisConnectionError("Redis is down")

        monkeypatch.setattr(store, "verify", down)
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer not-a-key"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=headers
        ) as client:
            for path in ("/api/v1/keys", "/api/v1/teams", "/api/v1/events", "/novita/status"):
                assert (await client.get(path)).status_code == 403, path
            usage = await client.get("/api/v1/usage")
            assert usage.status_code == 200
            assert usage.json()["overhead"] is None  # the fleet's spend is an admin's
            assert (await client.get("/api/v1/pools")).status_code == 200  # a user's view
