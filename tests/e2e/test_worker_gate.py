"""Issue 19 point 6: workers are not open to the internet.

``gpufleet worker-gate`` (``create_gate_app``) in front of a simulated engine, on real
sockets: calls without the worker's secret are refused before the engine sees them,
calls with it pass (streams and ComfyUI's websocket included), and gpufleet's own
engine clients, health checker, dispatcher and proxy send the secret on every call.
Novita instances get a secret of their own in their ``envs``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
import redis.asyncio as aioredis
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gpufleet.app import create_app
from gpufleet.domain import Engine, WorkerState
from gpufleet.engines import build_engine
from gpufleet.engines.simulated import (
    ComfyUIConfig,
    OllamaConfig,
    SimulatedComfyUI,
    SimulatedOllama,
)
from gpufleet.loopback import LoopbackServer
from gpufleet.providers.novita import NovitaProvider
from gpufleet.providers.simulated import SimNovitaConfig, create_novita_app
from gpufleet.results import DirectoryResultStore
from gpufleet.settings import load_settings
from gpufleet.worker_auth import TOKEN_ENV, TOKEN_HEADER, WorkerAuth, WorkerTokens
from gpufleet.worker_gate import create_gate_app, parse_listen, token_from_env
from tests.servers import serve

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-worker-token-for-tests"
GRAPH = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "g"}},
}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


async def until(check: Callable[[], Any], tries: int = 1000) -> None:
    for _ in range(tries):
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never became true")


class Echo:
    """An upstream that answers with the headers it received."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        seen = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = json.dumps(seen).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


async def test_gate_refuses_calls_without_the_secret_and_relays_calls_with_it() -> None:
    sim = SimulatedOllama(OllamaConfig(models=("llama3.2",)))
    async with (
        serve(sim) as engine_url,
        serve(create_gate_app(engine_url, SECRET)) as gate,
        httpx.AsyncClient(base_url=gate) as http,
    ):
        for headers in ({}, {TOKEN_HEADER: "wrong"}, {"Authorization": "Bearer wrong"}):
            refused = await http.post("/api/pull", json={"model": "evil"}, headers=headers)
            assert refused.status_code == 401
            assert "token" in refused.json()["error"]
            assert (await http.get("/api/tags", headers=headers)).status_code == 401
        assert sim.recorder.requests == []  # the engine never saw a refused call

        ok = await http.get("/api/version", headers={TOKEN_HEADER: SECRET})
        assert ok.status_code == 200
        assert ok.json()["version"] == sim.config.version
        bearer = await http.get("/api/tags", headers={"Authorization": f"Bearer {SECRET}"})
        assert bearer.status_code == 200
        async with http.stream("POST", "/api/chat", json=CHAT,
                               headers={TOKEN_HEADER: SECRET}) as stream:
            lines = [json.loads(line) async for line in stream.aiter_lines() if line]
        assert stream.status_code == 200
        assert len(lines) > 1
        assert lines[-1]["done"] is True
    async with (
        serve(Echo()) as echo_url,
        serve(create_gate_app(echo_url, SECRET)) as gate,
        httpx.AsyncClient(base_url=gate) as http,
    ):
        seen = (await http.get("/x?y=1", headers={TOKEN_HEADER: SECRET,
                                                 "X-Other": "kept"})).json()
        assert seen["x-other"] == "kept"
        assert TOKEN_HEADER.lower() not in seen  # the engine never sees the secret
        seen = (await http.get("/", headers={"Authorization": f"Bearer {SECRET}"})).json()
        assert "authorization" not in seen


async def test_comfyui_engine_runs_through_the_gate_websocket_included(tmp_path: Path) -> None:
    sim = SimulatedComfyUI(ComfyUIConfig(default_steps=2))
    tokens = WorkerTokens()
    try:
        async with (
            serve(sim) as engine_url,
            serve(create_gate_app(engine_url, SECRET)) as gate,
            httpx.AsyncClient(auth=WorkerAuth(tokens)) as http,
        ):
            engine = build_engine(Engine.comfyui, http, request_timeout_s=5.0,
                                  poll_interval_s=0.01, stall_timeout_s=10.0)
            unknown = await engine.health(gate)  # no secret known for this URL yet
            assert unknown.ok is False
            assert unknown.status_code == 401
            ws_url = gate.replace("http://", "ws://") + "/ws?clientId=x"
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url, proxy=None)
            assert refused.value.response.status_code == 403

            tokens.set(gate, SECRET)
            assert (await engine.health(gate)).ok is True
            events: list[dict[str, Any]] = []

            async def on_event(event: dict[str, Any]) -> None:
                events.append(event)

            result = await engine.run(gate, GRAPH, task_id="t1", on_event=on_event,
                                      results=DirectoryResultStore(tmp_path))
            assert result["outputs"][0]["size"] > 0
            assert not [e for e in events if e["type"] == "polling"]  # the websocket worked
            assert any(e["type"] == "progress" for e in events)
    finally:
        await sim.aclose()


@pytest.fixture
async def gated_fleet(redis: aioredis.Redis, redis_url: str,
                      tmp_path: Path) -> AsyncIterator[Any]:
    comfy = SimulatedComfyUI(ComfyUIConfig(token=SECRET))
    llm = SimulatedOllama(OllamaConfig(models=("llama3.2",), token=SECRET))
    servers = [LoopbackServer(comfy, name="gated-comfy"), LoopbackServer(llm, name="gated-llm")]
    urls = [await s.start() for s in servers]
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        results={"dir": tmp_path / "results"},
        workers={"health_interval_s": 0.2, "dispatch_interval_s": 0.2},
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui", "urls": urls[:1],
             "token": SECRET},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 2,
             "models": ["llama3.2"], "urls": urls[1:], "token": SECRET},
        ],
    )
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            _, key = await app.state.services.apikeys.create("e2e", role="admin")
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gpufleet",
                                         headers={"Authorization": f"Bearer {key}"},
                                         timeout=30) as client:
                client.comfy, client.llm, client.urls = comfy, llm, urls  # type: ignore[attr-defined]
                client.key, client.transport = key, transport  # type: ignore[attr-defined]
                yield client
    finally:
        for server in servers:
            await server.stop()
        await comfy.aclose()


async def test_gpufleet_sends_the_secret_on_every_call_to_a_gated_fleet(
    gated_fleet: Any, assert_logs: Callable[..., None]
) -> None:
    api = gated_fleet

    async def ready() -> bool:
        workers = (await api.get("/api/v1/workers")).json()
        return len(workers) == 2 and all(w["state"] == "ready" for w in workers)

    await until(ready)  # health probes got through the gates
    ids = []
    for kind, payload in (("comfyui", GRAPH), ("ollama", {"api": "chat", "body": CHAT})):
        answer = await api.post("/api/v1/tasks", json={"kind": kind, "payload": payload})
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["id"])
    for task_id in ids:
        done = (await api.get(f"/api/v1/tasks/{task_id}/wait",
                              params={"timeout_s": 20})).json()
        assert done["status"] == "succeeded", done
    async with ollama.AsyncClient(host="http://gpufleet", transport=api.transport,
                                  headers={"Authorization": f"Bearer {api.key}"}) as client:
        reply = await client.chat(model="llama3.2", messages=CHAT["messages"])
        shown = await client.show("llama3.2")
    assert reply.message.content.startswith("Hello")
    assert shown.modelfile is not None
    assert api.comfy.recorder.refused == 0  # nothing gpufleet sent lacked the secret
    assert api.llm.recorder.refused == 0
    assert api.llm.recorder.total >= 2
    # Anyone else who finds the URL is refused.
    async with httpx.AsyncClient() as stranger:
        assert (await stranger.post(f"{api.urls[1]}/api/chat", json=CHAT)).status_code == 401
        assert (await stranger.get(f"{api.urls[0]}/history")).status_code == 401
    # The secret is in no API answer and no log line.
    for path in ("/api/v1/workers", "/api/v1/pools", "/api/ps"):
        assert SECRET not in (await api.get(path)).text
    assert_logs(prohibited=[SECRET])


async def test_novita_instances_get_their_own_secret_in_envs() -> None:
    settings = load_settings(
        env_file=None,
        providers={"novita": {"base_url": "http://novita", "api_key": "sim-novita-key"}},
        pools=[{"name": "gpu", "provider": "novita", "engine": "comfyui",
                "product_id": "4090.sim", "image": "img", "envs": {"A": "b"}}],
    )
    sim_app = create_novita_app(SimNovitaConfig())
    sim = sim_app.state.sim
    provider = NovitaProvider(settings.providers.novita, pools=settings.pools,
                              transport=httpx.ASGITransport(app=sim_app))
    try:
        pool = settings.pools[0]
        first = await provider.create(pool, "gpu-a")
        second = await provider.create(pool, "gpu-b")
        assert first.worker_token
        assert second.worker_token
        assert first.worker_token != second.worker_token
        assert first.worker_token not in repr(first)
        sent = [r.body for r in sim.log if r.path.endswith("/gpu/instance/create")]
        envs = {e["key"]: e["value"] for e in sent[0]["envs"]}
        assert envs == {"A": "b", TOKEN_ENV: first.worker_token}
        listed = {i.id: i.worker_token for i in await provider.list()}
        assert listed == {first.id: first.worker_token, second.id: second.worker_token}
    finally:
        await provider.aclose()


def test_gate_settings_helpers() -> None:
    assert parse_listen("0.0.0.0:8188") == ("0.0.0.0", 8188)
    assert parse_listen(":11434") == ("0.0.0.0", 11434)
    assert parse_listen("[::]:8188") == ("::", 8188)
    with pytest.raises(ValueError, match="host:port"):
        parse_listen("8188x")
    with pytest.raises(ValueError, match="not set"):
        token_from_env(TOKEN_ENV, env={})
    assert token_from_env(TOKEN_ENV, env={TOKEN_ENV: " t "}) == "t"


async def test_registry_keeps_each_workers_secret_for_its_url(redis: aioredis.Redis) -> None:
    from gpufleet.store.workers import WorkerRegistry

    registry = WorkerRegistry(redis, prefix="gate", pool_tokens={"static": "pool-secret"})
    await registry.register(pool="gpu", provider="novita", slots=1, worker_id="i1",
                            state=WorkerState.ready, base_url="http://h:1/w/i1",
                            worker_token="own-secret")
    await registry.register(pool="static", provider="static", slots=1, worker_id="s1",
                            state=WorkerState.ready, base_url="http://h:1/w/s1")
    await registry.register(pool="open", provider="static", slots=1, worker_id="o1",
                            state=WorkerState.ready, base_url="http://h:2")
    workers = {w.id: w for w in await registry.list_workers()}
    assert workers["i1"].token == "own-secret"
    assert workers["s1"].token == "pool-secret"
    assert workers["o1"].token == ""
    assert "own-secret" not in repr(workers["i1"])
    assert registry.tokens.token_for("http://h:1/w/i1/prompt") == "own-secret"
    assert registry.tokens.token_for("http://h:1/w/s1/system_stats") == "pool-secret"
    assert registry.tokens.token_for("http://h:1/w/i10/prompt") is None  # not a prefix match
    assert registry.tokens.token_for("http://h:2/api/tags") is None
    assert registry.tokens.token_for("http://elsewhere/w/i1") is None
