"""``gpufleet demo`` in-process: it starts, its cheat sheet's key works, Ctrl-C stops it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import httpx
import pytest

from gpufleet.demo import (
    NOVITA_POOL,
    SURF_POOL,
    SURF_WORKSPACES,
    Demo,
    DemoError,
    DemoOptions,
    DemoTimings,
    port_is_free,
    run,
)
from gpufleet.engines.simulated.comfyui_app import SimulatedComfyUI
from gpufleet.examples import example_path
from gpufleet.graphs import graph_problems
from gpufleet.loopback import free_port


def options(tmp_path: Path, *, auth: bool = True) -> DemoOptions:
    return DemoOptions(port=free_port(), data_dir=tmp_path, timings=DemoTimings.fast(), auth=auth)


def sheet_key(sheet: str) -> str:
    match = re.search(r"admin API key \(shown once[^)]*\): (\S+)", sheet)
    assert match, sheet
    return match[1]


async def test_cheat_sheet_key_sees_both_pools(tmp_path: Path) -> None:
    async with Demo(options(tmp_path)) as demo:
        sheet = demo.cheat_sheet()
        key = sheet_key(sheet)
        assert f"{demo.url}/ui#key={key}" in sheet
        assert f"export GPUFLEET_URL={demo.url} GPUFLEET_API_KEY={key}" in sheet
        assert f"OLLAMA_HOST={demo.url} ollama run llama3.2:1b" in sheet
        assert str(example_path("txt2img.json")) in sheet
        async with httpx.AsyncClient(base_url=demo.url) as client:
            anonymous = await client.get("/api/v1/pools")
            assert anonymous.status_code == 401
            pools = await client.get("/api/v1/pools", headers={"Authorization": f"Bearer {key}"})
            assert pools.status_code == 200, pools.text
            by_name = {p["name"]: p for p in pools.json()}
            assert set(by_name) == {NOVITA_POOL, SURF_POOL}
            assert (by_name[NOVITA_POOL]["provider"], by_name[NOVITA_POOL]["engine"]) == (
                "novita", "comfyui")
            assert (by_name[SURF_POOL]["provider"], by_name[SURF_POOL]["engine"]) == (
                "surf", "ollama")
            assert by_name[NOVITA_POOL]["min_workers"] == 0
            assert by_name[NOVITA_POOL]["max_workers"] == 3
            # The real provider clients reach the simulated clouds over loopback.
            surf = await client.get("/api/v1/providers/surf/instances",
                                    headers={"X-API-Key": key})
            assert surf.status_code == 200, surf.text
            listed = sorted((i["name"], i["state"]) for i in surf.json()["instances"])
            assert listed == [(name, "paused") for name in SURF_WORKSPACES]
            products = await client.get("/api/v1/providers/novita/products",
                                        headers={"X-API-Key": key})
            assert products.status_code == 200
            assert {p["price_per_hour"] for p in products.json()["products"]} == {0.67, 1.60}
        ips = {ws.ip for ws in demo.surf.workspaces.values()}
        assert len(ips) == len(SURF_WORKSPACES)  # one address per workspace (Linux loopback)
        port = demo.options.port
    assert port_is_free("127.0.0.1", port)


async def test_each_run_prints_a_new_key(tmp_path: Path) -> None:
    async with Demo(options(tmp_path)) as first:
        key1 = first.api_key
    async with Demo(options(tmp_path)) as second:
        assert second.api_key
        assert second.api_key != key1
        async with httpx.AsyncClient(base_url=second.url) as client:
            answer = await client.get("/api/v1/pools", headers={"X-API-Key": second.api_key})
            assert answer.status_code == 200


async def test_no_auth_sheet_has_no_key(tmp_path: Path) -> None:
    async with Demo(options(tmp_path, auth=False)) as demo:
        sheet = demo.cheat_sheet()
        assert "auth is OFF" in sheet
        assert "gpf_" not in sheet
        async with httpx.AsyncClient(base_url=demo.url) as client:
            assert (await client.get("/api/v1/pools")).status_code == 200


async def test_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    async with Demo(options(tmp_path)) as running:
        clash = DemoOptions(port=running.options.port, data_dir=tmp_path / "other",
                            timings=DemoTimings.fast())
        with pytest.raises(DemoError, match="in use"):
            await Demo(clash).start()


async def test_sigint_stops_everything(tmp_path: Path) -> None:
    printed: list[str] = []
    opts = options(tmp_path)

    def out(text: str) -> None:
        printed.append(text)
        if len(printed) == 1:  # the cheat sheet: now press Ctrl-C
            asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGINT)

    await asyncio.wait_for(run(opts, out), timeout=30)
    assert sheet_key(printed[0])
    assert printed[-1].startswith("stopping")
    assert port_is_free("127.0.0.1", opts.port)
    assert not (tmp_path / "redis" / "redis.pid").exists() or not _alive(tmp_path)


def _alive(data_dir: Path) -> bool:
    try:
        pid = int((data_dir / "redis" / "redis.pid").read_text())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


def test_example_graph_is_a_valid_comfyui_graph() -> None:
    graph = json.loads(example_path("txt2img.json").read_text())
    assert graph_problems(graph) == []
    assert any(node["class_type"] == "SaveImage" for node in graph.values())


async def test_example_graph_runs_on_the_simulated_comfyui() -> None:
    graph = json.loads(example_path("txt2img.json").read_text())
    sim = SimulatedComfyUI()
    try:
        transport = httpx.ASGITransport(app=sim)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            answer = await client.post("/prompt", json={"prompt": graph})
            assert answer.status_code == 200, answer.text
            prompt_id = answer.json()["prompt_id"]
            for _ in range(200):
                history = (await client.get(f"/history/{prompt_id}")).json()
                if history:
                    break
                await asyncio.sleep(0.01)
        images = history[prompt_id]["outputs"]["9"]["images"]
        assert images[0]["filename"].startswith("gpufleet-demo")
    finally:
        await sim.aclose()
