"""``GET /novita/status`` answers ComfyLess's shape (its README's example:
``{"provider": "novita", "metrics": {"total_workers": 3, "pending_workers": 0,
"starting_workers": 1, "running_workers": 1, "idle_workers": 1, "terminating_workers": 0,
"failed_workers": 0}}``), counting the workers of the Novita pools; admin keys only."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from gpufleet.api.comfyless import router
from gpufleet.domain import WorkerState
from gpufleet.settings import load_settings
from gpufleet.store.workers import WorkerRegistry
from gpufleet.wiring import build_services

EXAMPLE = {"provider": "novita", "metrics": {
    "total_workers": 3, "pending_workers": 0, "starting_workers": 1, "running_workers": 1,
    "idle_workers": 1, "terminating_workers": 0, "failed_workers": 0}}


@pytest.fixture
async def client(redis: aioredis.Redis) -> AsyncIterator[Any]:
    settings = load_settings(env_file=None, providers={"novita": {"api_key": "k"}}, pools=[
        {"name": "comfy", "provider": "novita", "engine": "comfyui", "product_id": "p",
         "image": "i"},
        {"name": "home", "provider": "static", "engine": "ollama", "urls": ["http://box"]},
    ])
    app = FastAPI()
    app.include_router(router)
    async with contextlib.AsyncExitStack() as stack:
        app.state.services = services = await build_services(settings, redis, stack)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gpufleet") as c:
            c.registry = services.registry  # type: ignore[attr-defined]
            yield c


async def _register(registry: WorkerRegistry, pool: str, state: WorkerState, n: int = 1) -> None:
    for i in range(n):
        await registry.register(pool=pool, provider="novita", slots=2, state=state,
                                worker_id=f"{pool}-{state.value}-{i}")


async def test_the_comfyless_example(client: Any) -> None:
    registry = client.registry
    await _register(registry, "comfy", WorkerState.booting)
    await _register(registry, "comfy", WorkerState.ready, 2)
    await registry.acquire_slot("comfy-ready-0")
    await _register(registry, "home", WorkerState.ready)  # not a Novita pool: not counted
    answer = await client.get("/novita/status")
    assert answer.status_code == 200
    assert answer.json() == EXAMPLE


async def test_every_state_maps_to_a_comfyless_counter(client: Any) -> None:
    registry = client.registry
    for state in WorkerState:
        await _register(registry, "comfy", state)
    metrics = (await client.get("/novita/status")).json()["metrics"]
    assert metrics == {
        "total_workers": 8,  # all but deleted; stopped and paused are in the total only
        "pending_workers": 1, "starting_workers": 1, "running_workers": 0, "idle_workers": 1,
        "terminating_workers": 2, "failed_workers": 1,
    }
    assert list(metrics) == list(EXAMPLE["metrics"])


async def test_admin_only(api: Any) -> None:
    assert (await api.get("/novita/status")).json() == {
        "provider": "novita", "metrics": dict.fromkeys(EXAMPLE["metrics"], 0)}
    _, user_key = await api.keys.create("someone", role="user")
    denied = await api.get("/novita/status", headers={"Authorization": f"Bearer {user_key}"})
    assert denied.status_code == 403
    account = await api.get("/api/v1/providers/novita/account",
                            headers={"Authorization": f"Bearer {user_key}"})
    assert account.status_code == 403
