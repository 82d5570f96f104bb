"""GPU requirements end to end on a real Redis: the submit check (422), the queue's routing
(a worker of a pool that does not fit never leases the task) and the scaler (only a fitting
pool is started for it, the cheapest per slot-hour among them)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from gpufleet.api.errors import install_error_handlers
from gpufleet.api.tasks import router
from gpufleet.providers.novita import NovitaProvider
from gpufleet.providers.simulated import create_novita_app
from gpufleet.scaling.actions import Create
from gpufleet.settings import load_settings
from gpufleet.store.queue import TaskQueue
from gpufleet.tasks import TaskSubmit
from gpufleet.wiring import build_services
from tests.reconciler_harness import COMFY, GRAPH, Fleet

CHAT = {"api": "chat", "body": {"model": "llama3.1:70b", "messages": []}}


def _settings() -> Any:
    return load_settings(
        env_file=None,
        auth={"enabled": False},
        providers={"novita": {"api_key": "sim-novita-key", "base_url": "http://novita.sim"}},
        pools=[
            {"name": "small", "provider": "static", "engine": "comfyui", "urls": ["http://a"],
             "gpu": "NVIDIA GeForce RTX 4090", "gpu_memory_gb": 24, "cuda": "12.2"},
            # GPU and memory from the simulated product "A100 SXM4 80GB".
            {"name": "big", "provider": "novita", "engine": "comfyui", "product_id": "a100.sim",
             "image": "comfy:latest"},
            {"name": "plain", "provider": "static", "engine": "comfyui", "urls": ["http://c"]},
            {"name": "o-small", "provider": "static", "engine": "ollama", "urls": ["http://d"],
             "gpu_memory_gb": 24},
            {"name": "o-big", "provider": "static", "engine": "ollama", "urls": ["http://e"],
             "gpu_memory_gb": 80},
        ],
        models={"llama3.1:70b": {"gpu_memory_gb": 48}, "huge": {"gpu_memory_gb": 500}},
    )


@pytest.fixture
async def client(redis: aioredis.Redis) -> AsyncIterator[httpx.AsyncClient]:
    settings = _settings()
    novita_app = create_novita_app()
    novita = NovitaProvider(
        settings.providers.novita, pools=settings.pools,
        transport=httpx.ASGITransport(app=novita_app),
    )
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(novita.aclose)
        services = await build_services(settings, redis, stack, providers={"novita": novita})
        app.state.services = services
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gpufleet") as c:
            c.queue = services.queue  # type: ignore[attr-defined]
            c.novita = novita_app.state.sim  # type: ignore[attr-defined]
            yield c


async def _submit(client: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    return await client.post("/api/v1/tasks", json={"payload": GRAPH, **extra})


async def test_a_requirement_no_pool_meets_is_422_naming_it(client: httpx.AsyncClient) -> None:
    r = await _submit(client, gpu_memory_gb=100)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert message == (
        "gpu_memory_gb: no pool has gpu_memory_gb >= 100: pools small (NVIDIA GeForce RTX 4090, "
        "24 GB, CUDA 12.2), big (A100 SXM4, 80 GB), plain (GPU unknown)"
    )
    r = await _submit(client, gpu=["H100"], cuda="12.0")
    assert r.status_code == 422
    assert "no pool has gpu in [H100], cuda >= 12.0" in r.json()["error"]["message"]
    r = await _submit(client, pool="small", gpu_memory_gb=48)
    assert r.status_code == 422
    assert "pools small (" in r.json()["error"]["message"]
    assert "big" not in r.json()["error"]["message"]
    assert (await queue_of(client).stats()).queued == 0  # nothing stored


@pytest.mark.parametrize(
    ("extra", "problem"),
    [({"gpu_memory_gb": -1}, "gpu_memory_gb"), ({"cuda": "12.x"}, "cuda"), ({"gpu": []}, "gpu")],
)
async def test_malformed_requirements_are_422(
    client: httpx.AsyncClient, extra: dict[str, Any], problem: str
) -> None:
    r = await _submit(client, **extra)
    assert r.status_code == 422
    assert problem in r.json()["error"]["message"]


def queue_of(client: httpx.AsyncClient) -> TaskQueue:
    return client.queue  # type: ignore[attr-defined,no-any-return]


async def test_only_fitting_pools_lease_the_task(client: httpx.AsyncClient) -> None:
    queue = queue_of(client)
    a100 = await _submit(client, gpu=["a100"])  # only big (from its Novita product)
    assert a100.status_code == 202, a100.text
    assert a100.json()["requires"] == {"gpu": ["a100"]}
    assert client.novita.count("GET", "/products") == 1  # type: ignore[attr-defined]
    mem = await _submit(client, gpu_memory_gb=16, priority=9)  # small and big, not plain
    cuda = await _submit(client, cuda="12")  # small only (big's CUDA is unknown)
    anyone = await _submit(client, priority=0)
    stats = await queue.stats()
    assert stats.queued_by_fit == {"big": 1, "big+small": 1, "small": 1}
    assert stats.queued_unpooled == {"comfyui": 4}

    assert [le.task_id for le in await queue.lease("w-plain", ["plain"], kinds=["comfyui"],
                                                    limit=5)] == [anyone.json()["id"]]
    got = await queue.lease("w-small", ["small"], kinds=["comfyui"], limit=5)
    assert [le.task_id for le in got] == [mem.json()["id"], cuda.json()["id"]]
    got = await queue.lease("w-big", ["big"], kinds=["comfyui"], limit=5)
    assert [le.task_id for le in got] == [a100.json()["id"]]
    assert got[0].task.requires == {"gpu": ["a100"]}
    stats = await queue.stats()
    assert stats.running_by_fit == {"big": 1, "big+small": 1, "small": 1}
    assert stats.queued == 0


async def test_model_requirement_routes_queued_ollama_tasks(client: httpx.AsyncClient) -> None:
    queue = queue_of(client)
    r = await client.post("/api/v1/tasks", json={"kind": "ollama", "payload": CHAT})
    assert r.status_code == 202, r.text
    assert r.json()["requires"] == {"gpu_memory_gb": 48.0}
    assert await queue.lease("w-os", ["o-small"], kinds=["ollama"], models=None) == []
    (lease,) = await queue.lease("w-ob", ["o-big"], kinds=["ollama"], models=None)
    assert lease.task_id == r.json()["id"]
    huge = {"api": "chat", "body": {"model": "huge", "messages": []}}
    r = await client.post("/api/v1/tasks", json={"kind": "ollama", "payload": huge})
    assert r.status_code == 422
    assert "model: no pool has gpu_memory_gb >= 500" in r.json()["error"]["message"]


async def test_cancel_and_retry_keep_the_fit_set(client: httpx.AsyncClient) -> None:
    queue = queue_of(client)
    first = (await _submit(client, gpu=["a100"])).json()["id"]
    second = (await _submit(client, gpu=["a100"])).json()["id"]
    await queue.cancel(first)
    (lease,) = await queue.lease("w-big", ["big"], kinds=["comfyui"])
    assert lease.task_id == second
    assert await queue.release(second, lease.token, "worker left") == "requeued"
    assert await queue.lease("w-small", ["small"], kinds=["comfyui"]) == []
    (again,) = await queue.lease("w-big2", ["big"], kinds=["comfyui"])
    assert again.task_id == second
    assert (await queue.stats()).queued_by_fit == {}


BIG: dict[str, Any] = COMFY | {"name": "big", "product_id": "a100.sim", "price_per_hour": 1.6}


async def test_scaler_starts_only_a_fitting_pool(redis: aioredis.Redis) -> None:
    # comfy (RTX 4090 24GB, $0.67/h) is cheaper, but only big (A100 80GB) fits 48 GB.
    fleet = Fleet(redis, pools=[COMFY, BIG])
    try:
        await fleet.queue.enqueue(TaskSubmit(payload=GRAPH, gpu_memory_gb=48), fit=["big"])
        report = await fleet.reconciler().reconcile_once()
        assert [o.action.pool for o in report.of(Create)] == ["big"]
        keys = {d.key: d.pools for d in report.snapshot.demand}
        assert keys == {"comfyui/*@big": ("big",)}
        # Work any pool takes goes to the cheapest per slot-hour, as before.
        await fleet.enqueue(1)
        report = await fleet.reconciler().reconcile_once()
        assert [o.action.pool for o in report.of(Create)] == ["comfy"]
    finally:
        await fleet.aclose()


async def test_scaler_picks_the_cheapest_of_the_fitting_pools(redis: aioredis.Redis) -> None:
    cheap_big = BIG | {"name": "big2", "price_per_hour": 1.2}
    fleet = Fleet(redis, pools=[COMFY, BIG, cheap_big])
    try:
        spec = TaskSubmit(payload=GRAPH, gpu=["A100"])
        await fleet.queue.enqueue(spec, fit=["big", "big2"])
        report = await fleet.reconciler().reconcile_once()
        assert [o.action.pool for o in report.of(Create)] == ["big2"]
    finally:
        await fleet.aclose()
