"""The whole loop in ``gpufleet demo``: an empty fleet gets a burst of work, scales up on
the simulated clouds, runs it, and scales back down once idle.

Everything is real but the clouds and the GPU workers: the reconciler's provider clients
talk HTTP to the simulated Novita and SURF, the dispatcher drives simulated ComfyUI
workers, the proxy forwards the real ``ollama`` client to a simulated Ollama on a resumed
workspace. The test waits for states and counts them; it never asserts a duration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from gpufleet.demo import NOVITA_POOL, OLLAMA_MODEL, SURF_POOL, Demo, DemoOptions, DemoTimings
from gpufleet.examples import example_path
from gpufleet.loopback import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
TASKS = 20


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    timings = dataclasses.replace(DemoTimings.fast(), idle_timeout_s=2.0)
    options = DemoOptions(port=free_port(), data_dir=tmp_path, timings=timings)
    async with Demo(options) as running:
        yield running


async def until(check: Callable[[], Awaitable[bool]], what: str, limit_s: float = 60) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.1)


async def test_burst_scales_up_runs_and_scales_down(demo: Demo) -> None:
    graph = json.loads(example_path("txt2img.json").read_text())
    headers = {"Authorization": f"Bearer {demo.api_key}"}
    async with httpx.AsyncClient(base_url=demo.url, headers=headers, timeout=30) as client:
        # Empty: nothing runs. The reconciler may already have found the SURF workspaces,
        # which are paused (parked, costing nothing) until a chat resumes one.
        workers = (await client.get("/api/v1/workers")).json()
        assert [(w["pool"], w["state"]) for w in workers if w["state"] != "paused"] == []
        assert all(w["pool"] == SURF_POOL for w in workers), workers
        assert demo.novita.instances == {}

        ids = []
        for n in range(TASKS):
            answer = await client.post(
                "/api/v1/tasks", json={"kind": "comfyui", "payload": graph,
                                       "workflow_id": f"demo-{n}"})
            assert answer.status_code in (201, 202), answer.text
            ids.append(answer.json()["id"])

        async def all_finished() -> bool:
            listed = await client.get("/api/v1/tasks", params={"limit": 100})
            items = listed.json()["tasks"]
            done = [t for t in items if t["id"] in ids
                    and t["status"] in ("succeeded", "failed", "cancelled")]
            return len(done) == TASKS

        await until(all_finished, f"all {TASKS} tasks finish")
        tasks = [(await client.get(f"/api/v1/tasks/{i}")).json() for i in ids]
        assert [t["status"] for t in tasks] == ["succeeded"] * TASKS, [
            (t["status"], t.get("error")) for t in tasks]
        assert all(t["result"]["outputs"] for t in tasks)

        # Scale-up happened on the cloud: at most max_workers instances, each ran.
        created = list(demo.novita.instances.values())
        assert 1 <= len(created) <= 3
        assert all("running" in inst.transitions for inst in created)
        # Each instance got its own worker-gate secret, which its simulated ComfyUI required.
        secrets = [next(e["value"] for e in inst.envs if e["key"] == "GPUFLEET_WORKER_TOKEN")
                   for inst in created]
        assert len(set(secrets)) == len(created)
        events = (await client.get("/api/v1/events", params={"limit": 500})).json()
        ready = {e["worker"] for e in events if e.get("kind") == "worker"
                 and e.get("pool") == NOVITA_POOL and e.get("state") == "ready"}
        assert ready == {inst.id for inst in created}, (ready, created)

        # Idle past the timeout: nothing left running (stopped or deleted) at the cloud.
        async def parked() -> bool:
            await client.get("/api/v1/providers/novita/instances")  # lets the sim advance
            return all(i.status in ("exited", "removed")
                       for i in demo.novita.instances.values())

        await until(parked, "idle Novita instances are stopped or deleted")
        events = (await client.get("/api/v1/events", params={"limit": 500})).json()
        scale = [(e.get("action"), e.get("outcome")) for e in events
                 if e.get("kind") == "scale" and e.get("pool") == NOVITA_POOL]
        assert scale.count(("create", "ok")) == len(created), scale
        parked_or_deleted = [a for a, outcome in scale if a in ("stop", "delete")
                             and outcome == "ok"]
        assert len(parked_or_deleted) >= len(created), scale


async def test_proxied_chat_resumes_a_paused_workspace(demo: Demo) -> None:
    assert all(ws.status == "paused" for ws in demo.surf.workspaces.values())
    auth = {"Authorization": f"Bearer {demo.api_key}"}
    async with ollama.AsyncClient(host=demo.url, headers=auth) as client:
        reply: Any = await asyncio.wait_for(
            client.chat(model=OLLAMA_MODEL, messages=[{"role": "user", "content": "hi"}]),
            timeout=60)
    assert "simulated Ollama" in reply.message.content
    resumed = [ws for ws in demo.surf.workspaces.values() if "resuming" in ws.transitions]
    assert len(resumed) == 1
    # The workspaces' Ollama is gated (the pool's token) and gpufleet always sent it.
    engines = list(demo.surf_workers.engines.values())
    assert engines
    assert all(engine.config.token for engine in engines)
    assert sum(engine.recorder.refused for engine in engines) == 0
    assert sum(engine.recorder.total for engine in engines) >= 1
    async with httpx.AsyncClient(base_url=demo.url, timeout=30, headers={
            "X-API-Key": demo.api_key}) as http:
        workers = (await http.get("/api/v1/workers", params={"pool": SURF_POOL})).json()
        assert [w["state"] for w in workers if w["state"] == "ready"]
