"""``gpufleet instances`` / ``gpufleet products`` against a live gpufleet whose Novita and
SURF providers talk to the simulated clouds over loopback (the CLI runs in a thread)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from gpufleet.app import create_app
from gpufleet.cli import app as cli
from gpufleet.loopback import LoopbackServer, free_port
from gpufleet.providers.simulated import (
    SimNovitaConfig,
    SimSurfConfig,
    create_novita_app,
    create_surf_app,
)
from gpufleet.settings import load_settings

runner = CliRunner()


def pools() -> list[dict[str, Any]]:
    return [
        {"name": "comfy", "provider": "novita", "engine": "comfyui",
         "product_id": "4090.sim", "image": "comfy:latest", "price_per_hour": 0.67},
        {"name": "llm", "provider": "surf", "engine": "ollama", "name_filter": "gpufleet-gpu",
         "models": ["llama3.2:1b"], "slots": 4},
    ]


@pytest.fixture
async def live(redis_url: str, redis: Any) -> AsyncIterator[tuple[str, str, str]]:
    novita = LoopbackServer(create_novita_app(SimNovitaConfig(seed=1)), name="sim-novita")
    surf = LoopbackServer(
        create_surf_app(SimSurfConfig(workspaces=["gpufleet-gpu-01", "other-vm"], seed=2)),
        name="sim-surf",
    )
    await novita.start()
    await surf.start()
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        providers={
            "novita": {"base_url": novita.url, "api_key": "sim-novita-key"},
            "surf": {"base_url": f"{surf.url}/v1/workspace", "api_token": "sim-surf-token"},
        },
        pools=pools(),
    )
    app = create_app(settings)
    server = LoopbackServer(app, name="gpufleet")
    await server.start()
    keys = app.state.services.apikeys
    _, admin = await keys.create("cli", role="admin")
    _, user = await keys.create("someone", role="user")
    try:
        yield server.url, admin, user
    finally:
        await server.stop()
        await surf.stop()
        await novita.stop()


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, cli, list(args))


async def test_instances_lists_every_provider_a_pool_uses(live: tuple[str, str, str]) -> None:
    url, admin, _ = live
    auth = ["--url", url, "--key", admin]
    empty = await invoke("instances", *auth, "--json")
    assert empty.exit_code == 0, empty.output
    data = json.loads(empty.output)
    assert data["novita"] == []
    assert [(i["name"], i["state"]) for i in data["surf"]] == [("gpufleet-gpu-01", "paused")]

    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": admin}) as client:
        made = await client.post("/api/v1/providers/novita/instances",
                                 json={"pool": "comfy", "name": "comfy-by-hand"})
    assert made.status_code == 201, made.text

    novita = json.loads((await invoke("instances", *auth, "--provider", "novita", "--json")).output)
    assert list(novita) == ["novita"]
    assert [i["name"] for i in novita["novita"]] == ["gpufleet-comfy-by-hand"]
    assert novita["novita"][0]["price_per_hour"] == 0.67

    by_pool = json.loads((await invoke("instances", *auth, "--pool", "llm", "--json")).output)
    assert list(by_pool) == ["surf"]

    table = await invoke("instances", *auth)
    assert table.exit_code == 0, table.output
    assert "novita instances" in table.output
    assert "gpufleet-comfy-by-hand" in table.output
    assert "gpufleet-gpu-01" in table.output
    assert "other-vm" not in table.output


async def test_products_json_and_table(live: tuple[str, str, str]) -> None:
    url, admin, _ = live
    auth = ["--url", url, "--key", admin]
    result = await invoke("products", *auth, "--json")
    assert result.exit_code == 0, result.output
    found = {p["id"]: p for p in json.loads(result.output)}
    assert found["4090.sim"]["price_per_hour"] == pytest.approx(0.67)
    assert found["4090.sim"]["available"] is True
    table = await invoke("products", *auth)
    assert table.exit_code == 0, table.output
    assert "4090.sim" in table.output
    assert "0.67" in table.output


async def test_exit_codes(live: tuple[str, str, str]) -> None:
    url, admin, user = live
    not_admin = await invoke("instances", "--url", url, "--key", user)
    assert not_admin.exit_code == 1
    assert (await invoke("products", "--url", url, "--key", user)).exit_code == 1
    unknown = await invoke("instances", "--url", url, "--key", admin, "--provider", "aws")
    assert unknown.exit_code == 1
    no_pool = await invoke("instances", "--url", url, "--key", admin, "--pool", "nope")
    assert no_pool.exit_code == 1
    down = await invoke("products", "--url", f"http://127.0.0.1:{free_port()}", "--key", admin)
    assert down.exit_code == 3
