"""Issue 10, fault test 4: workers die, hang or answer garbage; nothing false succeeds.

The whole app (``create_app``: dispatcher, health checker, proxy on a real Redis) runs a
static fleet of simulated ComfyUI and Ollama workers, each on its own loopback server.

- Queued tasks: each faulty worker gets one task, then mid-task it dies (server stopped:
  connection dropped), hangs (no more bytes on any route), answers garbage (not JSON) or,
  for Ollama, answers JSON that is not an Ollama answer. Every task then succeeds on the
  one healthy worker, its errors name the faulty worker, the faulty workers leave ``ready``,
  and every succeeded task's result is one the healthy worker really produced (its
  recorder, its ComfyUI history).
- The proxy: a streaming chat whose worker drops mid-stream ends with an error line in
  the caller's framing (NDJSON or SSE, on a line of its own); a worker that fails before
  the first byte is retried on another worker.

Intervals are short (health 0.2 s, lease TTL 2 s); nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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
from tests.chaos.inproc import graph

pytestmark = [
    pytest.mark.timeout(90),
    # Tearing down nine loopback servers while connections were cut leaves one socket
    # to the garbage collector now and then (not pinned down yet; see the report).
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

N_COMFY, N_OLLAMA = 4, 5  # the last of each is the healthy one


@dataclass
class Fleet:
    api: httpx.AsyncClient
    comfy: list[SimulatedComfyUI]
    ollama: list[SimulatedOllama]
    servers: list[LoopbackServer]

    @property
    def registry(self) -> Any:
        return self.api.services.registry  # type: ignore[attr-defined]

    def server(self, sim: Any) -> LoopbackServer:
        return self.servers[[*self.comfy, *self.ollama].index(sim)]


@pytest.fixture
async def fleet(redis: aioredis.Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    comfy = [SimulatedComfyUI(ComfyUIConfig()) for _ in range(N_COMFY)]
    ollama = [SimulatedOllama(OllamaConfig(models=("llama3.2",), reply=f"answer from o{i}"))
              for i in range(N_OLLAMA)]
    servers = [LoopbackServer(s, name=f"sim-{i}") for i, s in enumerate([*comfy, *ollama])]
    urls = [await s.start() for s in servers]
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        results={"dir": tmp_path / "results"},
        queue={"lease_ttl_s": 2.0, "heartbeat_interval_s": 0.2, "retry_backoff_s": 0.2,
               "retry_backoff_max_s": 1.0, "default_max_attempts": 10},
        workers={"health_interval_s": 0.2, "health_timeout_s": 0.5, "unhealthy_after": 2,
                 "dispatch_interval_s": 0.2, "pull_models_on_ready": False},
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui", "slots": 1,
             "urls": urls[:N_COMFY]},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 1,
             "models": ["llama3.2"], "urls": urls[N_COMFY:]},
        ],
    )
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            _, key = await app.state.services.apikeys.create("chaos", role="admin")
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gpufleet",
                headers={"Authorization": f"Bearer {key}"}, timeout=30,
            ) as client:
                client.services = app.state.services  # type: ignore[attr-defined]
                f = Fleet(client, comfy, ollama, servers)
                await until(lambda: all_ready(f))
                yield f
    finally:
        for server in servers:
            await server.stop()
        for sim in comfy:
            await sim.aclose()


async def until(check: Callable[[], Awaitable[bool]], tries: int = 1500) -> None:
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never became true")


async def states(fleet: Fleet) -> dict[str, str]:
    return {w.id: w.state.value for w in await fleet.registry.list_workers()}


async def all_ready(fleet: Fleet) -> bool:
    found = await states(fleet)
    return len(found) == N_COMFY + N_OLLAMA and set(found.values()) == {"ready"}


async def submit(api: httpx.AsyncClient, kind: str, payload: dict[str, Any], **extra: Any) -> str:
    response = await api.post("/api/v1/tasks", json={"kind": kind, "payload": payload, **extra})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def finished(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    for _ in range(60):
        response = await api.get(f"/api/v1/tasks/{task_id}/wait", params={"timeout_s": 1})
        if response.json()["status"] in ("succeeded", "failed", "cancelled"):
            return (await api.get(f"/api/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]
    raise AssertionError(f"task {task_id} never finished")


def chat(n: int) -> dict[str, Any]:
    return {"api": "chat", "body": {"model": "llama3.2",
                                    "messages": [{"role": "user", "content": f"question {n}"}]}}


async def test_faulty_workers_tasks_are_retried_and_nothing_false_succeeds(fleet: Fleet) -> None:
    api = fleet.api
    healthy_comfy, healthy_ollama = fleet.comfy[-1], fleet.ollama[-1]
    for worker_id in (f"comfy-{N_COMFY - 1}", f"llm-{N_OLLAMA - 1}"):  # first to the faulty
        assert (await api.post(f"/api/v1/workers/{worker_id}/drain")).status_code == 200
    for sim in fleet.comfy[:-1]:
        sim.config.hang_render = True  # each holds its task until its fault is switched on
    for sim in fleet.ollama[:-1]:
        sim.config.first_token_s = 3.0
    fleet.ollama[1].config.first_token_s = 3600.0  # o1 never answers its task

    comfy_ids = [await submit(api, "comfyui", graph(n)) for n in range(N_COMFY - 1)]
    ollama_ids = [await submit(api, "ollama", chat(n)) for n in range(N_OLLAMA - 1)]

    async def each_faulty_worker_has_its_task() -> bool:
        return (all(sim.running is not None for sim in fleet.comfy[:-1])
                and all(sim.recorder.current == 1 for sim in fleet.ollama[:-1]))

    await until(each_faulty_worker_has_its_task)
    c0, c1, c2 = fleet.comfy[:-1]
    o0, o1, o2, o3 = fleet.ollama[:-1]
    faults = {  # worker id -> what happens to it mid-task
        "comfy-0": "dies", "comfy-1": "hangs", "comfy-2": "garbage",
        "llm-0": "dies", "llm-1": "hangs", "llm-2": "garbage", "llm-3": "wrong JSON",
    }
    c1.config.hang = True
    c2.config.garbage = True
    o1.config.hang = True
    o2.config.garbage = True
    o3.config.wrong_json = True
    await asyncio.gather(fleet.server(c0).stop(), fleet.server(o0).stop())
    for worker_id in (f"comfy-{N_COMFY - 1}", f"llm-{N_OLLAMA - 1}"):
        assert await fleet.registry.transition(worker_id, WorkerState.ready, "test: back")

    results = await asyncio.gather(*(finished(api, i) for i in comfy_ids + ollama_ids))
    assert [r["status"] for r in results] == ["succeeded"] * len(results), results
    for task in results[:len(comfy_ids)]:
        assert task["worker"] == f"comfy-{N_COMFY - 1}"
        entry = healthy_comfy.history[task["result"]["prompt_id"]]
        assert entry["status"]["completed"] is True
        [output] = task["result"]["outputs"]
        assert output["size"] > 0
    asked = [b["messages"][0]["content"] for b in healthy_ollama.recorder.bodies]
    for task in results[len(comfy_ids):]:
        assert task["worker"] == f"llm-{N_OLLAMA - 1}"
        assert task["result"]["message"]["content"] == f"answer from o{N_OLLAMA - 1}"
        assert task["payload"]["body"]["messages"][0]["content"] in asked
    for task in results:  # each first ran on a faulty worker, and that attempt failed
        failed_on = {e.get("worker") for e in task["errors"]}
        assert failed_on & set(faults), task["errors"]

    async def faulty_out_of_ready() -> bool:
        found = await states(fleet)
        return all(found[w] != "ready" for w in faults)

    await until(faulty_out_of_ready)  # the health checker took every faulty worker out


async def test_wrong_json_from_ollama_is_not_a_success(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 200 whose JSON is not an Ollama answer fails the attempt instead of acking it.

    The health probes are paused: they get the wrong JSON too, and one failed probe takes a
    worker off new work, so a probe landing between the submit and the dispatch would leave
    the task waiting for a worker (the dispatcher's part is what this test is about)."""
    api = fleet.api

    async def no_probe(_worker: Any) -> bool:
        return True

    monkeypatch.setattr(fleet.api.services.health_checker, "_probe", no_probe)  # type: ignore[attr-defined]
    await asyncio.sleep(0.5)  # a probe already running ends (health_timeout_s)
    assert all(w.takes_new_work for w in await fleet.registry.list_workers())
    for sim in fleet.ollama:
        sim.config.wrong_json = True
    task_id = await submit(api, "ollama", chat(1), max_attempts=1)
    task = await finished(api, task_id)
    assert task["status"] == "failed", task
    assert task["result"] is None
    assert "answered" in task["error"]["message"]


# -- the proxy ------------------------------------------------------------------------------


async def only_ready(fleet: Fleet, *keep: int) -> None:
    """Drain every Ollama worker but ``keep`` (so the proxy's choice is known)."""
    for i in range(N_OLLAMA):
        if i not in keep:
            assert (await fleet.api.post(f"/api/v1/workers/llm-{i}/drain")).status_code == 200


@pytest.mark.parametrize(("path", "sse"), [("/api/chat", False),
                                           ("/v1/chat/completions", True)])
async def test_stream_dropped_mid_answer_ends_with_an_error_line(
    fleet: Fleet, path: str, sse: bool
) -> None:
    await only_ready(fleet, 0)
    fleet.ollama[0].config.drop_after_tokens = 2
    body = {"model": "llama3.2", "stream": True,
            "messages": [{"role": "user", "content": "tell me"}]}
    response = await fleet.api.post(path, json=body)
    assert response.status_code == 200
    assert response.headers["x-gpufleet-worker"] == "llm-0"
    if sse:
        events = [e for e in response.text.split("\n\n") if e.strip()]
        assert events[0].startswith("data: ")
        last = json.loads(events[-1].removeprefix("data: "))
        assert set(last["error"]) >= {"message", "type"}
        assert "[DONE]" not in response.text
    else:
        lines = response.text.splitlines()
        assert json.loads(lines[0])["message"]["content"]  # tokens went out first
        last = json.loads(lines[-1])
        assert isinstance(last["error"], str)
        assert "worker" in last["error"]
        assert not any(json.loads(x).get("done") for x in lines[:-1] if x.startswith('{"model'))


@pytest.mark.parametrize("fault", ["status 500", "connection refused"])
async def test_worker_failing_before_the_first_byte_is_retried_on_another(
    fleet: Fleet, fault: str
) -> None:
    await only_ready(fleet, 0, 1)
    bad, good = fleet.ollama[0], fleet.ollama[1]
    if fault == "status 500":
        bad.config.fail_infer_status = 500
    else:
        await fleet.server(bad).stop()
    body = {"model": "llama3.2", "stream": True,
            "messages": [{"role": "user", "content": "retry me"}]}
    response = await fleet.api.post("/api/chat", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-gpufleet-worker"] == "llm-1"
    lines = [json.loads(x) for x in response.text.splitlines()]
    assert "".join(x["message"]["content"] for x in lines) == "answer from o1"
    assert lines[-1]["done"] is True
    assert good.recorder.count("/api/chat") == 1
    if fault == "status 500":
        assert bad.recorder.count("/api/chat") == 1  # tried first (llm-0 sorts first)
