"""The proxy and ``[models]`` GPU requirements: a model goes only to pools whose GPUs fit, and
a model no pool's GPUs fit is a 422 in the caller's API shape (Ollama's, OpenAI's), never a
request that waits for a GPU that does not exist."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gpufleet.app import create_app
from gpufleet.engines.simulated import OllamaConfig, SimulatedOllama
from gpufleet.settings import load_settings
from tests.servers import serve

pytestmark = pytest.mark.timeout(60)
MODELS = ("llama3.2:latest", "llama3.1:70b", "huge:latest")


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.fixture
async def fleet(redis_url: str, redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Any]:
    small = SimulatedOllama(OllamaConfig(models=MODELS))
    big = SimulatedOllama(OllamaConfig(models=MODELS))
    async with serve(small) as small_url, serve(big) as big_url:
        settings = load_settings(
            env_file=None,
            redis={"url": redis_url},
            results={"dir": tmp_path / "results"},
            workers={"health_interval_s": 0.1},
            pools=[
                {"name": "small", "provider": "static", "engine": "ollama", "urls": [small_url],
                 "gpu": "RTX 4090", "gpu_memory_gb": 24, "price_per_hour": 0.3},
                {"name": "big", "provider": "static", "engine": "ollama", "urls": [big_url],
                 "gpu": "A100", "gpu_memory_gb": 80, "price_per_hour": 1.6},
            ],
            models={"llama3.1:70b": {"gpu_memory_gb": 48}, "huge": {"gpu_memory_gb": 500}},
        )
        app = create_app(settings)
        async with serve(app) as url:
            components = app.state.services
            _, key = await components.apikeys.create("k", role="user")
            for _ in range(500):  # the health checker brings both workers up
                workers = await components.registry.list_workers()
                if sum(w.state == "ready" for w in workers) == 2:
                    break
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient(base_url=url, timeout=30,
                                         headers={"Authorization": f"Bearer {key}"}) as client:
                yield client, small, big


async def test_a_model_no_pool_fits_is_422(fleet: Any) -> None:
    client, small, big = fleet
    ollama = await client.post("/api/chat", json=chat("huge"))
    assert ollama.status_code == 422
    assert ollama.json() == {"error": "model 'huge:latest': no pool has gpu_memory_gb >= 500: "
                                      "pools small (RTX 4090, 24 GB), big (A100, 80 GB)"}
    openai = await client.post("/v1/chat/completions", json=chat("huge"))
    assert openai.status_code == 422
    assert openai.json()["error"]["type"] == "invalid_request_error"
    assert "gpu_memory_gb >= 500" in openai.json()["error"]["message"]
    assert small.recorder.count("/api/chat") == big.recorder.count("/api/chat") == 0


async def test_a_model_goes_only_to_the_pools_that_fit(fleet: Any) -> None:
    client, small, big = fleet
    for _ in range(3):
        answer = await client.post("/api/chat", json=chat("llama3.1:70b"))
        assert answer.status_code == 200, answer.text
    assert big.recorder.count("/api/chat") == 3
    assert small.recorder.count("/api/chat") == 0
    # A model without a requirement is served as before (either pool may take it).
    assert (await client.post("/api/chat", json=chat("llama3.2"))).status_code == 200
