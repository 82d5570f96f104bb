"""``/api/v1/providers``: a tiny app with only this router, real providers on simulated clouds."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import httpx
import pytest
from fastapi import FastAPI

from gpufleet.api.providers import router
from gpufleet.providers.base import RetryPolicy
from gpufleet.providers.novita import NovitaProvider
from gpufleet.providers.simulated import (
    FakeClock,
    Fault,
    SimNovitaConfig,
    SimSurfConfig,
    create_novita_app,
    create_surf_app,
)
from gpufleet.providers.static import StaticProvider
from gpufleet.providers.surf import SurfProvider
from gpufleet.settings import Settings, load_settings
from gpufleet.wiring import build_services


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(clock: FakeClock) -> AsyncIterator[Any]:
    settings: Settings = load_settings(env_file=None, pools=[
        {"name": "comfy", "provider": "novita", "engine": "comfyui", "product_id": "4090.sim",
         "image": "img"},
        {"name": "gpu", "provider": "surf", "engine": "ollama", "name_filter": "gpufleet-gpu"},
        {"name": "home", "provider": "static", "engine": "ollama", "urls": ["http://box:11434"]},
    ], providers={"novita": {"api_key": "sim-novita-key", "base_url": "http://n/"},
                  "surf": {"api_token": "sim-surf-token", "base_url": "http://s/"}})
    novita_app = create_novita_app(SimNovitaConfig(), clock=clock)
    surf_app = create_surf_app(SimSurfConfig(workspaces=["gpufleet-gpu-01"]), clock=clock)
    retry = RetryPolicy(attempts=1)
    providers = {
        "novita": NovitaProvider(settings.providers.novita, pools=settings.pools, retry=retry,
                                 transport=httpx.ASGITransport(app=novita_app)),
        "surf": SurfProvider(settings.providers.surf, pools=settings.pools, retry=retry,
                             transport=httpx.ASGITransport(app=surf_app)),
        "static": StaticProvider(settings.pools),
    }
    app = FastAPI()
    app.include_router(router)
    async with contextlib.AsyncExitStack() as stack:
        redis = fakeredis.FakeAsyncRedis(decode_responses=True)
        stack.push_async_callback(redis.aclose)
        app.state.services = await build_services(settings, redis, stack, providers=providers)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gpufleet") as c:
            c.novita = novita_app.state.sim  # type: ignore[attr-defined]
            c.surf = surf_app.state.sim  # type: ignore[attr-defined]
            yield c
    for provider in providers.values():
        await provider.aclose()


async def test_create_start_stop_delete_by_hand(client: Any, clock: FakeClock) -> None:
    r = await client.post("/api/v1/providers/novita/instances", json={"pool": "comfy"})
    assert r.status_code == 201, r.text
    inst = r.json()
    assert inst["name"].startswith("gpufleet-comfy-manual-")
    assert list(client.novita.instances) == [inst["id"]]

    clock.advance(3600)
    r = await client.get("/api/v1/providers/novita/instances")
    [listed] = r.json()["instances"]
    assert listed["state"] == "running"
    assert listed["base_url"].endswith("-8188.sim-1.gpu-instance.novita.ai")
    # The instance has its worker-gate secret, and no answer shows it (issue 19 point 6).
    envs = {e["key"]: e["value"] for e in client.novita.instances[inst["id"]].envs}
    secret = envs["GPUFLEET_WORKER_TOKEN"]
    assert secret
    assert "worker_token" not in inst
    assert "worker_token" not in listed
    assert secret not in r.text

    r = await client.post(f"/api/v1/providers/novita/instances/{inst['id']}/start")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "invalid_state"
    assert "invalid state change" in r.json()["error"]["message"]

    r = await client.post(f"/api/v1/providers/novita/instances/{inst['id']}/stop")
    assert r.status_code == 200
    assert r.json()["instance"]["state"] == "stopping"
    assert client.novita.instances[inst["id"]].status == "toStop"

    r = await client.post(f"/api/v1/providers/novita/instances/{inst['id']}/delete")
    assert r.status_code == 200
    assert client.novita.instances[inst["id"]].status == "toRemove"
    assert (await client.get("/api/v1/providers/novita/instances")).json()["instances"] == []


async def test_pause_and_resume_surf(client: Any, clock: FakeClock) -> None:
    [ws] = (await client.get("/api/v1/providers/surf/instances?pool=gpu")).json()["instances"]
    assert ws["state"] == "paused"
    r = await client.post(f"/api/v1/providers/surf/instances/{ws['id']}/resume")
    assert r.status_code == 200
    assert r.json()["instance"]["provider_status"] == "resuming"
    assert client.surf.workspaces[ws["id"]].status == "resuming"
    r = await client.post(f"/api/v1/providers/surf/instances/{ws['id']}/resume")
    assert r.status_code == 409


async def test_products_with_price_and_availability(client: Any) -> None:
    r = await client.get("/api/v1/providers/novita/products")
    assert r.status_code == 200
    products = {p["id"]: p for p in r.json()["products"]}
    assert products["4090.sim"]["price_per_hour"] == pytest.approx(0.67)
    assert products["4090.sim"]["available"] is True


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/v1/providers/aws/instances", 404, "not_found"),
        ("POST", "/api/v1/providers/static/instances/home-0/stop", 405, "unsupported"),
        ("POST", "/api/v1/providers/surf/instances/x/start", 405, "unsupported"),
        ("POST", "/api/v1/providers/novita/instances/x/pause", 405, "unsupported"),
        ("POST", "/api/v1/providers/novita/instances/x/explode", 404, "not_found"),
        ("POST", "/api/v1/providers/novita/instances/0123456789abcdef/start", 404, "not_found"),
        ("GET", "/api/v1/providers/novita/instances?pool=gpu", 404, "not_found"),
    ],
)
async def test_errors(client: Any, method: str, path: str, status: int, code: str) -> None:
    r = await client.request(method, path)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]


async def test_create_for_a_pool_of_another_provider_is_404(client: Any) -> None:
    r = await client.post("/api/v1/providers/novita/instances", json={"pool": "gpu"})
    assert r.status_code == 404
    assert client.novita.instances == {}


async def test_capacity_and_outages_are_503(client: Any) -> None:
    client.novita.config.products[0].capacity_gpus = 0
    r = await client.post("/api/v1/providers/novita/instances", json={"pool": "comfy"})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "insufficient_capacity"
    client.novita.faults.append(Fault(status=429, retry_after_s=9))
    r = await client.get("/api/v1/providers/novita/instances")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "9"
    client.surf.faults.append(Fault(status=500))
    r = await client.get("/api/v1/providers/surf/instances")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "provider_unavailable"


async def test_bad_credentials_are_502(client: Any) -> None:
    client.novita.config.api_key = "rotated"
    r = await client.get("/api/v1/providers/novita/instances")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "provider_auth_failed"


async def test_static_lists_its_urls(client: Any) -> None:
    r = await client.get("/api/v1/providers/static/instances")
    [inst] = r.json()["instances"]
    assert inst["base_url"] == "http://box:11434"
    assert inst["state"] == "running"


async def test_build_providers_builds_only_what_is_used() -> None:
    from gpufleet.providers import build_providers

    static_only = load_settings(env_file=None, pools=[
        {"name": "home", "provider": "static", "engine": "ollama", "urls": ["http://box:11434"]}])
    built = build_providers(static_only)
    assert sorted(built) == ["static"]
    with_key = load_settings(env_file=None, providers={"novita": {"api_key": "k"}})
    built = build_providers(with_key)
    assert sorted(built) == ["novita"]
    assert built["novita"].capabilities >= {"create", "start", "stop", "delete"}
    await built["novita"].aclose()
