"""Issue 5's end-to-end test: gpufleet (``create_app``) runs mixed work on a static fleet.

Two simulated ComfyUI workers (slots 1) and one simulated Ollama worker (slots 4), each
on its own loopback uvicorn server, are the static pools' URLs. gpufleet registers them,
its health checker brings them up, and its dispatcher runs 50 tasks submitted over REST.
Then: a worker killed mid-task (its server stopped) → the task finishes on the other
worker; an invalid graph fails once with the node error shown; and every ComfyUI output
is downloaded from gpufleet after all the workers are gone.

Intervals are short (health 0.2 s, lease TTL 2 s); nothing asserts a duration. The wall
time of the 50 tasks is printed (``-s``) for the record, not checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gpufleet.app import create_app
from gpufleet.domain import WorkerState
from gpufleet.engines.simulated import (
    ComfyUIConfig,
    OllamaConfig,
    SimulatedComfyUI,
    SimulatedOllama,
)
from gpufleet.loopback import LoopbackServer
from gpufleet.settings import load_settings

pytestmark = pytest.mark.timeout(90)


def graph(n: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": n}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage",
              "inputs": {"images": ["2", 0], "filename_prefix": f"e2e{n}"}},
    }


def chat(n: int) -> dict[str, Any]:
    return {"api": "chat", "body": {"model": "llama3.2",
                                    "messages": [{"role": "user", "content": f"hi {n}"}]}}


class Fleet:
    def __init__(self) -> None:
        self.comfy = [SimulatedComfyUI(ComfyUIConfig(default_steps=3)) for _ in range(2)]
        self.ollama = SimulatedOllama(OllamaConfig(models=("llama3.2",), first_token_s=0.01))
        self.servers = [LoopbackServer(s, name=f"sim-{i}")
                        for i, s in enumerate([*self.comfy, self.ollama])]

    async def start(self) -> list[str]:
        return [await s.start() for s in self.servers]

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        for sim in self.comfy:
            await sim.aclose()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = Fleet()
    await f.start()
    try:
        yield f
    finally:
        await f.stop()


@pytest.fixture
async def gpufleet(fleet: Fleet, redis: aioredis.Redis, redis_url: str,
                   tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    urls = [s.url for s in fleet.servers]
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        results={"dir": tmp_path / "results"},
        queue={"lease_ttl_s": 2.0, "heartbeat_interval_s": 0.2, "retry_backoff_s": 0.05,
               "retry_backoff_max_s": 0.2},
        workers={"health_interval_s": 0.2, "health_timeout_s": 0.5, "unhealthy_after": 2,
                 "dispatch_interval_s": 0.2},
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui", "slots": 1,
             "urls": urls[:2]},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 4,
             "models": ["llama3.2"], "urls": urls[2:]},
        ],
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        _, key = await app.state.services.apikeys.create("e2e", role="admin")
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gpufleet",
            headers={"Authorization": f"Bearer {key}"}, timeout=30,
        ) as client:
            client.services = app.state.services  # type: ignore[attr-defined]
            yield client


async def until(check: Any, tries: int = 1000) -> None:
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never became true")


async def submit(api: httpx.AsyncClient, kind: str, payload: dict[str, Any]) -> str:
    response = await api.post("/api/v1/tasks", json={"kind": kind, "payload": payload})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def finished(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    for _ in range(60):
        response = await api.get(f"/api/v1/tasks/{task_id}/wait", params={"timeout_s": 1})
        body: dict[str, Any] = response.json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return (await api.get(f"/api/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]
    raise AssertionError(f"task {task_id} never finished: {body}")


async def all_ready(api: httpx.AsyncClient) -> bool:
    workers = (await api.get("/api/v1/workers")).json()
    return len(workers) == 3 and all(w["state"] == "ready" for w in workers)


async def test_static_fleet_end_to_end(gpufleet: httpx.AsyncClient, fleet: Fleet) -> None:
    api = gpufleet
    await until(lambda: all_ready(api))
    workers = {w["id"]: w for w in (await api.get("/api/v1/workers")).json()}
    assert set(workers) == {"comfy-0", "comfy-1", "llm-0"}
    assert workers["llm-0"]["models_present"] == ["llama3.2:latest"]

    # -- 50 mixed tasks over REST, all succeed, never more than a worker's slots -------
    t0 = time.perf_counter()
    comfy_ids = [await submit(api, "comfyui", graph(n)) for n in range(25)]
    ollama_ids = [await submit(api, "ollama", chat(n)) for n in range(25)]
    results = await asyncio.gather(*(finished(api, i) for i in comfy_ids + ollama_ids))
    wall_s = time.perf_counter() - t0
    print(f"\n50 mixed tasks through gpufleet: {wall_s:.2f} s wall")

    assert [r["status"] for r in results] == ["succeeded"] * 50
    assert {r["worker"] for r in results[:25]} == {"comfy-0", "comfy-1"}
    assert {r["worker"] for r in results[25:]} == {"llm-0"}
    assert all(sim.recorder.max_concurrent <= 1 for sim in fleet.comfy)
    assert 1 <= fleet.ollama.recorder.max_concurrent <= 4
    assert fleet.ollama.recorder.total == 25
    assert sum(sim.recorder.total for sim in fleet.comfy) == 25
    for result in results[:25]:
        [output] = result["result"]["outputs"]
        assert output["content_type"] == "image/png"
        assert output["size"] > 0

    # -- a worker killed mid-task: its task finishes on the other worker ---------------
    victim, survivor = fleet.comfy
    assert (await api.post("/api/v1/workers/comfy-1/drain")).status_code == 200
    victim.config.hang_render = True
    doomed = await submit(api, "comfyui", graph(99))

    async def victim_busy() -> bool:
        return victim.running is not None

    await until(victim_busy)
    registry = api.services.registry  # type: ignore[attr-defined]
    assert await registry.transition("comfy-1", WorkerState.ready, "test: back in service")
    await fleet.servers[0].stop()  # comfy-0 dies with the task on it

    rescued = await finished(api, doomed)
    assert rescued["status"] == "succeeded"
    assert rescued["worker"] == "comfy-1"
    assert rescued["errors"][0]["worker"] == "comfy-0"
    comfy_ids.append(doomed)

    async def victim_out() -> bool:
        worker = (await api.get("/api/v1/workers/comfy-0")).json()
        return worker["state"] == "booting"

    await until(victim_out)  # the health checker took it out of ready

    # -- an invalid graph fails once, with the node error shown in the task ------------
    bad = graph(7)
    bad["1"]["inputs"]["width"] = 0
    failed = await finished(api, await submit(api, "comfyui", bad))
    assert failed["status"] == "failed"
    assert failed["attempts"] == 1
    assert len(failed["errors"]) == 1
    assert failed["error"]["code"] == "engine_rejected"
    assert "1" in failed["error"]["node_errors"]
    assert "width" in failed["error"]["message"]
    assert survivor.recorder.count("/prompt") >= 1

    # -- outputs are downloadable from gpufleet after every worker is gone -------------
    for server in fleet.servers:
        await server.stop()
    for task_id in comfy_ids:
        task = (await api.get(f"/api/v1/tasks/{task_id}")).json()
        [output] = task["result"]["outputs"]
        response = await api.get(f"/api/v1/tasks/{task_id}/outputs/{output['filename']}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG")
        assert len(response.content) == output["size"]
