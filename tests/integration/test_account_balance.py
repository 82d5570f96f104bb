"""The Novita account's balance: the client against the simulated Novita (same path, same
1/10000-USD strings as provider-apis.md), the scaler's Hold when the balance would not cover
the next hour, the cache and a failing read (unknown: no hold), the gauge, and the account
endpoint."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from prometheus_client import REGISTRY

from gpufleet.api.providers import router
from gpufleet.providers import novita_models as wire
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
from gpufleet.scaling.actions import Create, Hold
from gpufleet.settings import load_settings
from gpufleet.wiring import build_services
from tests.reconciler_harness import COMFY, Fleet

BALANCE = ("GET", "/openapi/v1/billing/balance/detail")
CREATE = ("POST", "/gpu/instance/create")


def gauge(provider: str) -> float | None:
    return REGISTRY.get_sample_value("gpufleet_provider_balance_usd", {"provider": provider})


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("https://api.novita.ai/gpu-instance/openapi/v1",
         "https://api.novita.ai/openapi/v1/billing/balance/detail"),
        ("https://api.novita.ai/gpu-instance/openapi/v1/",
         "https://api.novita.ai/openapi/v1/billing/balance/detail"),
        ("http://novita.sim", "http://novita.sim/openapi/v1/billing/balance/detail"),
    ],
)
def test_balance_lives_beside_the_gpu_api(base_url: str, expected: str) -> None:
    assert wire.balance_url(base_url) == expected


def test_reference_example_parses_to_usd() -> None:
    example = {"availableBalance": "1000000", "cashBalance": "800000", "creditLimit": "200000",
               "pendingCharges": "0", "outstandingInvoices": "0"}
    balance = wire.parse_balance(example)
    assert balance.available_usd == 100.0
    assert balance.cash_usd == 80.0
    assert balance.credit_limit_usd == 20.0
    assert balance.outstanding_invoices_usd == 0.0


async def test_client_reads_the_simulated_balance_which_falls_as_instances_bill() -> None:
    clock = FakeClock()
    app = create_novita_app(SimNovitaConfig(balance_usd=12.5, pull_s=1, create_s=1),
                            clock=clock)
    settings = load_settings(env_file=None, providers={"novita": {
        "api_key": "sim-novita-key", "base_url": "http://n/gpu-instance/openapi/v1"}})
    provider = NovitaProvider(settings.providers.novita, retry=RetryPolicy(attempts=1),
                              transport=httpx.ASGITransport(app=app))
    try:
        assert (await provider.balance()).available_usd == 12.5
        raw = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://n")
        async with raw:
            answer = await raw.get(BALANCE[1], headers={"Authorization": "Bearer sim-novita-key"})
        body = answer.json()
        assert body == {"availableBalance": "125000", "cashBalance": "125000",
                        "creditLimit": "0", "pendingCharges": "0", "outstandingInvoices": "0"}
        assert all(isinstance(v, str) for v in body.values())
        pool = load_settings(env_file=None, providers={"novita": {"api_key": "k"}}, pools=[
            COMFY]).pools[0]
        await provider.create(pool, "comfy-1")
        clock.advance(3600 + 10)
        app.state.sim.advance()
        assert (await provider.balance()).available_usd == pytest.approx(12.5 - 0.67, abs=0.01)
    finally:
        await provider.aclose()


async def test_low_balance_holds_scale_up_with_a_reason(redis: aioredis.Redis) -> None:
    fleet = Fleet(redis, pools=[COMFY], novita=SimNovitaConfig(balance_usd=0.5))
    try:
        await fleet.enqueue(2, pool="comfy")
        report = await fleet.reconciler().reconcile_once()
        assert report.of(Create) == []
        assert fleet.novita.count(*CREATE) == 0
        (hold,) = [o.action for o in report.of(Hold)]
        assert hold.code == "balance"
        assert hold.reason.endswith(
            "novita balance $0.50 would not cover the next hour ($0.67/h with this worker)"
        )
        assert report.snapshot.balances_usd == {"novita": 0.5}
        assert gauge("novita") == 0.5
        events = await fleet.events.recent(20)
        assert any(e.get("outcome") == "hold" and "balance" in e.get("reason", "")
                   for e in events)
    finally:
        await fleet.aclose()


async def test_enough_balance_creates_and_counts_the_running_burn(
    redis: aioredis.Redis,
) -> None:
    # $1.50 pays one hour of two workers at $0.67/h, not three.
    fleet = Fleet(redis, pools=[COMFY], novita=SimNovitaConfig(balance_usd=1.5))
    try:
        await fleet.enqueue(3, pool="comfy")
        report = await fleet.reconciler().reconcile_once()
        assert len(report.of(Create)) == 2
        assert fleet.novita.count(*CREATE) == 2
        (hold,) = [o.action for o in report.of(Hold)]
        assert "($2.01/h with this worker)" in hold.reason
    finally:
        await fleet.aclose()


async def test_balance_is_cached_and_a_failed_read_holds_nothing(
    redis: aioredis.Redis,
) -> None:
    fleet = Fleet(redis, pools=[COMFY], novita=SimNovitaConfig(balance_usd=0.5))
    try:
        reconciler = fleet.reconciler()
        await fleet.enqueue(1, pool="comfy")
        await reconciler.reconcile_once()
        fleet.clock.advance(30)
        await reconciler.reconcile_once()
        assert fleet.novita.count(*BALANCE) == 1  # at most once a minute
        fleet.novita.faults.append(Fault(status=500, path=BALANCE[1]))
        fleet.clock.advance(31)
        report = await reconciler.reconcile_once()
        assert fleet.novita.count(*BALANCE) == 2
        assert report.snapshot.balances_usd == {}
        assert gauge("novita") is None  # unknown, not a stale figure
        assert len(report.of(Create)) == 1  # unknown balance: no hold
        assert report.of(Hold) == []
    finally:
        await fleet.aclose()


@pytest.fixture
async def client(redis: aioredis.Redis) -> AsyncIterator[Any]:
    clock = FakeClock()
    settings = load_settings(env_file=None, pools=[
        {"name": "comfy", "provider": "novita", "engine": "comfyui", "product_id": "4090.sim",
         "image": "img"},
        {"name": "gpu", "provider": "surf", "engine": "ollama", "name_filter": "gpufleet-gpu"},
        {"name": "home", "provider": "static", "engine": "ollama", "urls": ["http://box:11434"]},
    ], providers={"novita": {"api_key": "sim-novita-key", "base_url": "http://n/"},
                  "surf": {"api_token": "sim-surf-token", "base_url": "http://s/"}})
    novita_app = create_novita_app(SimNovitaConfig(balance_usd=42.0), clock=clock)
    surf_app = create_surf_app(SimSurfConfig(), clock=clock)
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
        app.state.services = await build_services(settings, redis, stack, providers=providers)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gpufleet") as c:
            c.novita = novita_app.state.sim  # type: ignore[attr-defined]
            yield c
    for provider in providers.values():
        await provider.aclose()


async def test_account_endpoint(client: Any) -> None:
    novita = await client.get("/api/v1/providers/novita/account")
    assert novita.status_code == 200
    assert novita.json() == {
        "provider": "novita", "known": True, "currency": "USD",
        "balance": {"available_usd": 42.0, "cash_usd": 42.0, "credit_limit_usd": 0.0,
                    "pending_charges_usd": 0.0, "outstanding_invoices_usd": 0.0},
    }
    surf = await client.get("/api/v1/providers/surf/account")
    assert surf.status_code == 200
    assert surf.json()["known"] is False
    assert surf.json()["balance"] is None
    assert "cannot read the surf account's balance" in surf.json()["message"]
    static = await client.get("/api/v1/providers/static/account")
    assert static.status_code == 404
    assert static.json()["error"]["message"] == "static endpoints have no cloud account"
    assert (await client.get("/api/v1/providers/aws/account")).status_code == 404
    client.novita.faults.append(Fault(status=401, path=BALANCE[1]))
    failed = await client.get("/api/v1/providers/novita/account")
    assert failed.status_code == 502
