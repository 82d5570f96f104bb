"""Every collector in ``gpufleet.metrics`` is really emitted, with the meaning its help gives.

One ``gpufleet demo`` (fast timings) gets what an operator's day brings: a burst of ComfyUI
tasks on an empty Novita pool (create, boot, cold starts, run, spend), one graph the worker
rejects (a failed attempt), a chat through the proxy that resumes a paused SURF workspace (a
proxy cold start, tokens), and an instance carrying gpufleet's prefix that no pool owns (an
orphan, deleted). ``/metrics`` is scraped over HTTP while that happens: each counter and
histogram must grow, each gauge must show a value at some point. A collector added to
``metrics.py`` and never set makes this test fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

import gpufleet.metrics as metrics
from gpufleet.demo import NOVITA_POOL, OLLAMA_MODEL, SURF_POOL, Demo, DemoOptions, DemoTimings
from gpufleet.examples import example_path
from gpufleet.loopback import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def collectors() -> dict[str, str]:
    """Family name, as the text format shows it, -> type of every collector (an info is a
    gauge named ``*_info`` there)."""
    out = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = value.describe()[0]
            if family.type == "info":
                out[family.name + "_info"] = "gauge"
            else:
                out[family.name] = family.type
    return out


def totals(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Family -> labels -> value: counters' _total, histograms' _count, gauges' own samples."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("gpufleet_"):
            continue
        keep = {"counter": "_total", "histogram": "_count"}.get(family.type, "")
        series = out.setdefault(family.name, {})
        for sample in family.samples:
            if sample.name == family.name + keep:
                series[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    timings = dataclasses.replace(DemoTimings.fast(), idle_timeout_s=2.0)
    async with Demo(DemoOptions(port=free_port(), data_dir=tmp_path, timings=timings)) as running:
        yield running


async def test_every_collector_is_emitted_during_a_demo_day(demo: Demo) -> None:
    kinds = collectors()
    headers = {"Authorization": f"Bearer {demo.api_key}"}
    async with httpx.AsyncClient(base_url=demo.url, headers=headers, timeout=30) as client:
        before = totals((await client.get("/metrics")).text)  # other tests share the registry

        graph = json.loads(example_path("txt2img.json").read_text())
        for n in range(4):
            answer = await client.post("/api/v1/tasks", json={
                "kind": "comfyui", "payload": graph, "workflow_id": f"metrics-{n}"})
            assert answer.status_code in (201, 202), answer.text
        bad = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
        answer = await client.post("/api/v1/tasks", json={"kind": "comfyui", "payload": bad})
        assert answer.status_code in (201, 202), answer.text

        reconciler = demo.app.state.services.reconciler
        spec = demo.settings.pool(NOVITA_POOL) if demo.settings else None
        assert spec is not None
        await reconciler.providers["novita"].create(spec, "retired-pool-1")  # no pool owns it

        chat = asyncio.create_task(client.post("/api/chat", json={
            "model": OLLAMA_MODEL, "stream": False,
            "messages": [{"role": "user", "content": "hi"}]}))

        seen: set[str] = set()
        gauge_values: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while True:
            now = totals((await client.get("/metrics")).text)
            for name, kind in kinds.items():
                series = now.get(name, {})
                if kind == "gauge":
                    if series:
                        gauge_values[name] = max([gauge_values.get(name, 0.0), *series.values()])
                        if gauge_values[name] > 0:
                            seen.add(name)
                elif sum(series.values()) > sum(before.get(name, {}).values()):
                    seen.add(name)
            missing = set(kinds) - seen
            if not missing and chat.done():
                break
            if loop.time() > deadline:
                raise AssertionError(f"never emitted: {sorted(missing)}; gauges {gauge_values}")
            await asyncio.sleep(0.1)
        assert (await chat).status_code == 200

        # The labels say what happened where.
        final = totals((await client.get("/metrics")).text)
        cold = final["gpufleet_cold_starts"]
        assert cold.get((("pool", NOVITA_POOL),), 0) > before.get(
            "gpufleet_cold_starts", {}).get((("pool", NOVITA_POOL),), 0)
        assert cold.get((("pool", SURF_POOL),), 0) > before.get(
            "gpufleet_cold_starts", {}).get((("pool", SURF_POOL),), 0)
        orphans = final["gpufleet_orphan_instances"]
        assert orphans.get((("action", "deleted"), ("provider", "novita")), 0) > 0
        assert (("pool", NOVITA_POOL),) in final["gpufleet_boot_seconds"]
