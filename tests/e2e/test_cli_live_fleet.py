"""The remote CLI against a live gpufleet whose fleet really works.

gpufleet (``create_app`` under uvicorn on loopback) runs a static fleet: one simulated
ComfyUI and one simulated Ollama worker, each its own loopback server, plus a pool whose only
URL answers nothing (its tasks stay queued). The CLI runs as a user runs it: in-process through
typer's runner for the one-shot commands, and as a real ``python -m gpufleet`` process for the
ones that run until Ctrl-C (``--watch``, ``--follow``), which then gets a SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from gpufleet.app import create_app
from gpufleet.cli import app as cli
from gpufleet.engines.simulated import (
    ComfyUIConfig,
    OllamaConfig,
    SimulatedComfyUI,
    SimulatedOllama,
)
from gpufleet.loopback import LoopbackServer, free_port
from gpufleet.settings import load_settings

pytestmark = pytest.mark.timeout(90)
runner = CliRunner()
GRAPH = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 7}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cli"}},
}


@dataclass
class Live:
    url: str
    key: str
    components: Any

    @property
    def auth(self) -> list[str]:
        return ["--url", self.url, "--key", self.key]


@pytest.fixture
async def live(redis_url: str, redis: Any, tmp_path: Path) -> AsyncIterator[Live]:
    comfy = SimulatedComfyUI(ComfyUIConfig(default_steps=3))
    ollama = SimulatedOllama(OllamaConfig(models=("llama3.2",), first_token_s=0.01))
    workers = [LoopbackServer(comfy, name="sim-comfy"), LoopbackServer(ollama, name="sim-llm")]
    urls = [await w.start() for w in workers]
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        results={"dir": tmp_path / "results"},
        workers={"health_interval_s": 0.2, "health_timeout_s": 0.5, "dispatch_interval_s": 0.2},
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui", "urls": [urls[0]]},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 4,
             "models": ["llama3.2"], "urls": [urls[1]]},
            {"name": "idle", "provider": "static", "engine": "comfyui",
             "urls": [f"http://127.0.0.1:{free_port()}"]},
        ],
    )
    app = create_app(settings)
    server = LoopbackServer(app, name="gpufleet")
    await server.start()
    components = app.state.services
    _, key = await components.apikeys.create("cli", role="admin")
    try:
        for _ in range(500):
            ready = {w.pool for w in await components.registry.list_workers()
                     if w.state.value == "ready"}
            if {"comfy", "llm"} <= ready:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the simulated workers never became ready")
        yield Live(server.url, key, components)
    finally:
        await server.stop()
        for w in workers:
            await w.stop()
        await comfy.aclose()


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, cli, list(args))


async def test_submit_wait_downloads_outputs(live: Live, tmp_path: Path) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(GRAPH))  # a bare ComfyUI graph
    out = tmp_path / "outputs"
    done = await invoke("tasks", "submit", str(graph), "--wait", "--outputs", str(out), *live.auth)
    assert done.exit_code == 0, done.output
    assert "succeeded" in done.stdout
    files = sorted(out.iterdir())
    assert files, done.output
    task_id = done.stdout.split()[0]
    async with httpx.AsyncClient(base_url=live.url, headers={
            "Authorization": f"Bearer {live.key}"}) as http:
        for path in files:  # byte for byte what gpufleet keeps
            kept = await http.get(f"/api/v1/tasks/{task_id}/outputs/{path.name}")
            assert kept.content == path.read_bytes()
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --json: stdout is one JSON document, the spinner never gets into it
    as_json = await invoke("tasks", "submit", str(graph), "--wait", "--json", *live.auth)
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["status"] == "succeeded"


async def test_exit_codes_of_a_failed_and_a_timed_out_wait(live: Live, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
    failed = await invoke("tasks", "submit", str(bad), "--wait", "--json", *live.auth)
    assert failed.exit_code == 1, failed.output
    task = json.loads(failed.stdout)
    assert task["status"] == "failed"
    assert "NoSuchNode" in json.dumps(task["error"])

    stuck = tmp_path / "stuck.json"
    stuck.write_text(json.dumps({"kind": "comfyui", "pool": "idle", "payload": GRAPH}))
    timed_out = await invoke("tasks", "submit", str(stuck), "--wait", "--timeout-s", "0.5",
                             *live.auth)
    assert timed_out.exit_code == 4, timed_out.output

    missing = await invoke("tasks", "submit", str(tmp_path / "nope.json"), *live.auth)
    assert missing.exit_code == 2
    unknown = await invoke("tasks", "get", "01nosuchtask0000000000000", *live.auth)
    assert unknown.exit_code == 1
    usage = await invoke("workers", "--no-such-option", *live.auth)
    assert usage.exit_code == 2


async def test_every_read_command_speaks_json(live: Live) -> None:
    submitted = json.loads((await _submit(live)).stdout)
    reads = {
        "status": ["status"],
        "workers": ["workers"],
        "workers --pool": ["workers", "--pool", "comfy"],
        "events": ["events"],
        "tasks list": ["tasks", "list"],
        "tasks get": ["tasks", "get", submitted["id"]],
        "endpoints export": ["endpoints", "export"],
        "instances": ["instances", "--provider", "static"],
    }
    for name, args in reads.items():
        result = await invoke(*args, *live.auth, "--json")
        assert result.exit_code == 0, (name, result.output)
        json.loads(result.stdout)  # nothing but JSON on stdout

    status = json.loads((await invoke("status", *live.auth, "--json")).stdout)
    assert {p["name"] for p in status["pools"]} == {"comfy", "llm", "idle"}
    assert all("spend_usd" in p and "demand" in p for p in status["pools"])

    endpoints = json.loads((await invoke("endpoints", "export", *live.auth)).stdout)
    assert set(endpoints) == {"comfy", "llm"}  # ready workers only: "idle" answers nothing
    assert endpoints["llm"][0]["models"] == ["llama3.2:latest"]  # as the engine names it
    async with httpx.AsyncClient() as http:  # the exported URL is the engine itself
        answer = await http.get(f"{endpoints['llm'][0]['url']}/api/tags")
        assert answer.status_code == 200


async def _submit(live: Live) -> Result:
    async with httpx.AsyncClient(base_url=live.url, headers={
            "Authorization": f"Bearer {live.key}"}) as http:
        answer = await http.post("/api/v1/tasks", json={"kind": "comfyui", "payload": GRAPH})
        assert answer.status_code == 202, answer.text
    return await invoke("tasks", "get", answer.json()["id"], *live.auth)


class Process:
    """``python -m gpufleet ...`` with URL and key from the environment, read line by line."""

    def __init__(self, live: Live) -> None:
        self.env = os.environ | {"GPUFLEET_URL": live.url, "GPUFLEET_API_KEY": live.key,
                                 "COLUMNS": "160"}
        self.lines: list[str] = []

    async def run_until(self, args: list[str], seen: Any, poke: Any = None) -> int:
        """Start, read lines until ``seen(lines)`` holds (calling ``poke()`` meanwhile), then
        Ctrl-C; return the exit code."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpufleet", *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not seen(self.lines):
                assert loop.time() < deadline, self.lines[-20:]
                if poke is not None:
                    await poke()
                try:
                    line = await asyncio.wait_for(proc.stdout.readline(), 0.3)
                except TimeoutError:
                    continue
                assert line, (await proc.stderr.read()).decode() if proc.stderr else ""
                self.lines.append(line.decode())
            proc.send_signal(signal.SIGINT)
            return await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_watch_refreshes_until_ctrl_c(live: Live) -> None:
    watch = Process(live)
    code = await watch.run_until(
        ["status", "--watch", "--interval", "0.2"],
        lambda lines: sum("pools" in line for line in lines) >= 2)  # refreshed at least once
    assert code == 0, watch.lines
    text = "".join(watch.lines)
    assert "comfy" in text
    assert "ready" in text

    workers = Process(live)
    code = await workers.run_until(
        ["workers", "--watch", "--interval", "0.2", "--pool", "llm"],
        lambda lines: sum("workers" in line for line in lines) >= 2)
    assert code == 0, workers.lines
    assert "llm-0" in "".join(workers.lines)


async def test_events_follow_streams_until_ctrl_c(live: Live) -> None:
    follow = Process(live)

    async def poke() -> None:  # keep something happening until the stream shows it
        await live.components.events.emit("scale", pool="comfy", action="create",
                                          reason="cli follow test", outcome="ok")

    code = await follow.run_until(
        ["events", "--follow", "--json"],
        lambda lines: any("cli follow test" in line for line in lines), poke)
    assert code == 0, follow.lines
    event = json.loads(next(line for line in follow.lines if "cli follow test" in line))
    assert event["action"] == "create"
    assert event["pool"] == "comfy"
