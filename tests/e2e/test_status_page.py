"""The /ui status page in headless Chromium against a live gpufleet on loopback."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from gpufleet.app import create_app
from gpufleet.domain import WorkerState
from gpufleet.loopback import LoopbackServer
from gpufleet.settings import load_settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
]

pytestmark = pytest.mark.timeout(120)


async def chromium(url: str, tmp_path: Path, *extra: str) -> str:
    assert CHROMIUM, "Debian's chromium is needed (.ci/run installs it)"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        *extra,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return out.decode()


async def test_page_shows_a_worker_booting_then_ready(
    redis_url: str, redis: object, tmp_path: Path
) -> None:
    app = create_app(load_settings(env_file=None, redis={"url": redis_url}))
    server = LoopbackServer(app, name="gpufleet")
    await server.start()
    try:
        components = app.state.components
        _, key = await components.extras["apikeys"].create("viewer", role="admin")
        await components.registry.register(
            pool="comfy", provider="novita", slots=1, worker_id="comfy-1", state=WorkerState.booting
        )
        url = f"{server.url}/ui#key={key}&once=1"
        dom = await chromium(url, tmp_path, "--dump-dom")
        assert 'data-loaded="yes"' in dom
        assert 'data-worker="comfy-1"' in dom
        assert 'class="state orange" data-state="booting"' in dom

        assert await components.registry.transition("comfy-1", WorkerState.ready)
        dom = await chromium(url, tmp_path, "--dump-dom")
        assert 'class="state green" data-state="ready"' in dom
        assert key not in dom  # the key left the URL and is not rendered

        shot = tmp_path / "status-page.png"
        await chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1200,800")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 5_000
    finally:
        await server.stop()


async def test_page_is_public_but_asks_for_a_key(api: object) -> None:
    answer = await api.get("/ui", headers={"Authorization": ""})  # type: ignore[attr-defined]
    assert answer.status_code == 200
    assert "API key" in answer.text
    assert "content-security-policy" in answer.headers
