"""/api/v1/pools on a real Redis: describe, overrides persisted over config, floors, backoff."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gpufleet.app import create_app
from gpufleet.domain import WorkerState
from gpufleet.settings import load_settings
from gpufleet.store.pools import PoolStateStore

POOLS = [
    {
        "name": "comfy",
        "provider": "static",
        "engine": "comfyui",
        "urls": ["http://h:8188"],
        "min_workers": 0,
        "max_workers": 3,
        "price_per_hour": 0.5,
    },
    {
        "name": "llm",
        "provider": "static",
        "engine": "ollama",
        "urls": ["http://h:11434"],
        "slots": 4,
        "models": ["llama3.1:8b"],
    },
]


@pytest.fixture
async def client(redis_url: str, redis: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(load_settings(env_file=None, redis={"url": redis_url}, pools=POOLS))
    async with app.router.lifespan_context(app):
        store = app.state.services.apikeys
        _, admin = await store.create("a", role="admin")
        _, user = await store.create("u")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers={"Authorization": f"Bearer {admin}"}
        ) as c:
            c.services = app.state.services  # type: ignore[attr-defined]
            c.user = {"Authorization": f"Bearer {user}"}  # type: ignore[attr-defined]
            yield c


async def test_list_and_describe(client: Any) -> None:
    registry = client.services.registry
    # The static URL was registered at startup as comfy-0 (booting); bring it up by hand.
    assert await registry.transition("comfy-0", WorkerState.ready)
    await registry.acquire_slot("comfy-0")
    pools = (await client.get("/api/v1/pools")).json()
    assert [p["name"] for p in pools] == ["comfy", "llm"]
    comfy = pools[0]
    assert comfy["workers_by_state"] == {"ready": 1}
    assert (comfy["slots_busy"], comfy["slots_free"]) == (1, 0)
    assert comfy["burn_rate_per_hour"] == 0.5
    assert (await client.get("/api/v1/pools/llm")).json()["slots"] == 4
    assert (await client.get("/api/v1/pools/nope")).status_code == 404
    assert (await client.get("/api/v1/pools", headers=client.user)).status_code == 200


async def test_burn_rate_counts_every_live_worker_like_the_spend_does(client: Any) -> None:
    """A provisioning instance bills (the reconciler adds its price to the spend and to the
    burn-rate gauge), so the pool's burn rate counts it; a parked or failed one does not."""
    registry = client.services.registry
    before = (await client.get("/api/v1/pools/llm")).json()["burn_rate_per_hour"]
    await registry.register(pool="llm", provider="novita", slots=1, worker_id="new-1",
                            state=WorkerState.provisioning, price_per_hour=1.25)
    await registry.register(pool="llm", provider="novita", slots=1, worker_id="old-1",
                            state=WorkerState.stopped, price_per_hour=2.0)
    after = (await client.get("/api/v1/pools/llm")).json()["burn_rate_per_hour"]
    assert after == pytest.approx(before + 1.25)


async def test_patch_persists_over_config_and_needs_admin(client: Any, redis_url: str) -> None:
    denied = await client.patch("/api/v1/pools/comfy", json={"max_workers": 9}, headers=client.user)
    assert denied.status_code == 403
    patched = await client.patch(
        "/api/v1/pools/comfy", json={"min_workers": 1, "max_workers": 5, "idle_timeout_s": 60}
    )
    assert patched.status_code == 200
    body = patched.json()
    assert (body["min_workers"], body["max_workers"], body["idle_timeout_s"]) == (1, 5, 60)
    bad = await client.patch("/api/v1/pools/comfy", json={"min_workers": 7})
    assert bad.status_code == 409
    assert (await client.patch("/api/v1/pools/comfy", json={})).status_code == 422
    assert (await client.patch("/api/v1/pools/comfy", json={"max_workers": -1})).status_code == 422
    assert (await client.patch("/api/v1/pools/comfy", json={"slots": 3})).status_code == 422
    for wrong in ("soon", -5, 10**9):
        refused = await client.patch("/api/v1/pools/comfy", json={"idle_timeout_s": wrong})
        assert refused.status_code == 422, wrong
    auto = await client.patch("/api/v1/pools/comfy", json={"idle_timeout_s": "auto"})
    assert auto.json()["idle_timeout_s"] == "auto"
    assert (await client.patch("/api/v1/pools/comfy", json={"idle_timeout_s": 60})).is_success
    # Another replica (a second app on the same Redis) sees the override.
    other = create_app(load_settings(env_file=None, redis={"url": redis_url}, pools=POOLS))
    async with other.router.lifespan_context(other):
        store = PoolStateStore(other.state.services.redis)
        effective, _ = await store.effective(other.state.services.settings.pool("comfy"))
        assert (effective.min_workers, effective.max_workers) == (1, 5)


async def test_scale_floor_expires(redis: Any) -> None:
    now = [1000.0]
    store = PoolStateStore(redis, clock=lambda: now[0])
    spec = load_settings(env_file=None, pools=POOLS).pool("comfy")
    await store.set_floor("comfy", 2, 600)
    effective, runtime = await store.effective(spec)
    assert (effective.min_workers, runtime.floor) == (2, 2)
    await store.set_floor("comfy", 10, 600)
    assert (await store.effective(spec))[0].min_workers == 3  # never above max_workers
    now[0] += 601
    assert (await store.effective(spec))[0].min_workers == 0


async def test_backoff_grows_and_clears(redis: Any) -> None:
    now = [0.0]
    store = PoolStateStore(redis, clock=lambda: now[0])
    assert await store.back_off("p", "INSUFFICIENT_RESOURCE") == 30
    assert await store.back_off("p", "INSUFFICIENT_RESOURCE") == 60
    runtime = await store.runtime("p")
    assert (runtime.backoff_until, runtime.failures) == (60, 2)
    now[0] = 61
    assert (await store.runtime("p")).backoff_until is None
    await store.clear_backoff("p")
    assert await store.back_off("p", "x") == 61 + 30


async def test_spend_total_and_per_day(redis: Any) -> None:
    store = PoolStateStore(redis, clock=lambda: 86400 * 3 + 10)
    await store.add_spend("p", 0.25)
    await store.add_spend("p", 0.5)
    runtime = await store.runtime("p")
    assert runtime.spend_usd == pytest.approx(0.75)
    assert runtime.spend_today_usd == pytest.approx(0.75)


ADMIN_ONLY = ("provider", "price_per_hour", "spend_usd", "spend_today_usd",
              "burn_rate_per_hour", "backoff", "last_actions", "overrides", "floor")


async def test_user_keys_see_pool_counts_not_spend_or_scale_reasons(client: Any) -> None:
    pool_state = client.services.pool_state
    await pool_state.back_off("comfy", "boot timeout on inst-9", base_s=60, cap_s=60)
    await client.services.events.emit("scale", pool="comfy", action="create", reason="demand 3")
    admin = (await client.get("/api/v1/pools/comfy")).json()
    assert admin["backoff"]["reason"] == "boot timeout on inst-9"
    assert admin["last_actions"]
    assert "burn_rate_per_hour" in admin
    for path in ("/api/v1/pools", "/api/v1/pools/comfy"):
        answer = await client.get(path, headers=client.user)
        assert answer.status_code == 200
        body = answer.json()
        pool = body[0] if isinstance(body, list) else body
        assert pool["name"] == "comfy"
        assert pool["engine"] == "comfyui"
        assert "workers_by_state" in pool
        assert "demand" in pool
        assert "models" in pool
        for field in ADMIN_ONLY:
            assert field not in pool, (path, field)
        assert "inst-9" not in answer.text
        assert "demand 3" not in answer.text


async def test_api_ps_shows_users_counts_not_worker_ids(client: Any) -> None:
    registry = client.services.registry
    await registry.register(pool="llm", provider="static", slots=4, worker_id="llm-secret-1",
                            state=WorkerState.ready, base_url="http://h:11434",
                            models_loaded=["llama3.1:8b"])
    admin = (await client.get("/api/ps")).json()["models"]
    assert admin[0]["workers"] == ["llm-secret-1"]
    user = await client.get("/api/ps", headers=client.user)
    (model,) = user.json()["models"]
    assert model["name"] == "llama3.1:8b"
    assert model["worker_count"] == 1
    assert "workers" not in model
    assert "llm-secret-1" not in user.text
