"""Proxied requests feed the pool history: one arrival per request (a retry on another
worker is not a second one, a request that waited counts for the pool it waited for) and
one service sample per answer, without a Redis call of their own (buffered until a flush).

Uses the proxy harness of ``test_proxy_waiting`` (uvicorn, fake Ollama upstreams).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from gpufleet.api.errors import install_error_handlers
from gpufleet.proxy import ProxyService, ProxySettings, build_proxy_router
from gpufleet.settings import load_settings
from gpufleet.store.history import HistoryStore
from gpufleet.store.workers import WorkerRegistry
from tests.e2e.test_proxy_waiting import (
    POOLS,
    FakeOllama,
    Fleet,
    _eq,
    bearer_auth,
    chat,
    eventually,
    serve,
)

pytestmark = pytest.mark.timeout(60)


async def served(history: HistoryStore, pool: str, n: int) -> bool:
    """Flush, then: has ``pool`` ``n`` service samples? (A client may read the whole answer
    a moment before the proxy's handler notes it: polled, bounded.)"""
    await history.flush()
    return (await history.summary([pool]))[pool].service_s.total == n


@pytest.fixture
async def fleet(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[Fleet]:
    settings = load_settings(env_file=None, redis={"url": redis_url}, pools=POOLS)
    registry = WorkerRegistry(redis, prefix="gpufleet")
    history = HistoryStore(redis, prefix="gpufleet", pools=settings.pools)
    service = ProxyService(
        settings, registry, redis, proxy_settings=ProxySettings(), history=history
    )
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_proxy_router(bearer_auth))
    app.state.proxy = service  # these requests carry no API key: no Services needed
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(service.aclose)
        url = await stack.enter_async_context(serve(app))
        yield Fleet(url, registry, redis, service, stack)


async def test_each_proxied_request_is_one_arrival_and_one_service_sample(fleet: Fleet) -> None:
    history = fleet.service.history
    assert history is not None
    hold = asyncio.Event()
    upstream = await fleet.add_worker(
        "w1", slots=2, loaded=("llama3.2",), upstream=FakeOllama(name="w1", hold=hold)
    )
    async with fleet.client() as client:
        requests = [asyncio.create_task(chat(client)) for _ in range(5)]
        assert await eventually(lambda: _eq(upstream.in_flight, 2))
        # counted on arrival (3 of them wait), in memory: nothing written yet
        assert history.pending > 0
        assert (await history.summary(["llm"]))["llm"].arrivals == 0
        hold.set()
        responses = await asyncio.gather(*requests)
    assert [r.status_code for r in responses] == [200] * 5
    assert await eventually(lambda: served(history, "llm", 5))
    got = (await history.summary(["llm", "big"]))
    assert got["llm"].arrivals == 5
    assert got["llm"].service_s.total == 5
    assert got["big"].arrivals == 0
    per_model = await history.model_service("llm")
    assert per_model["llama3.2:latest"].service_s.total == 5


async def test_a_retried_request_is_one_arrival_and_a_failed_one_no_service(
    fleet: Fleet,
) -> None:
    history = fleet.service.history
    assert history is not None
    await fleet.add_worker(
        "bad", slots=1, loaded=("llama3.2",), upstream=FakeOllama(name="bad", fail_status=500)
    )
    await fleet.add_worker("good", slots=1, present=("llama3.2",))
    async with fleet.client() as client:
        response = await chat(client)
    assert response.status_code == 200
    assert response.headers["x-gpufleet-worker"] == "good"
    assert await eventually(lambda: served(history, "llm", 1))
    got = (await history.summary(["llm"]))["llm"]
    assert got.arrivals == 1
    assert got.service_s.total == 1
