"""How long does a Prometheus scrape of ``/metrics`` take with a big fleet?

    python bench/metrics_scrape.py [--scrapes 500] [--pools 10] [--workers 50]

A real gpufleet app (``create_app``, served by uvicorn on loopback) on a real ``redis-server``
(the embedded one) with ``--pools`` static pools of ``--workers`` workers each in the registry
(10 × 50 = 500 workers), the replica holding the leader lock, its fleet gauges set by a
reconcile tick (workers by pool and state, slots, burn rate, queue depth), and every other
collector carrying the series a busy fleet has (task, proxy, boot, provider-call histograms
for every pool, model and operation). Then ``/metrics`` is fetched ``--scrapes`` times over
HTTP, one after another as Prometheus does, and p50 / p99 of the whole request are printed,
with the ratio to the issue's target (p99 ≤ 20 ms). It asserts nothing.

``/metrics`` reads no Redis: the fleet gauges are set by the leader's reconcile tick, so a
scrape only renders what the process already holds, and its cost does not grow with the
number of tasks; it grows with the number of series (pools × states, models, operations).

What made it fast enough: ``*_created`` series are off (``metrics.py``: a third of the series,
which Prometheus does not need), and ``/metrics`` renders with ``api.health.render_metrics``
(the library's text format, byte for byte — a unit test compares — with label blocks cached
and no per-name escaping) instead of ``generate_latest``. Before both: 1,481 series,
p50 12.9 ms, p99 34.3 ms (1.71x the target).

Measured after (2 cores; 500 scrapes, 10 pools × 50 workers, 1,009 series, 78 KB):

    quiet box (load 1.1):  /metrics p50 5.64-6.65 ms, p99 16.1-17.7 ms (0.81-0.88x the target)
                           rendering alone p50 4.6-5.2 ms vs generate_latest 7.1-7.9 ms (0.65x)
    beside a chaos suite:  /metrics p50 6.5-9.9 ms, p99 14.8-25.6 ms (load 2.5-3.4)

The tail (max 70-90 ms) is the machine, not the scrape: rendering alone has the same outliers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

TARGET_P99_MS = 20.0


async def bench(scrapes: int, n_pools: int, per_pool: int) -> None:
    import httpx
    from prometheus_client import REGISTRY, generate_latest

    from gpufleet.api.health import render_metrics
    from gpufleet.app import create_app
    from gpufleet.loopback import LoopbackServer, free_port
    from gpufleet.settings import load_settings
    from gpufleet.store.connection import EmbeddedRedis

    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", port=free_port(), appendfsync="everysec")
        server.start()
        pools = [
            {
                "name": f"pool{i:02d}",
                "provider": "static",
                "engine": "ollama" if i % 2 else "comfyui",
                "models": [f"model-{i}:8b"] if i % 2 else [],
                "slots": 2,
                "price_per_hour": 0.5 + 0.1 * i,
                # loopback ports nobody listens on: probes fail fast, workers stay registered
                "urls": [f"http://127.0.0.1:{1 + i * per_pool + n}" for n in range(per_pool)],
            }
            for i in range(n_pools)
        ]
        settings = load_settings(
            env_file=None,
            redis={"url": server.url, "key_prefix": "bench"},
            pools=pools,
            results={"dir": str(Path(tmp) / "results")},
            # loops run, but slowly: the scrape is what is timed
            workers={"health_interval_s": 3600, "dispatch_interval_s": 3600},
            scaling={"interval_s": 3600},
        )
        app = create_app(settings)
        web = LoopbackServer(app, name="gpufleet-bench")
        await web.start()
        try:
            await asyncio.sleep(2.0)  # let the first health round (500 failing probes) finish
            services = app.state.services
            registry = services.registry
            workers = await registry.list_workers()
            reconciler = services.reconciler
            await reconciler.reconcile_once()  # leader: fleet gauges set from the registry
            models = [m for p in pools for m in p["models"]] + ["other"]
            _busy_fleet_series([p["name"] for p in pools], models)

            async with httpx.AsyncClient(base_url=web.url, timeout=10) as client:
                first = await client.get("/metrics")
                assert first.status_code == 200, first.text
                assert "gpufleet_is_leader 1.0" in first.text
                series = sum(1 for line in first.text.splitlines() if not line.startswith("#"))
                for _ in range(20):  # warm-up
                    await client.get("/metrics")
                times = []
                for _ in range(scrapes):
                    started = time.perf_counter()
                    answer = await client.get("/metrics")
                    times.append((time.perf_counter() - started) * 1000.0)
                    assert answer.status_code == 200
            ours, library = [], []
            for _ in range(scrapes):
                started = time.perf_counter()
                render_metrics(REGISTRY)
                middle = time.perf_counter()
                generate_latest(REGISTRY)
                ours.append((middle - started) * 1000.0)
                library.append((time.perf_counter() - middle) * 1000.0)
            p50, p99 = _p50_p99(times)
            r50, r99 = _p50_p99(ours)
            g50, g99 = _p50_p99(library)
            print(
                f"/metrics: workers={len(workers)} pools={n_pools} series={series} "
                f"bytes={len(first.content)} scrapes={scrapes}: p50 {p50:.2f} ms, "
                f"p99 {p99:.2f} ms, max {max(times):.2f} ms "
                f"(p99 is {p99 / TARGET_P99_MS:.2f}x the {TARGET_P99_MS:g} ms target)\n"
                f"rendering alone: render_metrics p50 {r50:.2f} ms, p99 {r99:.2f} ms; "
                f"prometheus_client.generate_latest p50 {g50:.2f} ms, p99 {g99:.2f} ms "
                f"(render_metrics takes {r50 / g50:.2f}x the time at p50)"
            )
            await reconciler.release()
        finally:
            await web.stop()
            server.stop()


def _p50_p99(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _busy_fleet_series(pool_names: list[str], models: list[str]) -> None:
    """Give every collector the label sets a busy fleet of this size has."""
    from gpufleet import metrics as m

    rng = random.Random(0)
    for kind in ("comfyui", "ollama"):
        m.TASKS_SUBMITTED.labels(kind).inc(1000)
        for outcome in ("succeeded", "failed", "cancelled"):
            m.TASKS_FINISHED.labels(kind, outcome).inc(10)
        for retry in ("yes", "no"):
            m.TASK_ATTEMPTS_FAILED.labels(kind, retry).inc()
        for _ in range(50):
            m.TASK_QUEUE_WAIT.labels(kind).observe(rng.uniform(0, 600))
            m.TASK_RUN.labels(kind).observe(rng.uniform(0, 120))
    actions = ("create", "start", "resume", "stop", "pause", "delete", "hold")
    for pool in pool_names:
        m.BOOT_SECONDS.labels(pool).observe(rng.uniform(30, 300))
        m.observe_cold_start(pool, rng.uniform(10, 300))
        m.SPEND.labels(pool).inc(rng.uniform(1, 50))
        m.COST_PER_TASK.labels(pool).set(rng.uniform(0.01, 0.5))
        for action, outcome in itertools.product(actions, ("ok", "error")):
            m.SCALE_ACTIONS.labels(pool, action, outcome).inc()
    operations = ("create", "start", "stop", "delete", "list", "get", "pause", "resume")
    for provider, op in itertools.product(("novita", "surf"), operations):
        m.PROVIDER_CALLS.labels(provider, op, "ok").inc()
        m.PROVIDER_CALLS.labels(provider, op, "ProviderUnavailable").inc()
        m.PROVIDER_CALL_SECONDS.labels(provider, op).observe(0.3)
    for provider, action in itertools.product(("novita", "surf"), ("adopted", "deleted")):
        m.ORPHANS.labels(provider, action).inc()
    for model in models:
        for outcome in ("ok", "wait_timeout", "worker_failed", "client_gone"):
            m.PROXY_REQUESTS.labels(model, outcome).inc()
        m.PROXY_TTFB.labels(model).observe(0.2)
        m.PROXY_DURATION.labels(model).observe(3.0)
        for direction in ("in", "out"):
            m.PROXY_TOKENS.labels(model, direction).inc(500)


def main() -> None:
    logging.basicConfig(level=logging.CRITICAL)  # probes of the unreachable workers fail
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--pools", type=int, default=10)
    parser.add_argument("--workers", type=int, default=50, help="workers per pool")
    args = parser.parse_args()
    asyncio.run(bench(args.scrapes, args.pools, args.workers))


if __name__ == "__main__":
    main()
