"""ComfyUIEngine details beyond the contract: progress events, byte-identical output
copies, the polling fallback, execution errors and queue cancellation.

The engine talks over real loopback sockets (websockets need them) to
``SimulatedComfyUI``; every delay is a knob at or near zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpufleet.engines import is_cancelled
from gpufleet.engines.comfyui import ComfyUIEngine, prompt_id_for
from gpufleet.engines.simulated import ComfyUIConfig, SimulatedComfyUI
from gpufleet.errors import EngineRejected, EngineUnavailable
from gpufleet.results import DirectoryResultStore
from tests.contract.test_engine_contract import GRAPH, eventually
from tests.servers import serve

pytestmark = pytest.mark.timeout(30)

SD_GRAPH = {
    "4": {"class_type": "CheckpointLoaderSimple",
          "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512,
                                                       "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "3": {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 1, "steps": 4, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0],
        "latent_image": ["5", 0], "denoise": 1.0}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0],
                                                "filename_prefix": "cats/run"}},
}


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedComfyUI]:
    worker = SimulatedComfyUI(ComfyUIConfig())
    yield worker
    await worker.aclose()


@pytest.fixture
async def url(sim: SimulatedComfyUI) -> AsyncIterator[str]:
    async with serve(sim) as base_url:
        yield base_url


@pytest.fixture
async def engine() -> AsyncIterator[ComfyUIEngine]:
    async with httpx.AsyncClient() as http:
        yield ComfyUIEngine(http, request_timeout_s=2.0, stall_timeout_s=5.0,
                            poll_interval_s=0.005)


@pytest.fixture
def results(tmp_path: Path) -> DirectoryResultStore:
    return DirectoryResultStore(tmp_path)


class Events(list[dict[str, Any]]):
    async def __call__(self, event: dict[str, Any]) -> None:
        self.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self if e["type"] == kind]


async def test_websocket_progress_reaches_on_event_in_order(
    engine: ComfyUIEngine, url: str, results: DirectoryResultStore
) -> None:
    events = Events()
    await engine.run(url, SD_GRAPH, task_id="t", on_event=events, results=results)
    assert [e["value"] for e in events.of("progress")] == [1, 2, 3, 4]
    assert {e["max"] for e in events.of("progress")} == {4}
    assert {e["node"] for e in events.of("progress")} == {"3"}
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["queued", "started"]
    assert kinds.index("executed") > max(i for i, k in enumerate(kinds) if k == "progress")
    assert kinds[-1] == "output"
    executing = [(e["node"], e["class_type"]) for e in events.of("executing")]
    assert ("3", "KSampler") in executing
    assert executing.index(("4", "CheckpointLoaderSimple")) < executing.index(("3", "KSampler"))
    assert not events.of("polling")


async def test_outputs_are_copied_byte_identical_into_the_result_store(
    engine: ComfyUIEngine, url: str, sim: SimulatedComfyUI, results: DirectoryResultStore
) -> None:
    result = await engine.run(url, SD_GRAPH, task_id="t-42", results=results)
    [output] = result["outputs"]
    original = sim.files[("output", "cats", "run_00001_.png")]
    assert original.startswith(b"\x89PNG\r\n\x1a\n")
    assert output == {"filename": "cats_run_00001_.png", "size": len(original),
                      "content_type": "image/png", "node_id": "9"}
    assert await results.get("t-42", "cats_run_00001_.png") == original
    assert [f.filename for f in await results.list("t-42")] == ["cats_run_00001_.png"]
    assert result["prompt_id"] == prompt_id_for("t-42")


async def test_polling_fallback_when_the_websocket_is_refused(
    engine: ComfyUIEngine, url: str, sim: SimulatedComfyUI, results: DirectoryResultStore
) -> None:
    sim.config.websocket = False
    sim.config.step_time_s = 0.01
    events = Events()
    result = await engine.run(url, GRAPH, task_id="t", on_event=events, results=results)
    assert len(result["outputs"]) == 1
    assert not events.of("progress")  # only the socket carries progress
    assert sim.recorder.count(f"/history/{result['prompt_id']}") >= 1


async def test_dropped_websocket_falls_back_to_history(
    engine: ComfyUIEngine, url: str, sim: SimulatedComfyUI, results: DirectoryResultStore
) -> None:
    sim.config.drop_ws_after = 3  # status, status, execution_start
    events = Events()
    result = await engine.run(url, SD_GRAPH, task_id="t", on_event=events, results=results)
    assert events.of("polling") == [{"type": "polling", "reason": "websocket dropped"}]
    assert await results.get("t", result["outputs"][0]["filename"])


async def test_validation_errors_keep_node_errors(engine: ComfyUIEngine, url: str) -> None:
    graph = {**GRAPH, "1": {"class_type": "EmptyImage",
                            "inputs": {"width": 999999, "height": 64, "batch_size": 1,
                                       "color": 0}}}
    with pytest.raises(EngineRejected) as caught:
        await engine.run(url, graph, task_id="t")
    node_errors = caught.value.details["node_errors"]
    assert node_errors["1"]["errors"][0]["type"] == "value_bigger_than_max"
    assert node_errors["1"]["dependent_outputs"] == ["3"]
    assert "Value 999999 bigger than max of 16384" in str(caught.value)


async def test_runtime_error_is_terminal(engine: ComfyUIEngine, url: str) -> None:
    graph = {**GRAPH, "3": {"class_type": "SaveImage",
                            "inputs": {"images": ["2", 0], "filename_prefix": "../escape"}}}
    with pytest.raises(EngineRejected) as caught:
        await engine.run(url, graph, task_id="t")
    assert caught.value.details["node_id"] == "3"
    assert caught.value.details["node_type"] == "SaveImage"
    assert "outside the output folder" in caught.value.details["exception_message"]


async def test_out_of_memory_is_retryable(
    engine: ComfyUIEngine, url: str, sim: SimulatedComfyUI
) -> None:
    sim.config.runtime_error = "CUDA out of memory. Tried to allocate 2.00 GiB"
    with pytest.raises(EngineUnavailable) as caught:
        await engine.run(url, GRAPH, task_id="t")
    assert caught.value.transient


async def test_an_interrupt_we_did_not_ask_for_is_retryable(
    engine: ComfyUIEngine, url: str, sim: SimulatedComfyUI
) -> None:
    sim.config.hang_render = True
    task = asyncio.create_task(engine.run(url, GRAPH, task_id="t"))
    await eventually(lambda: sim.running is not None)
    async with httpx.AsyncClient() as http:
        await http.post(f"{url}/interrupt")  # someone else, with no prompt_id
    with pytest.raises(EngineUnavailable, match="interrupted"):
        await task


async def test_cancel_removes_a_prompt_that_has_not_started(
    engine: ComfyUIEngine, url: str, sim: SimulatedComfyUI
) -> None:
    sim.config.hang_render = True
    first = asyncio.create_task(engine.run(url, GRAPH, task_id="first"))
    await eventually(lambda: sim.running is not None)
    second = asyncio.create_task(engine.run(url, GRAPH, task_id="second"))
    await eventually(lambda: len(sim.pending) == 1)
    await engine.cancel(url, task_id="second")
    assert sim.pending == []
    assert sim.running is not None
    assert sim.running.prompt_id == prompt_id_for("first")
    await engine.cancel(url, task_id="first")
    with pytest.raises(EngineUnavailable):  # from the engine's view: vanished / interrupted
        await second
    with pytest.raises(EngineUnavailable, match="interrupted"):
        await first
    assert prompt_id_for("second") not in sim.history


async def test_cancel_event_during_a_render_returns_cancelled(
    engine: ComfyUIEngine, url: str, sim: SimulatedComfyUI
) -> None:
    sim.config.step_time_s = 0.01
    cancel = asyncio.Event()
    events = Events()

    async def on_event(event: dict[str, Any]) -> None:
        await events(event)
        if event["type"] == "progress" and event["value"] == 2:
            cancel.set()

    graph = {**SD_GRAPH, "3": {**SD_GRAPH["3"], "inputs": {**SD_GRAPH["3"]["inputs"],
                                                           "steps": 10_000}}}
    result = await engine.run(url, graph, task_id="t", on_event=on_event, cancel=cancel)
    assert is_cancelled(result)
    await eventually(lambda: prompt_id_for("t") in sim.history)
    messages = sim.history[prompt_id_for("t")]["status"]["messages"]
    assert messages[-1][0] == "execution_interrupted"
    assert max(e["value"] for e in events.of("progress")) < 10_000


async def test_a_worker_that_lost_the_prompt_is_unavailable(
    engine: ComfyUIEngine, url: str, sim: SimulatedComfyUI
) -> None:
    sim.config.websocket = False
    sim.config.hang_render = True
    first = asyncio.create_task(engine.run(url, GRAPH, task_id="first"))
    await eventually(lambda: sim.running is not None)
    second = asyncio.create_task(engine.run(url, GRAPH, task_id="second"))
    await eventually(lambda: len(sim.pending) == 1)
    async with httpx.AsyncClient() as http:
        await http.post(f"{url}/queue", json={"clear": True})
    with pytest.raises(EngineUnavailable, match="neither queued nor in history"):
        await second
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await eventually(lambda: sim.running is None)  # our own cancellation interrupted it
