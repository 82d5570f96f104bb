"""The dispatcher against a real Redis and simulated ComfyUI / Ollama workers on loopback.

Each test registers ready workers (the health checker's job, tested elsewhere), enqueues
tasks, and calls ``dispatch_once`` until the tasks it watches are finished. Nothing
waits for a duration: slow work waits on knobs (``hang_render``), and "eventually"
checks poll a condition a bounded number of times.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gpufleet.dispatch import Dispatcher
from gpufleet.domain import Engine, TaskStatus, WorkerState
from gpufleet.engines import build_engine
from gpufleet.engines.simulated import (
    ComfyUIConfig,
    OllamaConfig,
    SimulatedComfyUI,
    SimulatedOllama,
)
from gpufleet.results import DirectoryResultStore
from gpufleet.settings import Settings, load_settings
from gpufleet.store.queue import TaskQueue
from gpufleet.store.workers import WorkerRegistry
from gpufleet.tasks import Task, TaskSubmit
from tests.servers import serve

pytestmark = pytest.mark.timeout(30)

GRAPH = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "d"}},
}
# Well formed, but ComfyUI refuses it: width below the node's minimum (a 400 with node_errors).
BAD_GRAPH = {**GRAPH, "1": {"class_type": "EmptyImage",
                            "inputs": {"width": 0, "height": 64, "batch_size": 1, "color": 0}}}


def chat(model: str = "llama3.2") -> dict[str, Any]:
    return {"api": "chat", "body": {"model": model,
                                    "messages": [{"role": "user", "content": "hi"}]}}


async def eventually(check: Callable[[], Any], tries: int = 500) -> None:
    for _ in range(tries):
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


class Fleet:
    """A dispatcher, its stores, and simulated workers registered as ready."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, http: httpx.AsyncClient,
                 results: DirectoryResultStore) -> None:
        self.settings = settings
        self.registry = WorkerRegistry(redis)
        self.queue = TaskQueue(redis, settings.queue)
        self.results = results
        engines = {
            "comfyui": build_engine(Engine.comfyui, http, request_timeout_s=2.0,
                                    poll_interval_s=0.01, stall_timeout_s=10.0),
            "ollama": build_engine(Engine.ollama, http, request_timeout_s=2.0),
        }
        self.dispatcher = Dispatcher(settings, self.registry, self.queue, http,
                                     results=results, engines=engines)
        self.stack = AsyncExitStack()
        self.sims: dict[str, Any] = {}

    async def add(self, worker_id: str, pool: str, sim: Any, *, slots: int = 1,
                  models: tuple[str, ...] = ()) -> str:
        url = await self.stack.enter_async_context(serve(sim, name=worker_id))
        if isinstance(sim, SimulatedComfyUI):
            self.stack.push_async_callback(sim.aclose)
        self.sims[worker_id] = sim
        engine = self.settings.pool(pool).engine.value
        await self.registry.register(pool=pool, provider="static", slots=slots,
                                     worker_id=worker_id, state=WorkerState.ready,
                                     base_url=url, engine=engine, models_present=models)
        return url

    async def submit(self, kind: str, payload: dict[str, Any], **extra: Any) -> Task:
        return await self.queue.enqueue(TaskSubmit(kind=kind, payload=payload, **extra))

    async def run_until_finished(self, ids: list[str], passes: int = 2000) -> list[Task]:
        """dispatch_once until every task in ``ids`` is finished (bounded)."""
        for _ in range(passes):
            tasks = [await self.queue.get(i, include_payload=False) for i in ids]
            if all(t.finished for t in tasks):
                return tasks
            await self.dispatcher.dispatch_once()
            await asyncio.sleep(0.005)
        raise AssertionError(f"unfinished: {[t for t in tasks if not t.finished]}")


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return load_settings(
        env_file=None,
        redis={"url": redis_url},
        queue={"lease_ttl_s": 2.0, "heartbeat_interval_s": 0.2, "retry_backoff_s": 0.01,
               "retry_backoff_max_s": 0.05},
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui", "slots": 1,
             "urls": ["http://127.0.0.1:1"]},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 4,
             "models": ["llama3.2"], "urls": ["http://127.0.0.1:1"], "idle_timeout_s": 120},
        ],
    )


@pytest.fixture
async def fleet(redis: aioredis.Redis, settings: Settings, tmp_path: Path
                ) -> AsyncIterator[Fleet]:
    async with httpx.AsyncClient(trust_env=False) as http:
        f = Fleet(redis, settings, http, DirectoryResultStore(tmp_path / "results"))
        async with f.stack:
            try:
                yield f
            finally:
                await f.dispatcher.aclose()
        await f.queue.aclose()


async def test_comfyui_task_succeeds_with_outputs_copied_and_progress_in_events(
    fleet: Fleet,
) -> None:
    await fleet.add("c0", "comfy", SimulatedComfyUI(ComfyUIConfig(default_steps=4)))
    task = await fleet.submit("comfyui", GRAPH)

    [done] = await fleet.run_until_finished([task.id])

    assert done.status is TaskStatus.succeeded
    assert done.worker == "c0"
    [output] = done.result["outputs"]
    assert output["content_type"] == "image/png"
    stored = await fleet.results.get(task.id, output["filename"])
    assert stored.startswith(b"\x89PNG")
    assert len(stored) == output["size"]
    details = [e.detail async for e in fleet.queue.events(task.id) if e is not None]
    kinds = [json.loads(d)["type"] for d in details if d.startswith("{")]
    assert {"queued", "executing", "progress", "output"} <= set(kinds)
    assert await fleet.registry.busy("c0") == 0


async def test_ollama_tasks_match_models_and_never_exceed_slots(fleet: Fleet) -> None:
    sim = SimulatedOllama(OllamaConfig(models=("llama3.2",), first_token_s=0.02))
    await fleet.add("o0", "llm", sim, slots=4, models=("llama3.2:latest",))
    tasks = [await fleet.submit("ollama", chat()) for _ in range(12)]
    stranger = await fleet.submit("ollama", chat("mistral"))

    finished = await fleet.run_until_finished([t.id for t in tasks])

    assert all(t.status is TaskStatus.succeeded for t in finished)
    assert finished[0].result["message"]["content"].startswith("Hello")
    assert 1 < sim.recorder.max_concurrent <= 4
    # keep_alive is set by gpufleet: at least the pool's idle timeout
    assert all(b["keep_alive"] >= 120 for b in sim.recorder.bodies if "messages" in b)
    assert (await fleet.queue.get(stranger.id)).status is TaskStatus.queued


async def test_invalid_graph_fails_once_with_node_errors(fleet: Fleet) -> None:
    await fleet.add("c0", "comfy", SimulatedComfyUI())
    task = await fleet.submit("comfyui", BAD_GRAPH)

    [done] = await fleet.run_until_finished([task.id])

    assert done.status is TaskStatus.failed
    assert done.attempts == 1
    assert done.error is not None
    assert done.error["code"] == "engine_rejected"
    assert "1" in done.error["node_errors"]
    assert "node 1 (EmptyImage)" in done.error["message"]


async def test_worker_error_is_retried_on_another_worker(fleet: Fleet) -> None:
    broken = SimulatedComfyUI(ComfyUIConfig(fail_status=500))
    await fleet.add("c0", "comfy", broken)
    task = await fleet.submit("comfyui", GRAPH)
    await fleet.dispatcher.dispatch_once()
    await fleet.dispatcher.wait_idle()
    retried = await fleet.queue.get(task.id)
    assert retried.status is TaskStatus.queued
    assert retried.errors[0]["code"] == "engine_unavailable"
    assert retried.errors[0]["worker"] == "c0"

    await fleet.registry.transition("c0", WorkerState.draining, "test")
    await fleet.add("c1", "comfy", SimulatedComfyUI())
    [done] = await fleet.run_until_finished([task.id])
    assert done.status is TaskStatus.succeeded
    assert done.worker == "c1"
    assert done.attempts == 2


async def test_a_worker_that_refuses_connections_gets_no_retry_until_a_probe_answers(
    fleet: Fleet,
) -> None:
    # c0 is registered ready but nothing listens on its port any more (a killed worker the
    # health checker has not probed yet). The retry must not spend its attempts there.
    await fleet.registry.register(pool="comfy", provider="static", slots=1, worker_id="c0",
                                  state=WorkerState.ready, base_url="http://127.0.0.1:1",
                                  engine="comfyui")
    task = await fleet.submit("comfyui", GRAPH, max_attempts=2)
    await fleet.dispatcher.dispatch_once()
    await fleet.dispatcher.wait_idle()
    first = await fleet.queue.get(task.id)
    assert first.errors[0]["worker"] == "c0"
    assert first.errors[0]["unreachable"] is True
    dead = await fleet.registry.get("c0")
    assert dead.health_failures == 1
    assert dead.state is WorkerState.ready  # one contact is not unhealthy_after's verdict
    assert not dead.takes_new_work

    await fleet.add("c1", "comfy", SimulatedComfyUI())
    [done] = await fleet.run_until_finished([task.id])
    assert done.status is TaskStatus.succeeded
    assert done.worker == "c1"
    assert done.attempts == 2

    await fleet.registry.update("c0", health_failures=0)  # what a probe that answers does
    assert (await fleet.registry.get("c0")).takes_new_work


async def test_cancel_reaches_the_engine_through_the_cancel_channel(
    redis: aioredis.Redis, settings: Settings, tmp_path: Path,
) -> None:
    # Heartbeats far apart: only the P:cancel subscription can stop the run in time.
    slow = settings.model_copy(update={"queue": settings.queue.model_copy(
        update={"heartbeat_interval_s": 60.0, "lease_ttl_s": 120.0})})
    async with httpx.AsyncClient(trust_env=False) as http:
        f = Fleet(redis, slow, http, DirectoryResultStore(tmp_path))
        async with f.stack:
            sim = SimulatedComfyUI(ComfyUIConfig(hang_render=True))
            await f.add("c0", "comfy", sim)
            await f.dispatcher.listening()
            task = await f.submit("comfyui", GRAPH)
            assert await f.dispatcher.dispatch_once() == 1
            await eventually(lambda: sim.running is not None)

            await f.queue.cancel(task.id)
            await eventually(lambda: not f.dispatcher.running)

            assert ("POST", "/interrupt") in sim.recorder.requests
            assert (await f.queue.get(task.id)).status is TaskStatus.cancelled
            assert await f.registry.busy("c0") == 0
            await f.dispatcher.aclose()
        await f.queue.aclose()


async def test_worker_leaving_ready_hands_its_task_back(fleet: Fleet) -> None:
    sim = SimulatedComfyUI(ComfyUIConfig(hang_render=True))
    await fleet.add("c0", "comfy", sim)
    task = await fleet.submit("comfyui", GRAPH)
    await fleet.dispatcher.dispatch_once()
    await eventually(lambda: sim.running is not None)

    await fleet.registry.transition("c0", WorkerState.booting, "health checks failed")
    await fleet.dispatcher.dispatch_once()
    await fleet.dispatcher.wait_idle()

    back = await fleet.queue.get(task.id)
    assert back.status is TaskStatus.queued  # requeued, not failed, and no backoff
    assert back.next_attempt_at is None
    assert back.errors[-1]["code"] == "worker_unavailable"
    assert await fleet.registry.busy("c0") == 0

    await fleet.add("c1", "comfy", SimulatedComfyUI())
    [done] = await fleet.run_until_finished([task.id])
    assert done.status is TaskStatus.succeeded
    assert done.worker == "c1"


async def test_draining_worker_finishes_its_task_and_takes_no_new_one(fleet: Fleet) -> None:
    sim = SimulatedComfyUI(ComfyUIConfig(hang_render=True))
    await fleet.add("c0", "comfy", sim, slots=2)
    first = await fleet.submit("comfyui", GRAPH)
    await fleet.dispatcher.dispatch_once()
    await eventually(lambda: sim.running is not None)

    await fleet.registry.transition("c0", WorkerState.draining, "operator")
    second = await fleet.submit("comfyui", GRAPH)
    assert await fleet.dispatcher.dispatch_once() == 0
    sim.config.hang_render = False
    sim._interrupt.set()  # let the hung render go on: the simulator ends it as interrupted

    await fleet.dispatcher.wait_idle()
    assert (await fleet.queue.get(first.id)).worker == "c0"
    assert (await fleet.queue.get(first.id)).status is not TaskStatus.running
    assert (await fleet.queue.get(second.id)).status is TaskStatus.queued


async def test_timeout_stops_the_attempt_and_retries(fleet: Fleet) -> None:
    sim = SimulatedComfyUI(ComfyUIConfig(hang_render=True))
    await fleet.add("c0", "comfy", sim)
    task = await fleet.submit("comfyui", GRAPH, timeout_s=0.2, max_attempts=1)

    [done] = await fleet.run_until_finished([task.id])

    assert done.status is TaskStatus.failed
    assert done.error is not None
    assert done.error["code"] == "timeout"
    assert ("POST", "/interrupt") in sim.recorder.requests


async def test_aclose_hands_back_running_tasks_with_the_attempt_refunded(fleet: Fleet) -> None:
    sim = SimulatedComfyUI(ComfyUIConfig(hang_render=True))
    await fleet.add("c0", "comfy", sim)
    task = await fleet.submit("comfyui", GRAPH)
    await fleet.dispatcher.dispatch_once()
    await eventually(lambda: sim.running is not None)

    await fleet.dispatcher.aclose()

    back = await fleet.queue.get(task.id)
    assert back.status is TaskStatus.queued
    assert back.attempts == 0
    assert back.errors[-1]["code"] == "dispatcher_shutdown"
    assert await fleet.registry.busy("c0") == 0
    assert await fleet.dispatcher.dispatch_once() == 0  # closed: takes nothing


async def test_idle_fleet_leaves_slots_and_last_busy_alone(fleet: Fleet) -> None:
    await fleet.add("c0", "comfy", SimulatedComfyUI())
    before = (await fleet.registry.get("c0")).last_busy_at
    await fleet.submit("ollama", chat())  # work, but not for this worker

    for _ in range(3):
        assert await fleet.dispatcher.dispatch_once() == 0

    assert (await fleet.registry.get("c0")).last_busy_at == before


async def test_many_tasks_many_workers_concurrently(fleet: Fleet) -> None:
    sims = [SimulatedComfyUI(ComfyUIConfig(default_steps=2)) for _ in range(4)]
    for i, sim in enumerate(sims):
        await fleet.add(f"c{i}", "comfy", sim)
    ollama = SimulatedOllama(OllamaConfig(models=("llama3.2",)))
    await fleet.add("o0", "llm", ollama, slots=4, models=("llama3.2:latest",))
    ids = [(await fleet.submit("comfyui", GRAPH)).id for _ in range(20)]
    ids += [(await fleet.submit("ollama", chat())).id for _ in range(20)]

    finished = await fleet.run_until_finished(ids)

    assert all(t.status is TaskStatus.succeeded for t in finished)
    assert all(s.recorder.max_concurrent <= 1 for s in sims)
    assert sum(s.recorder.total for s in sims) == 20
    assert ollama.recorder.max_concurrent <= 4


async def test_a_success_report_rides_out_a_redis_blip(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The work is done when Redis drops the ack: the report is retried, not lost (which
    would run the task again once its lease expired)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    sim = SimulatedOllama(OllamaConfig(models=("llama3.2",)))
    await fleet.add("o0", "llm", sim, slots=1, models=("llama3.2:latest",))
    real_ack = fleet.queue.ack
    failures = [RedisConnectionError("Connection reset by peer")] * 2

    async def flaky_ack(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real_ack(*args, **kwargs)

    monkeypatch.setattr(fleet.queue, "ack", flaky_ack)
    task = await fleet.submit("ollama", chat())
    (done,) = await fleet.run_until_finished([task.id])
    assert done.status is TaskStatus.succeeded
    assert done.attempts == 1
    assert failures == []
    assert sum(1 for b in sim.recorder.bodies if "messages" in b) == 1  # ran once
