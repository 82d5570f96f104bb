"""Remote CLI commands against a live gpufleet on loopback (the CLI runs in a thread)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from gpufleet.app import create_app
from gpufleet.cli import app as cli
from gpufleet.domain import WorkerState
from gpufleet.loopback import LoopbackServer, free_port
from gpufleet.settings import load_settings

runner = CliRunner()
POOLS = [
    {
        "name": "llm",
        "provider": "static",
        "engine": "ollama",
        "urls": ["http://h:1"],
        "slots": 4,
        "models": ["llama3.1:8b"],
    }
]


@pytest.fixture
async def live(redis_url: str, redis: Any, tmp_path: Path) -> AsyncIterator[tuple[str, str, Any]]:
    app = create_app(
        load_settings(
            env_file=None,
            redis={"url": redis_url},
            results={"dir": tmp_path / "results"},
            pools=POOLS,
        )
    )
    server = LoopbackServer(app, name="gpufleet")
    await server.start()
    components = app.state.services
    _, key = await components.apikeys.create("cli", role="admin")
    try:
        yield server.url, key, components
    finally:
        await server.stop()


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, cli, list(args))


async def test_status_workers_endpoints_events(live: tuple[str, str, Any]) -> None:
    url, key, components = live
    # The static pool's URL was registered at startup as worker llm-0 (booting); the
    # health checker cannot reach http://h:1, so bring it up by hand.
    assert await components.registry.transition("llm-0", WorkerState.ready)
    await components.registry.update("llm-0", models_present=["llama3.1:8b"])
    await components.events.emit("scale", pool="llm", action="Adopt", reason="static url")
    auth = ["--url", url, "--key", key]

    status = await invoke("status", *auth, "--json")
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert data["pools"][0]["name"] == "llm"
    assert data["workers"][0]["id"] == "llm-0"
    table = await invoke("status", *auth)
    assert "llm-0" in table.output
    assert "ready" in table.output

    workers = json.loads((await invoke("workers", *auth, "--json")).output)
    assert [w["state"] for w in workers] == ["ready"]

    endpoints = json.loads((await invoke("endpoints", "export", *auth)).output)
    assert endpoints == {
        "llm": [{"worker": "llm-0", "url": "http://h:1", "slots": 4, "models": ["llama3.1:8b"]}]
    }

    events = await invoke("events", *auth)
    assert "Adopt" in events.output


async def test_exit_codes(live: tuple[str, str, Any]) -> None:
    url, _, _ = live
    bad_key = await invoke("workers", "--url", url, "--key", "gpf_wrong")
    assert bad_key.exit_code == 1
    unreachable = await invoke("workers", "--url", f"http://127.0.0.1:{free_port()}", "--key", "k")
    assert unreachable.exit_code == 3
