"""The short way in for inference POSTs (``GpufleetApp.forward``) answers exactly as the
whole FastAPI stack does.

One app served by uvicorn on real Redis, one static Ollama pool with a simulated worker.
Each request is sent twice: through the short way, and with the short way switched off
(``app.forwarded = {}``), so the request crosses every middleware and the router. Status,
body (where it is deterministic) and header names must be the same, the security
headers must be there, and ``gpufleet_http_requests_total`` counts both under the
route's template.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gpufleet.app import SECURITY_HEADERS, create_app
from gpufleet.engines.simulated import OllamaConfig, SimulatedOllama
from gpufleet.settings import load_settings
from tests.servers import serve

pytestmark = pytest.mark.timeout(60)
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
# Headers whose values (or presence) differ between two answers for reasons of their own.
VOLATILE = {"date", "content-length", "x-gpufleet-queue-wait", "x-gpufleet-cold-start"}


@pytest.fixture
def cors() -> list[str]:
    return []


@pytest.fixture
async def fleet(
    redis_url: str, redis: aioredis.Redis, tmp_path: Path, cors: list[str]
) -> AsyncIterator[Any]:
    sim = SimulatedOllama(OllamaConfig(models=("llama3.2",)))
    async with serve(sim) as worker_url:
        settings = load_settings(
            env_file=None,
            redis={"url": redis_url},
            results={"dir": tmp_path / "results"},
            server={"max_proxy_body_bytes": 4096},
            auth={"cors_origins": cors},
            workers={"health_interval_s": 0.1},
            pools=[{"name": "llm", "provider": "static", "engine": "ollama", "slots": 2,
                    "models": ["llama3.2"], "urls": [worker_url]}],
        )
        app = create_app(settings)
        async with serve(app) as url:
            services = app.state.services
            _, key = await services.apikeys.create("k", role="user")
            for _ in range(500):  # the health checker brings the worker up
                if any(w.state == "ready" for w in await services.registry.list_workers()):
                    break
                await asyncio.sleep(0.02)
            yield app, url, key


def _count(route: str, status_class: str) -> float:
    value = REGISTRY.get_sample_value(
        "gpufleet_http_requests_total", {"route": route, "status_class": status_class}
    )
    return value or 0.0


async def _both_ways(app: Any, client: httpx.AsyncClient, path: str,
                     **kwargs: Any) -> tuple[httpx.Response, httpx.Response]:
    short = await client.post(path, **kwargs)
    forwarded, app.forwarded = app.forwarded, {}
    try:
        whole = await client.post(path, **kwargs)
    finally:
        app.forwarded = forwarded
    return short, whole


def _names(answer: httpx.Response) -> set[str]:
    return {name.lower() for name in answer.headers} - VOLATILE


CASES: list[tuple[str, str, dict[str, Any], int]] = [
    ("no key", "/api/chat", {"json": CHAT, "headers": {"Authorization": ""}}, 401),
    ("bad key", "/v1/chat/completions",
     {"json": CHAT, "headers": {"Authorization": "Bearer gpf_nope"}}, 401),
    ("bad json", "/api/chat", {"content": b"{not json"}, 400),
    ("no model", "/v1/chat/completions", {"json": {"messages": []}}, 400),
    ("unknown model", "/api/chat", {"json": {**CHAT, "model": "nope"}}, 404),
    ("too large", "/api/generate", {"json": {"model": "llama3.2", "prompt": "x" * 8000}}, 413),
    ("priority", "/api/chat", {"json": CHAT, "headers": {"X-Gpufleet-Priority": "5"}}, 200),
]


@pytest.mark.parametrize(("case", "path", "kwargs", "status"), CASES, ids=[c[0] for c in CASES])
async def test_errors_and_answers_are_the_same_either_way(
    fleet: Any, case: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    app, url, key = fleet
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        short, whole = await _both_ways(app, client, path, **kwargs)
    assert short.status_code == whole.status_code == status, (case, short.text, whole.text)
    if status != 200:
        assert short.content == whole.content
    assert _names(short) == _names(whole)
    for name, value in SECURITY_HEADERS.items():
        assert short.headers[name.decode()] == value.decode()
    if status == 401:
        assert short.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_answers_are_counted_under_the_route(fleet: Any, path: str, stream: bool) -> None:
    app, url, key = fleet
    before_ok, before_auth = _count(path, "2xx"), _count(path, "4xx")
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        short, whole = await _both_ways(app, client, path, json={**CHAT, "stream": stream})
        refused = await client.post(path, json=CHAT, headers={"Authorization": ""})
    assert short.status_code == whole.status_code == 200
    assert _names(short) == _names(whole)
    assert short.headers["content-type"] == whole.headers["content-type"]
    assert _count(path, "2xx") == before_ok + 2
    assert refused.status_code == 401
    assert _count(path, "4xx") == before_auth + 1


@pytest.mark.parametrize("cors", [["http://ui.example"]])
async def test_with_cors_on_every_request_takes_the_whole_stack(fleet: Any) -> None:
    app, url, key = fleet
    calls = 0
    whole = app.middleware_stack

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await whole(scope, receive, send)

    app.middleware_stack = counted
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        allowed = await client.post("/api/chat", json=CHAT,
                                    headers={"Origin": "http://ui.example"})
        other = await client.post("/api/chat", json=CHAT,
                                  headers={"Origin": "http://evil.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://ui.example"
    assert "access-control-allow-origin" not in other.headers
    assert calls == 2  # both went through Starlette's stack, CORS middleware included
