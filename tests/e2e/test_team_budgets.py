"""Teams end to end: gpufleet (``create_app`` under uvicorn) with static pools of simulated
ComfyUI and Ollama workers. Usage is attributed to teams (slot time × price ÷ slots, and
tokens); a spent budget answers 402 on REST, ``/api/chat`` (the ollama client's
ResponseError) and ``/v1/chat/completions`` (openai's APIStatusError); work accepted before
the budget ran out still finishes; attributed + overhead = each pool's spend.

Nothing asserts a duration; the ComfyUI steps take 1 s only so that three submissions fit
before the first task ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gpufleet.app import create_app
from gpufleet.engines.simulated import (
    ComfyUIConfig,
    OllamaConfig,
    SimulatedComfyUI,
    SimulatedOllama,
)
from gpufleet.loopback import LoopbackServer
from gpufleet.settings import load_settings
from tests.servers import serve

pytestmark = pytest.mark.timeout(90)
GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}},
}
MESSAGES = [{"role": "user", "content": "hi"}]


class Gpufleet:
    def __init__(self, url: str, app: Any) -> None:
        self.url = url
        self.app = app
        self.keys: dict[str, str] = {}

    def client(self, who: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {self.keys[who]}"}, timeout=30
        )


@pytest.fixture
async def gpufleet(
    redis_url: str, redis: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Gpufleet]:
    comfy = SimulatedComfyUI(ComfyUIConfig(step_time_s=1.0, default_steps=1))
    llm = SimulatedOllama(OllamaConfig(models=("llama3.2",), first_token_s=0.01))
    servers = [LoopbackServer(comfy, name="sim-comfy"), LoopbackServer(llm, name="sim-llm")]
    urls = [await s.start() for s in servers]
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        results={"dir": tmp_path / "results"},
        auth={"key_cache_ttl_s": 0},
        usage={"flush_interval_s": 0.5},
        scaling={"interval_s": 0.2},
        queue={"heartbeat_interval_s": 0.2},
        workers={"health_interval_s": 0.2, "dispatch_interval_s": 0.1},
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui", "slots": 1,
             "urls": urls[:1], "price_per_hour": 18.0},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 2,
             "models": ["llama3.2"], "urls": urls[1:], "price_per_hour": 36.0},
        ],
    )
    app = create_app(settings)
    try:
        async with serve(app) as url:
            fleet = Gpufleet(url, app)
            store = app.state.services.apikeys
            _, fleet.keys["admin"] = await store.create("admin", role="admin")
            async with fleet.client("admin") as admin:
                for team, budget in (("ml", 1e-6), ("art", 1e-6), ("ops", None)):
                    body = {"name": team, "budget_day_usd": budget}
                    assert (await admin.post("/api/v1/teams", json=body)).status_code == 201
                    made = await admin.post("/api/v1/keys", json={"name": team, "team": team})
                    fleet.keys[team] = made.json()["key"]
                for _ in range(500):
                    workers = (await admin.get("/api/v1/workers")).json()
                    if len(workers) == 2 and all(w["state"] == "ready" for w in workers):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"workers never ready: {workers}")
            yield fleet
    finally:
        for server in servers:
            await server.stop()
        await comfy.aclose()


async def finished(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    for _ in range(60):
        body: dict[str, Any] = (
            await api.get(f"/api/v1/tasks/{task_id}/wait", params={"timeout_s": 1})
        ).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
    raise AssertionError(f"task {task_id} never finished")


async def test_proxy_budget_402_in_ollama_and_openai_shapes(gpufleet: Gpufleet) -> None:
    headers = {"Authorization": f"Bearer {gpufleet.keys['ml']}"}
    async with ollama.AsyncClient(host=gpufleet.url, headers=headers) as client:
        first = await client.chat(model="llama3.2", messages=MESSAGES)
        assert first.eval_count  # served: the budget was not spent yet
        with pytest.raises(ollama.ResponseError) as refused:
            await client.chat(model="llama3.2", messages=MESSAGES)
    assert refused.value.status_code == 402
    assert "budget" in refused.value.error
    oai = openai.AsyncOpenAI(base_url=gpufleet.url + "/v1", api_key=gpufleet.keys["ml"],
                             max_retries=0)
    with pytest.raises(openai.APIStatusError) as status_error:
        await oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
    await oai.close()
    assert status_error.value.status_code == 402
    assert status_error.value.response.json()["error"]["code"] == "budget_exhausted"
    async with gpufleet.client("ml") as ml:
        rest = await ml.post("/api/v1/tasks", json={"payload": GRAPH})
        assert rest.status_code == 402
        assert rest.json()["error"]["code"] == "budget_exhausted"
        # A user key sees its own usage, tokens included, and no pool internals.
        mine = (await ml.get("/api/v1/usage", params={"group_by": "key"})).json()
    assert mine["overhead"] is None
    assert mine["total"]["requests"] == 1
    assert mine["total"]["tokens_out"] == first.eval_count
    assert mine["total"]["usd"] > 0
    # Another team without a budget is served as before.
    other = {"Authorization": f"Bearer {gpufleet.keys['ops']}"}
    async with ollama.AsyncClient(host=gpufleet.url, headers=other) as client:
        assert (await client.chat(model="llama3.2", messages=MESSAGES)).eval_count


async def test_budget_runs_out_mid_burst_and_nothing_running_is_killed(
    gpufleet: Gpufleet,
) -> None:
    async with gpufleet.client("art") as art, gpufleet.client("admin") as admin:
        accepted = []
        for _ in range(3):  # before the first ends (1 s each, one slot): nothing spent yet
            r = await art.post("/api/v1/tasks", json={"payload": GRAPH})
            assert r.status_code == 202, r.text
            accepted.append(r.json()["id"])
        assert (await finished(art, accepted[0]))["status"] == "succeeded"
        refused = await art.post("/api/v1/tasks", json={"payload": GRAPH})
        assert refused.status_code == 402
        assert refused.json()["error"]["code"] == "budget_exhausted"
        # The two accepted after it and before the budget ran out still run to the end.
        assert [(await finished(art, t))["status"] for t in accepted[1:]] == ["succeeded"] * 2
        async with gpufleet.client("ops") as ops_client:
            ops = await ops_client.post("/api/v1/tasks", json={"payload": GRAPH})
        assert ops.status_code == 202
        await finished(admin, ops.json()["id"])

        async def pools() -> dict[str, Any]:
            answer = await admin.get("/api/v1/usage", params={"group_by": "pool"})
            return answer.json()  # type: ignore[no-any-return]

        # The leader accounts spend every 0.2 s; usage of a team without a budget is
        # written with the next flush (0.5 s here).
        for _ in range(200):
            report = await pools()
            overhead = {p["pool"]: p for p in report["overhead"]}
            rows = {r["group"]: r for r in report["rows"]}
            comfy = overhead.get("comfy", {})
            flushed = rows.get("comfy", {}).get("tasks") == 4
            if flushed and comfy.get("spend_usd", 0) > comfy["attributed_usd"]:
                break
            await asyncio.sleep(0.1)
        assert rows["comfy"]["tasks"] == 4
        for pool, numbers in overhead.items():
            attributed = rows[pool]["usd"] if pool in rows else 0.0
            assert numbers["attributed_usd"] == pytest.approx(attributed, abs=1e-5)
            assert numbers["spend_usd"] - numbers["overhead_usd"] == pytest.approx(
                attributed, abs=1e-5
            )
        assert overhead["comfy"]["overhead_usd"] > 0  # idle time is shown, not hidden
        by_team = (await admin.get("/api/v1/usage", params={"group_by": "team"})).json()
        teams = {r["group"]: r for r in by_team["rows"]}
        assert teams["art"]["tasks"] == 3
        assert teams["ops"]["tasks"] == 1
        # A 1 s render at $18/h on a one-slot worker: at least half a cent each.
        assert teams["art"]["usd"] >= 3 * 18.0 / 3600
    spent = REGISTRY.get_sample_value("gpufleet_team_spend_usd_total", {"team": "art"})
    assert spent is not None
    assert spent >= teams["art"]["usd"] - 1e-6  # the API rounds to 6 decimals
