"""``GET /api/v1/history`` and ``gpufleet history export`` on real Redis: the live service's
recorded history as a trace ``gpufleet simulate --trace`` replays.

The app runs as in test_history_live.py (``create_app``, lifespan running, real Redis), with
API keys on; the round trip the issue asks for runs after a live ``gpufleet demo`` burst
(the demo driven as in test_demo_loop.py): export with the CLI, write the file, replay it
through ``gpufleet simulate --trace --config --json`` with a config written here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from gpufleet.cli import app as cli
from gpufleet.demo import NOVITA_POOL, Demo, DemoOptions, DemoTimings
from gpufleet.examples import example_path
from gpufleet.loopback import LoopbackServer, free_port
from gpufleet.scaling.history import bucket_of, bucket_value
from gpufleet.scaling.sim.traces import read_trace
from gpufleet.settings import load_settings
from gpufleet.store.history import HistoryStore

pytestmark = pytest.mark.timeout(60)
runner = CliRunner()
GRAPH = {"1": {"class_type": "KSampler", "inputs": {"seed": 1}}}
POOLS = [
    {"name": "comfy", "provider": "static", "engine": "comfyui", "urls": ["http://127.0.0.1:1"]},
    {"name": "llm", "provider": "static", "engine": "ollama", "models": ["llama3.2"],
     "urls": ["http://127.0.0.1:1"]},
]


@pytest.fixture
async def api(redis_url: str, redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Any]:
    """The whole app with two static pools, API keys on; the client holds an admin key,
    ``api.user_key`` is a user key."""
    from gpufleet.app import create_app

    settings = load_settings(
        env_file=None, redis={"url": redis_url}, results={"dir": tmp_path / "results"},
        pools=POOLS,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        store = app.state.services.apikeys
        _, admin_key = await store.create("admin", role="admin")
        _, user_key = await store.create("user", role="user")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gpufleet",
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as client:
            client.services = app.state.services  # type: ignore[attr-defined]
            client.user_key = user_key  # type: ignore[attr-defined]
            yield client


async def test_admins_get_the_recorded_traffic_as_a_trace_read_trace_parses(
    api: Any, tmp_path: Path
) -> None:
    history: HistoryStore = api.services.history
    for _ in range(5):
        answer = await api.post("/api/v1/tasks", json={"kind": "comfyui", "payload": GRAPH,
                                                       "pool": "comfy"})
        assert answer.status_code == 202, answer.text
    for seconds in (2.0, 2.0, 3.0, 40.0, 300.0):
        history.note_service("comfy", seconds)
    history.note_arrival("llm", 3)
    history.note_service("llm", 1.0, model="llama3.2")
    await history.flush()

    answer = await api.get("/api/v1/history", params={"since": "1h"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    assert answer.text.splitlines()[0] == "arrival,service_s,model,pool,kind"
    path = tmp_path / "trace.csv"
    path.write_text(answer.text)
    rows = read_trace(path)
    assert Counter(r.pool for r in rows) == {"comfy": 5, "llm": 3}
    assert {(r.pool, r.kind) for r in rows} == {("comfy", "comfyui"), ("llm", "ollama")}
    comfy = [r.service_s for r in rows if r.pool == "comfy"]
    assert Counter(bucket_of(s) for s in comfy) == Counter(
        bucket_of(s) for s in (2.0, 2.0, 3.0, 40.0, 300.0)
    )
    # one pool, the default look-back (7d), and the same answer again (deterministic)
    only = await api.get("/api/v1/history", params={"pool": "comfy"})
    assert only.status_code == 200
    assert [line.split(",")[3] for line in only.text.splitlines()[1:]] == ["comfy"] * 5
    assert (await api.get("/api/v1/history", params={"pool": "comfy"})).text == only.text
    for since in ("30m", "12h", "7d", "3600", "604800"):
        assert (await api.get("/api/v1/history", params={"since": since})).status_code == 200


async def test_user_keys_bad_since_and_unknown_pools_are_refused(api: Any) -> None:
    user = {"Authorization": f"Bearer {api.user_key}"}
    answer = await api.get("/api/v1/history", headers=user)
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "forbidden"
    assert (await api.get("/api/v1/history", headers={"Authorization": ""})).status_code == 401
    for since in ("8d", "604801", "0", "soon", "-1h", "7w"):
        answer = await api.get("/api/v1/history", params={"since": since})
        assert answer.status_code == 422, (since, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "validation_error"
        assert [f["field"] for f in error["fields"]] == ["since"]
    answer = await api.get("/api/v1/history", params={"pool": "nope"})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


async def test_the_cli_prints_the_csv(
    redis_url: str, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """``gpufleet history export`` against a live server on loopback (the CLI in a thread)."""
    from gpufleet.app import create_app

    app = create_app(load_settings(
        env_file=None, redis={"url": redis_url}, results={"dir": tmp_path / "r"}, pools=POOLS,
    ))
    server = LoopbackServer(app, name="gpufleet")
    await server.start()
    try:
        components = app.state.services
        history: HistoryStore = components.history
        history.note_arrival("comfy", 2)
        history.note_service("comfy", 5.0)
        await history.flush()
        _, admin = await components.apikeys.create("cli", role="admin")
        _, user = await components.apikeys.create("cli-user", role="user")
        args = ["history", "export", "--url", server.url, "--pool", "comfy", "--since", "2h"]
        result = await asyncio.to_thread(runner.invoke, cli, [*args, "--key", admin])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        service = f"{bucket_value(bucket_of(5.0)):.3f}"  # the bucket's representative
        assert lines[0] == "arrival,service_s,model,pool,kind"
        rows = [line.split(",")[1:] for line in lines[1:]]
        assert rows == [[service, "", "comfy", "comfyui"]] * 2
        refused = await asyncio.to_thread(runner.invoke, cli, [*args, "--key", user])
        assert refused.exit_code == 1
        bad = await asyncio.to_thread(runner.invoke, cli, [*args[:-1], "9d", "--key", admin])
        assert bad.exit_code == 1
        assert "since" in bad.stderr
    finally:
        await server.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_export_after_a_live_demo_burst_replays_through_simulate(tmp_path: Path) -> None:
    """The issue's round trip: a burst on the running demo, ``gpufleet history export``,
    ``gpufleet simulate --trace`` with a config of the same pool: every exported arrival is a
    replayed job."""
    timings = dataclasses.replace(DemoTimings.fast(), idle_timeout_s=2.0)
    options = DemoOptions(port=free_port(), data_dir=tmp_path / "demo", timings=timings)
    graph = json.loads(example_path("txt2img.json").read_text())
    tasks = 12
    async with Demo(options) as demo:
        headers = {"Authorization": f"Bearer {demo.api_key}"}
        async with httpx.AsyncClient(base_url=demo.url, headers=headers, timeout=30) as client:
            ids = []
            for n in range(tasks):
                answer = await client.post("/api/v1/tasks", json={
                    "kind": "comfyui", "payload": graph, "workflow_id": f"burst-{n}"})
                assert answer.status_code in (201, 202), answer.text
                ids.append(answer.json()["id"])

            async def served() -> bool:
                listed = (await client.get("/api/v1/tasks", params={"limit": 100})).json()
                done = [t for t in listed["tasks"] if t["id"] in ids and t["status"] in (
                    "succeeded", "failed", "cancelled")]
                if len(done) < tasks:
                    return False
                # the replicas' history-flush loop has written the arrivals
                trace = await client.get("/api/v1/history", params={"since": "1h"})
                return len(trace.text.splitlines()) - 1 >= tasks

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not await served():
                assert loop.time() < deadline, f"the {tasks} tasks never finished and recorded"
                await asyncio.sleep(0.2)

        exported = await asyncio.to_thread(runner.invoke, cli, [
            "history", "export", "--url", demo.url, "--key", demo.api_key, "--since", "1h"])
    assert exported.exit_code == 0, exported.output
    trace = tmp_path / "trace.csv"
    trace.write_text(exported.stdout)
    rows = read_trace(trace)
    assert len(rows) == tasks
    assert {r.pool for r in rows} == {NOVITA_POOL}

    config = tmp_path / "config.toml"
    config.write_text(f"""
[[pools]]
name = "{NOVITA_POOL}"
provider = "novita"
engine = "comfyui"
product_id = "rtx-4090-24g"
image = "ghcr.io/example/comfyui:latest"
max_workers = 3
price_per_hour = 0.67
""")
    replay = await asyncio.to_thread(runner.invoke, cli, [
        "simulate", "--trace", str(trace), "--config", str(config), "--json"])
    assert replay.exit_code == 0, replay.output
    doc = json.loads(replay.stdout)
    (pool,) = doc["pools"]
    assert (pool["name"], pool["jobs"]) == (NOVITA_POOL, len(rows))
