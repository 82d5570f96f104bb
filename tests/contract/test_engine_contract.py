"""Every engine keeps the same contract against its simulated worker (STYLE.md habit 12).

The real ``ComfyUIEngine`` and ``OllamaEngine`` talk over real loopback sockets
(``tests/servers.py``) to ``SimulatedComfyUI`` and ``SimulatedOllama``. Each
``Harness`` knows how to build its worker, a good and a rejected payload, and how
to make a run last until the test cancels it; the tests themselves are shared.
No test sleeps for a duration: slow work waits on knobs, and "eventually" checks
poll a condition a bounded number of times.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpufleet.domain import Engine
from gpufleet.engines import EngineClient, build_engine, is_cancelled
from gpufleet.engines.simulated import (
    ComfyUIConfig,
    OllamaConfig,
    SimulatedComfyUI,
    SimulatedOllama,
)
from gpufleet.errors import EngineRejected, EngineUnavailable
from gpufleet.loopback import free_port
from gpufleet.results import DirectoryResultStore
from tests.servers import serve

pytestmark = pytest.mark.timeout(30)

GRAPH = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "probe"}},
}


async def eventually(check: Callable[[], bool], tries: int = 500) -> None:
    for _ in range(tries):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


@dataclass
class Harness:
    engine: Engine
    make: Callable[[], Any]
    good: dict[str, Any]
    rejected: dict[str, Any]
    version: str

    def busy_forever(self, sim: Any) -> None:
        """Make the next run start on the worker and then never finish by itself."""
        if self.engine is Engine.comfyui:
            sim.config.hang_render = True
        else:
            sim.config.first_token_s = 3600.0

    def drop(self, sim: Any) -> None:
        """Make the worker drop the connection mid-run (and, for ComfyUI, die)."""
        if self.engine is Engine.comfyui:
            sim.config.crash_after_frames = 3
        else:
            sim.config.drop_after_tokens = 1

    def succeeded(self, result: dict[str, Any]) -> bool:
        if self.engine is Engine.comfyui:
            return len(result["outputs"]) == 1 and result["outputs"][0]["size"] > 0
        return result["message"]["content"].startswith("Hello")


HARNESSES = {
    "comfyui": Harness(
        Engine.comfyui,
        lambda: SimulatedComfyUI(ComfyUIConfig(version="0.3.64")),
        GRAPH,
        {**GRAPH, "2": {"class_type": "NoSuchNode", "inputs": {"image": ["1", 0]}}},
        "0.3.64",
    ),
    "ollama": Harness(
        Engine.ollama,
        lambda: SimulatedOllama(OllamaConfig(version="0.12.3")),
        {"api": "chat", "body": {"model": "llama3.2",
                                 "messages": [{"role": "user", "content": "hi"}]}},
        {"api": "chat", "body": {"model": "no-such-model",
                                 "messages": [{"role": "user", "content": "hi"}]}},
        "0.12.3",
    ),
}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest) -> Harness:
    return HARNESSES[request.param]


@pytest.fixture
async def sim(harness: Harness) -> AsyncIterator[Any]:
    worker = harness.make()
    yield worker
    if isinstance(worker, SimulatedComfyUI):
        await worker.aclose()


@pytest.fixture
async def url(sim: Any) -> AsyncIterator[str]:
    async with serve(sim) as base_url:
        yield base_url


@pytest.fixture
async def engine(harness: Harness) -> AsyncIterator[EngineClient]:
    async with httpx.AsyncClient() as http:
        options: dict[str, Any] = {"request_timeout_s": 0.5}
        if harness.engine is Engine.comfyui:
            options.update(poll_interval_s=0.01, stall_timeout_s=5.0)
        else:
            options.update(run_timeout_s=0.5)
        yield build_engine(harness.engine, http, **options)


@pytest.fixture
def results(tmp_path: Path) -> DirectoryResultStore:
    return DirectoryResultStore(tmp_path / "results")


Run = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def run(engine: EngineClient, url: str, results: DirectoryResultStore, harness: Harness) -> Run:
    def start(payload: dict[str, Any] | None = None, **kwargs: Any) -> Awaitable[dict[str, Any]]:
        kwargs.setdefault("task_id", "task-1")
        return engine.run(url, payload or harness.good, results=results, **kwargs)

    return start


# -- health ------------------------------------------------------------------------------


async def test_health_ok_reports_version_and_inventory(
    engine: EngineClient, url: str, harness: Harness
) -> None:
    health = await engine.health(url, inventory=True)
    assert health.ok
    assert health.version == harness.version
    assert health.models_present  # a checkpoint / a model


async def test_health_not_ok_while_gateway_answers_502_then_ok(
    engine: EngineClient, url: str, sim: Any
) -> None:
    sim.config.fail_status = 502
    first = await engine.health(url)
    sim.config.fail_status = None
    second = await engine.health(url)
    assert (first.ok, first.status_code) == (False, 502)
    assert second.ok


async def test_health_not_ok_when_nothing_listens(engine: EngineClient) -> None:
    health = await engine.health(f"http://127.0.0.1:{free_port()}")
    assert not health.ok
    assert health.detail


async def test_health_not_ok_when_the_worker_hangs(
    engine: EngineClient, url: str, sim: Any
) -> None:
    sim.config.hang = True
    health = await engine.health(url)
    assert not health.ok
    assert "timed out" in health.detail


# -- run ---------------------------------------------------------------------------------


async def test_run_succeeds(run: Run, sim: Any, harness: Harness) -> None:
    events: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any]) -> None:
        events.append(event)

    result = await run(on_event=on_event, keep_alive_s=600)
    assert harness.succeeded(result)
    assert not is_cancelled(result)
    assert sim.recorder.total == 1
    assert events  # progress reached the listener


async def test_rejected_input_raises_terminal_error(run: Run, harness: Harness) -> None:
    with pytest.raises(EngineRejected) as caught:
        await run(harness.rejected)
    assert not caught.value.transient
    if harness.engine is Engine.comfyui:
        assert caught.value.details["error"]["type"] == "invalid_prompt"
        assert "node_errors" in caught.value.details
    else:
        assert "not found" in str(caught.value)


async def test_worker_500_is_unavailable(run: Run, sim: Any) -> None:
    sim.config.fail_status = 500
    with pytest.raises(EngineUnavailable) as caught:
        await run()
    assert caught.value.transient


async def test_hanging_worker_is_unavailable_after_the_timeout(run: Run, sim: Any) -> None:
    sim.config.hang = True
    with pytest.raises(EngineUnavailable, match="timed out"):
        await run()
    await eventually(lambda: sim.recorder.disconnects >= 1)  # we hung up, it noticed


async def test_garbage_json_is_unavailable(run: Run, sim: Any) -> None:
    sim.config.garbage = True
    with pytest.raises(EngineUnavailable, match="non-JSON|not JSON|answered"):
        await run()


async def test_dropped_connection_is_unavailable(run: Run, sim: Any, harness: Harness) -> None:
    harness.drop(sim)
    with pytest.raises(EngineUnavailable):
        await run()


async def test_cancel_stops_the_work_and_returns_a_cancelled_result(
    run: Run, sim: Any, harness: Harness
) -> None:
    harness.busy_forever(sim)
    cancel = asyncio.Event()
    task = asyncio.create_task(run(cancel=cancel))
    await eventually(lambda: sim.recorder.current == 1)
    cancel.set()
    result = await task
    assert is_cancelled(result)
    await eventually(lambda: sim.recorder.current == 0)  # the worker stopped working on it


async def test_recorder_sees_the_concurrency_gpufleet_caused(
    run: Run, sim: Any, harness: Harness
) -> None:
    harness.busy_forever(sim)
    cancel = asyncio.Event()
    tasks = [asyncio.create_task(run(cancel=cancel, task_id=f"t{i}")) for i in range(3)]
    await eventually(lambda: sim.recorder.current == 3)
    cancel.set()
    outcomes = await asyncio.gather(*tasks)
    assert all(is_cancelled(r) for r in outcomes)
    assert sim.recorder.max_concurrent == 3
    await eventually(lambda: sim.recorder.current == 0)


async def test_unknown_engine_is_a_config_error() -> None:
    from gpufleet.errors import ConfigError

    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match="unknown engine"):
            build_engine("vllm", http)
