"""The /ui status page in headless Chromium against a live gpufleet on loopback.

Two ways to drive Debian's chromium, neither downloads a browser: ``--dump-dom`` /
``--screenshot`` render a page once; a page kept open is read over the DevTools protocol
(``--remote-debugging-port``, a websocket; ``Cdp`` below) while the fleet changes under it,
which is how the live updates (SSE) are checked.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from gpufleet.app import create_app
from gpufleet.demo import NOVITA_POOL, Demo, DemoOptions, DemoTimings
from gpufleet.domain import WorkerState
from gpufleet.examples import example_path
from gpufleet.loopback import LoopbackServer, free_port
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
        components = app.state.services
        _, key = await components.apikeys.create("viewer", role="admin")
        await components.registry.register(
            pool="comfy", provider="novita", slots=1, worker_id="comfy-1", state=WorkerState.booting
        )
        usage = components.usage
        await usage.record(owner_team="ml", key="k1", pool="comfy", model="", kind="tasks",
                           gpu_s=7200.0, usd=1.5)
        await usage.flush()
        url = f"{server.url}/ui#key={key}&once=1"
        dom = await chromium(url, tmp_path, "--dump-dom")
        assert 'data-loaded="yes"' in dom
        assert 'data-worker="comfy-1"' in dom
        # The admin's usage panel: the team's month so far, and the pool's overhead.
        assert '<div id="usage-panel">' in dom
        row = '<tr data-team="ml"><td>ml</td><td>0</td><td>1</td><td>2.00</td><td>1.5000</td>'
        assert row in dom
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


class Cdp:
    """The few DevTools-protocol calls the test needs, over one page's websocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        await self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == n:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result

    async def eval(self, expression: str) -> Any:
        answer = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer["result"].get("value")


@asynccontextmanager
async def open_page(url: str, tmp_path: Path) -> AsyncIterator[Cdp]:
    """Headless chromium with ``url`` open, kept open; yields the page's DevTools session."""
    assert CHROMIUM, "Debian's chromium is needed (.ci/run installs it)"
    profile = tmp_path / "live-profile"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *[f for f in FLAGS if not f.startswith("--virtual-time")],
        f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1200,900",
        url, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().count("\n") >= 1:
                break
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with httpx.AsyncClient() as http:
            for _ in range(100):
                pages = [t for t in (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
                         if t["type"] == "page"]
                if pages:
                    break
                await asyncio.sleep(0.05)
        async with websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:
            yield Cdp(ws)
    finally:
        proc.terminate()
        await proc.wait()


# Installed in the page: remembers every worker state, task status and event action the page
# ever rendered, so a state shown only between two polls of the test is not missed.
RECORDER = """
window.__seen = {workers: {}, tasks: {}, actions: []};
const note = () => {
  document.querySelectorAll("tr[data-worker]").forEach((tr) => {
    const s = tr.querySelector("[data-state]"); if (!s) return;
    const all = window.__seen.workers[tr.dataset.worker] ||= [];
    if (all[all.length - 1] !== s.dataset.state) all.push(s.dataset.state);
  });
  document.querySelectorAll("tr[data-task]").forEach((tr) => {
    window.__seen.tasks[tr.dataset.task] = tr.querySelector("[data-status]").dataset.status;
  });
  document.querySelectorAll("#events tr[data-action]").forEach((tr) => {
    const a = tr.dataset.kind + ":" + tr.dataset.action;
    if (!window.__seen.actions.includes(a)) window.__seen.actions.push(a);
  });
};
new MutationObserver(note).observe(document.body, {subtree: true, childList: true});
note();
true
"""


async def test_page_follows_a_burst_live(tmp_path: Path) -> None:
    """A newcomer's view of ``gpufleet demo``: the page stays open while a burst goes through;
    it shows the pool scale up (orange, then green), tasks queue and finish, the scale events
    and spend, without a reload."""
    timings = dataclasses.replace(DemoTimings.fast(), novita_pull_s=1.5, idle_timeout_s=30.0)
    options = DemoOptions(port=free_port(), data_dir=tmp_path / "demo", timings=timings)
    async with Demo(options) as demo, open_page(f"{demo.url}/ui#key={demo.api_key}",
                                                 tmp_path) as page:
        loop = asyncio.get_running_loop()

        async def until(expression: str, what: str) -> Any:
            deadline = loop.time() + 60
            while not (value := await page.eval(expression)):
                assert loop.time() < deadline, f"the page never showed {what}"
                await asyncio.sleep(0.1)
            return value

        await until("document.body.dataset.loaded === 'yes'", "the fleet")
        assert await page.eval("window.__seen === undefined")
        await page.eval(RECORDER)
        # the SURF workspaces are there (paused, red); the Novita pool has no worker yet
        before = set(await page.eval(
            "[...document.querySelectorAll('tr[data-worker]')].map((tr) => tr.dataset.worker)"))
        assert await page.eval(
            "document.querySelector('tr[data-worker] .red[data-state=paused]') !== null")

        graph = json.loads(example_path("txt2img.json").read_text())
        async with httpx.AsyncClient(base_url=demo.url, timeout=30, headers={
                "Authorization": f"Bearer {demo.api_key}"}) as client:
            ids = []
            for n in range(3):
                answer = await client.post("/api/v1/tasks", json={
                    "kind": "comfyui", "payload": graph, "workflow_id": f"ui-{n}"})
                assert answer.status_code in (201, 202), answer.text
                ids.append(answer.json()["id"])

        await until("Number(document.getElementById('queued')?.textContent) > 0",
                    "tasks queued")
        done = " && ".join(f"window.__seen.tasks[{json.dumps(i)}] === 'succeeded'" for i in ids)
        await until(done, "every task succeeded")
        await until("document.querySelector('tr[data-worker] .green[data-state=ready]') !== null",
                    "a ready worker in green")
        seen = await page.eval("window.__seen")
        # each new worker was shown transitioning (orange) before it was shown ready (green)
        new = {w: states for w, states in seen["workers"].items() if w not in before}
        assert new, seen
        assert any("ready" in states for states in new.values()), new
        for worker, states in new.items():
            if "ready" in states:
                shown_first = states[: states.index("ready")]
                assert set(shown_first) & {"provisioning", "booting"}, (worker, states)
        assert "scale:create" in seen["actions"], seen
        assert await page.eval(
            f"document.querySelector('tr[data-pool={json.dumps(NOVITA_POOL)}]') !== null")
        await until("parseFloat(document.getElementById('spent').textContent.slice(1)) > 0",
                    "spend above zero")
        shot = await page.call("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        (tmp_path / "status-page-burst.png").write_bytes(png)
