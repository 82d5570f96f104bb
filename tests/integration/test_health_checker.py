"""The health checker against a real Redis and simulated workers on loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gpufleet.domain import WorkerState
from gpufleet.engines.simulated import (
    ComfyUIConfig,
    OllamaConfig,
    SimulatedComfyUI,
    SimulatedOllama,
)
from gpufleet.health_checker import HealthChecker, register_static_workers
from gpufleet.settings import Settings, load_settings
from gpufleet.store.events import EventLog
from gpufleet.store.workers import WorkerRegistry
from tests.servers import serve

pytestmark = pytest.mark.timeout(30)


def make_settings(redis_url: str, urls: dict[str, list[str]], **workers: Any) -> Settings:
    return load_settings(
        env_file=None,
        redis={"url": redis_url},
        # A probe timeout long enough for a loaded machine's first answer (CI saw 0.3 s miss
        # it); the hang tests wait it out twice.
        workers={"health_timeout_s": 1.5, "unhealthy_after": 2, **workers},
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui", "slots": 1,
             "urls": urls.get("comfy") or ["http://127.0.0.1:1"]},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 4,
             "models": ["llama3.2", "qwen3:8b"],
             "urls": urls.get("llm") or ["http://127.0.0.1:1"]},
        ],
    )


class Setup:
    def __init__(self, redis: aioredis.Redis, redis_url: str, http: httpx.AsyncClient) -> None:
        self.redis, self.redis_url, self.http = redis, redis_url, http
        self.registry = WorkerRegistry(redis)
        self.events = EventLog(redis)
        self.stack = AsyncExitStack()
        self.changes = 0

    async def serve(self, sim: Any) -> str:
        url = await self.stack.enter_async_context(serve(sim))
        if isinstance(sim, SimulatedComfyUI):
            self.stack.push_async_callback(sim.aclose)
        return url

    async def checker(self, urls: dict[str, list[str]], **workers: Any) -> HealthChecker:
        settings = make_settings(self.redis_url, urls, **workers)
        await register_static_workers(settings, self.registry, self.events)

        def changed() -> None:
            self.changes += 1

        checker = HealthChecker(settings, self.registry, self.http, events=self.events,
                                on_change=changed)
        self.stack.push_async_callback(checker.aclose)
        return checker


@pytest.fixture
async def setup(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[Setup]:
    async with httpx.AsyncClient(trust_env=False) as http:
        s = Setup(redis, redis_url, http)
        async with s.stack:
            yield s


async def test_static_workers_register_once_as_booting(setup: Setup) -> None:
    settings = make_settings(setup.redis_url, {"comfy": ["http://a:1/", "http://b:2"]})
    first = await register_static_workers(settings, setup.registry, setup.events)
    await setup.registry.transition("comfy-0", WorkerState.ready, "test")
    again = await register_static_workers(settings, setup.registry, setup.events)

    assert [w.id for w in first] == ["comfy-0", "comfy-1", "llm-0"]
    assert first[0].instance_id == "comfy-0"
    assert first[0].base_url == "http://a:1"
    assert first[0].state is WorkerState.booting
    assert first[0].slots == 1
    assert first[2].engine == "ollama"
    assert first[2].slots == 4
    assert again[0].state is WorkerState.ready  # known workers keep their state
    assert len(await setup.registry.list_workers()) == 3


async def test_booting_becomes_ready_only_when_the_engine_answers(setup: Setup) -> None:
    sim = SimulatedComfyUI(ComfyUIConfig(fail_status=502))  # the gateway, no ComfyUI yet
    url = await setup.serve(sim)
    checker = await setup.checker({"comfy": [url]})

    assert (await checker.check_once())["comfy-0"] is False
    assert (await setup.registry.get("comfy-0")).state is WorkerState.booting

    sim.config.fail_status = None
    assert (await checker.check_once())["comfy-0"] is True
    worker = await setup.registry.get("comfy-0")
    assert worker.state is WorkerState.ready
    assert worker.models_present == ("v1-5-pruned-emaonly.safetensors",)
    events = await setup.events.recent()
    assert any(e.get("worker") == "comfy-0" and e.get("state") == "ready" for e in events)
    assert setup.changes == 1


async def test_first_ready_ollama_pulls_missing_models_with_progress(setup: Setup) -> None:
    sim = SimulatedOllama(OllamaConfig(models=("llama3.2",)))
    url = await setup.serve(sim)
    checker = await setup.checker({"llm": [url]})

    assert (await checker.check_once())["llm-0"] is True

    worker = await setup.registry.get("llm-0")
    assert worker.state is WorkerState.ready
    assert "qwen3:8b" in worker.models_present
    pulls = [e for e in await setup.events.recent() if e["kind"] == "pull"]
    assert pulls
    assert all(e["model"] == "qwen3:8b" for e in pulls)
    assert any(e.get("status") == "success" for e in pulls)
    assert sim.recorder.count("/api/pull") == 1


async def test_unhealthy_after_n_failures_leaves_ready_and_recovers(setup: Setup) -> None:
    sim = SimulatedOllama(OllamaConfig(models=("llama3.2", "qwen3:8b")))
    url = await setup.serve(sim)
    checker = await setup.checker({"llm": [url]})
    await checker.check_once()
    assert (await setup.registry.get("llm-0")).state is WorkerState.ready

    sim.config.hang = True  # a probe that never answers counts as a failure after the timeout
    assert (await checker.check_once())["llm-0"] is False
    assert (await setup.registry.get("llm-0")).state is WorkerState.ready  # 1 of 2
    await checker.check_once()
    down = await setup.registry.get("llm-0")
    assert down.state is WorkerState.booting
    assert "2 failed health probes" in down.last_error

    sim.config.hang = False
    await checker.check_once()
    back = await setup.registry.get("llm-0")
    assert back.state is WorkerState.ready
    assert back.health_failures == 0
    assert sim.recorder.count("/api/pull") == 0  # not a first ready: no pulls
    states = [e.get("state") for e in reversed(await setup.events.recent())
              if e.get("worker") == "llm-0"]
    assert states[-3:] == ["ready", "booting", "ready"]


async def test_a_probe_still_running_is_not_started_again(setup: Setup) -> None:
    # A first-ready pull that outlasts check_once: the next pass must skip the worker.
    sim = SimulatedOllama(OllamaConfig(models=("llama3.2",), pull_steps=20, pull_step_s=0.1))
    url = await setup.serve(sim)
    checker = await setup.checker({"llm": [url]}, health_timeout_s=0.3)  # the pull outlasts it

    first = await checker.check_once()
    assert "llm-0" not in first
    assert checker.probing == ["llm-0"]
    second = await checker.check_once()

    assert "llm-0" not in second
    assert sim.recorder.count("/api/version") == 1
    assert (await setup.registry.get("llm-0")).state is WorkerState.booting
