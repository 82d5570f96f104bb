"""Issue 19 point 11: a worker's 5xx reaches the client promptly, after the retries.

One gpufleet app (``create_app``, real Redis) with one static Ollama pool whose only
worker answers every inference call with a 5xx. ``max_wait_s`` is an hour: before the
fix, the retry excluded the failed worker and then waited that hour for another one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from gpufleet.app import create_app
from gpufleet.domain import WorkerState
from gpufleet.engines.simulated import OllamaConfig, SimulatedOllama
from gpufleet.settings import load_settings
from tests.servers import serve

pytestmark = pytest.mark.timeout(60)
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.fixture
async def broken(redis_url: str, redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Any]:
    sim = SimulatedOllama(OllamaConfig(models=("llama3.2",), fail_infer_status=500))
    async with serve(sim) as worker_url:
        settings = load_settings(
            env_file=None,
            redis={"url": redis_url},
            results={"dir": tmp_path / "results"},
            workers={"health_interval_s": 0.1},
            proxy={"retries": 2, "max_wait_s": 3600},
            pools=[{"name": "llm", "provider": "static", "engine": "ollama", "slots": 2,
                    "models": ["llama3.2"], "urls": [worker_url]}],
        )
        app = create_app(settings)
        async with serve(app) as url:
            components = app.state.services
            _, key = await components.apikeys.create("k", role="user")
            for _ in range(500):  # the health checker brings the worker up
                if any(w.state == "ready" for w in await components.registry.list_workers()):
                    break
                await asyncio.sleep(0.02)
            sim.recorder.requests.clear()
            yield sim, url, key, components


async def test_a_worker_5xx_answers_the_client_after_the_retries(broken: Any) -> None:
    sim, url, key, components = broken
    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        # The guard only keeps a regression from hanging the suite for an hour.
        answer = await asyncio.wait_for(client.post("/api/chat", json=CHAT), timeout=30)
    assert answer.status_code == 500
    assert sim.recorder.count("/api/chat") == 3  # the first try and [proxy] retries = 2
    waiting = await components.redis.zcard("gpufleet:proxy:waiting:llm")
    assert waiting == 0  # it never queued for another worker


async def test_the_openai_client_gets_the_error_too(broken: Any) -> None:
    sim, url, key, _ = broken
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        await asyncio.wait_for(
            client.chat.completions.create(model="llama3.2", messages=CHAT["messages"]),
            timeout=30,
        )
    assert sim.recorder.count("/v1/chat/completions") == 3
    await client.close()


async def test_a_dead_workers_address_is_not_told_to_user_keys(
    redis_url: str, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Issue 19 point 6: the 502 for an unreachable worker named its host and port."""
    from gpufleet.loopback import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = load_settings(
        env_file=None, redis={"url": redis_url}, results={"dir": tmp_path / "results"},
        workers={"health_interval_s": 3600}, proxy={"retries": 1},
        pools=[{"name": "llm", "provider": "static", "engine": "ollama",
                "models": ["llama3.2"], "urls": [dead]}],
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        components = app.state.services
        assert await components.registry.transition("llm-0", WorkerState.ready, "test")
        store = components.apikeys
        _, user = await store.create("u", role="user")
        _, admin = await store.create("a", role="admin")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gpufleet") as client:
            as_user = await client.post("/api/chat", json=CHAT,
                                        headers={"Authorization": f"Bearer {user}"})
            as_admin = await client.post("/api/chat", json=CHAT,
                                         headers={"Authorization": f"Bearer {admin}"})
    assert as_user.status_code == 502
    assert "worker failed" in as_user.json()["error"]
    assert dead.removeprefix("http://") not in as_user.text
    assert as_admin.status_code == 502
    assert dead.removeprefix("http://") in as_admin.text
