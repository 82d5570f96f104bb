"""``engines.WorkerEngines``: the pool / engine / client lookup the dispatcher and the health
checker share (one definition, so the two never disagree about a worker's engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gpufleet.domain import Worker, WorkerState
from gpufleet.engines import EngineClient, WorkerEngines
from gpufleet.engines.comfyui import ComfyUIEngine
from gpufleet.engines.ollama import OllamaEngine
from gpufleet.settings import load_settings

SETTINGS = load_settings(
    env_file=None,
    pools=[
        {"name": "comfy", "provider": "static", "engine": "comfyui", "urls": ["http://h:8188"]},
        {"name": "llm", "provider": "static", "engine": "ollama", "urls": ["http://h:11434"]},
    ],
)


def worker(pool: str, engine: str = "") -> Worker:
    return Worker(id="w1", pool=pool, provider="static", state=WorkerState.ready, slots=1,
                  engine=engine)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def test_pool_and_kind_come_from_the_record_else_the_pool(http: httpx.AsyncClient) -> None:
    lookup = WorkerEngines(SETTINGS, http, {})
    pool = lookup.pool(worker("llm"))
    assert pool is not None
    assert pool.name == "llm"
    assert lookup.kind(worker("llm")) == "ollama"
    assert lookup.kind(worker("llm", engine="comfyui")) == "comfyui"  # the record wins
    assert lookup.pool(worker("gone")) is None  # a pool removed from the config
    assert lookup.kind(worker("gone")) is None
    assert lookup.client(worker("gone")) is None


async def test_one_client_per_kind_kept_in_the_owners_map(http: httpx.AsyncClient) -> None:
    clients: dict[str, EngineClient] = {}
    lookup = WorkerEngines(SETTINGS, http, clients)
    first = lookup.client(worker("comfy"))
    assert isinstance(first, ComfyUIEngine)
    assert lookup.client(worker("comfy")) is first
    assert isinstance(lookup.client(worker("llm")), OllamaEngine)
    assert sorted(clients) == ["comfyui", "ollama"]


async def test_a_client_given_up_front_is_used_as_it_is(http: httpx.AsyncClient) -> None:
    given = OllamaEngine(http)
    lookup = WorkerEngines(SETTINGS, http, {"ollama": given})
    assert lookup.client(worker("llm")) is given
