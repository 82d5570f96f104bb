"""``gpufleet tasks submit/list/get`` against a live gpufleet (no workers: tasks stay queued)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from gpufleet.app import create_app
from gpufleet.cli import app as cli
from gpufleet.examples import example_path
from gpufleet.loopback import LoopbackServer
from gpufleet.settings import load_settings

runner = CliRunner()
POOLS = [{"name": "comfy", "provider": "static", "engine": "comfyui",
          "urls": ["http://127.0.0.1:9"]}]


@pytest.fixture
async def live(redis_url: str, redis: Any) -> AsyncIterator[tuple[str, str]]:
    app = create_app(load_settings(env_file=None, redis={"url": redis_url}, pools=POOLS))
    server = LoopbackServer(app, name="gpufleet")
    await server.start()
    _, key = await app.state.services.apikeys.create("cli", role="admin")
    try:
        yield server.url, key
    finally:
        await server.stop()


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, cli, list(args))


async def test_submit_the_example_graph_then_list_and_get(live: tuple[str, str]) -> None:
    url, key = live
    auth = ["--url", url, "--key", key]
    submitted = await invoke("tasks", "submit", str(example_path("txt2img.json")), *auth, "--json")
    assert submitted.exit_code == 0, submitted.output
    task = json.loads(submitted.output)
    assert task["kind"] == "comfyui"

    listed = await invoke("tasks", "list", *auth, "--json")
    assert listed.exit_code == 0, listed.output
    assert [t["id"] for t in json.loads(listed.output)] == [task["id"]]
    table = await invoke("tasks", "list", *auth)
    assert table.exit_code == 0, table.output
    assert task["id"][:8] in table.output

    got = await invoke("tasks", "get", task["id"], *auth)
    assert json.loads(got.output)["id"] == task["id"]
