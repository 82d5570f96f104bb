"""Issue 19 point 8: demand that no worker of a pool could serve never scales that pool.

Tasks are put straight into a real queue (as tasks from before a config change would be;
the REST API refuses new ones with 422), and the reconciler's demand grouping reads the
queue's stats: a task counts only for the pools that serve its model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gpufleet.scaling.observe import demand_groups as _demand
from gpufleet.settings import QueueSettings, load_settings
from gpufleet.store.queue import TaskQueue
from gpufleet.tasks import TaskSubmit

NOW = 1_700_000_000.0


def chat(model: str, **kw: Any) -> TaskSubmit:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return TaskSubmit(kind="ollama", payload={"api": "chat", "body": body}, **kw)


@pytest.fixture
async def queue(redis: aioredis.Redis) -> AsyncIterator[TaskQueue]:
    q = TaskQueue(redis, QueueSettings(), "u", clock=lambda: NOW)
    yield q
    await q.aclose()


SPECS = {
    p.name: p
    for p in load_settings(env_file=None, pools=[
        {"name": "small", "provider": "static", "engine": "ollama", "urls": ["http://a"],
         "models": ["llama3.2:1b"], "price_per_hour": 0.1},
        {"name": "big", "provider": "static", "engine": "ollama", "urls": ["http://b"],
         "models": ["llama3.2:1b", "llama3.3:70b"], "price_per_hour": 2.0},
        {"name": "comfy", "provider": "static", "engine": "comfyui", "urls": ["http://c"]},
    ]).pools
}


async def test_tasks_count_only_for_pools_that_serve_their_model(queue: TaskQueue) -> None:
    for _ in range(3):
        await queue.enqueue(chat("llama3.3:70b"))  # only "big" serves it
    for _ in range(2):
        await queue.enqueue(chat("llama3.2:1b"))  # both do
    for _ in range(50):
        await queue.enqueue(chat("mistral:7b"))  # nobody does
        await queue.enqueue(chat("mistral:7b", pool="small"))  # its pool does not
    demand = {d.key: d for d in _demand(SPECS, await queue.stats(), {}, NOW + 10)}
    assert set(demand) == {"ollama/llama3.3:70b", "ollama/*"}
    assert demand["ollama/llama3.3:70b"].pools == ("big",)
    assert demand["ollama/llama3.3:70b"].queued == 3
    assert demand["ollama/*"].pools == ("small", "big")
    assert demand["ollama/*"].queued == 2
    assert sum(d.total for d in demand.values()) == 5  # the 100 unservable count for nobody


async def test_unservable_work_alone_is_no_demand_at_all(queue: TaskQueue) -> None:
    for _ in range(20):
        await queue.enqueue(chat("mistral:7b"))
        await queue.enqueue(chat("mistral:7b", pool="big"))
    assert (await queue.stats()).queued == 40
    assert _demand(SPECS, await queue.stats(), {}, NOW) == ()
    await queue.enqueue(chat("llama3.2:1b", pool="big"))
    (only,) = _demand(SPECS, await queue.stats(), {}, NOW)
    assert only.pools == ("big",)
    assert only.queued == 1
