"""gpufleet's task queue next to saq and arq: same machine, same Redis, one run.

    python bench/queue_throughput.py [--tasks 20000] [--concurrency 32] [--rate 100]

Creates ``bench/.venvs/queues`` (``pip install saq arq redis typing_extensions``) on
first use, starts its own redis-server (``EmbeddedRedis``, AOF ``appendfsync everysec``
for every contender), and runs each contender in its own process:

- **enqueue/s**: ``--tasks`` no-op tasks enqueued by 32 concurrent producers;
- **drain/s**: those tasks run by one consumer process with ``--concurrency`` slots.
  gpufleet's consumer is shaped like the dispatcher: it leases up to its free slots
  (``TaskQueue.lease(limit=free)``), runs a heartbeat task beside every task (every
  ``heartbeat_interval_s``), acks, and sleeps on the ``wake`` channel when idle;
  saq: ``Worker(concurrency=…)``; arq: ``Worker(max_jobs=…)``, defaults otherwise;
- **pickup p50/p99**: enqueue → start of the function, at ``--rate`` tasks/s for
  ``--latency-seconds`` with the consumer idle between tasks (arq polls every 0.5 s by
  default, which is its design; saq blocks on BLMOVE; gpufleet wakes on PUBLISH);
- **HTTP POST /api/v1/tasks**: ``hey`` (Debian package) with 32 connections against
  uvicorn serving the tasks router (auth off, one process).

It prints one table plus the ratios the targets are stated in; it asserts nothing.
Targets: drain ≥ 0.8× saq and ≥ 4× arq; pickup p50 ≤ 5 ms; HTTP submit ≥ 500/s on 2 cores.

First full run (2 shared cores, defaults, 2 min 11 s):

| queue | enqueue/s | drain/s | pickup p50 ms | pickup p99 ms |
|---|---|---|---|---|
| gpufleet | 3925 | 1649 | 2.48 | 3.76 |
| saq | 5490 | 1246 | 1.63 | 2.57 |
| arq | 3393 | 321 | 273.13 | 499.63 |

drain gpufleet/saq = 1.32x, gpufleet/arq = 5.14x; enqueue gpufleet/saq = 0.71x,
gpufleet/arq = 1.16x; HTTP POST /api/v1/tasks = 904/s (6400 x 202).
Where enqueue time goes: the enqueue script costs ~77 µs inside Redis (HSET of ~20
fields, 3 ZADDs, counters, XADD, 2 PUBLISHes); the rest is redis-py packing ~18
arguments plus building the returned ``Task``. Short runs (--tasks 1000-2000) swing
±40%.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venvs" / "queues"
VENV_PYTHON = VENV / "bin" / "python"
PACKAGES = ["saq", "arq", "redis", "typing_extensions"]
NOOP_GRAPH_CLASS = "Noop"


# -- shared by every part (stdlib only: the saq/arq venv cannot import gpufleet) ----------


async def run_concurrently(n: int, workers: int, make: Callable[[int], Awaitable[Any]]) -> float:
    """Run ``make(i)`` for i < n with ``workers`` concurrent callers; returns calls/s."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await make(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return n / (time.perf_counter() - start)


async def paced(n: int, rate: float, make: Callable[[int], Awaitable[Any]]) -> None:
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await make(i)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Tally:
    """Counts finished no-ops and pickup latencies; ``done`` fires at ``target``."""

    def __init__(self) -> None:
        self.count = 0
        self.target = -1
        self.latencies: list[float] = []
        self.done = asyncio.Event()

    def expect(self, target: int) -> None:
        self.count, self.target, self.latencies = 0, target, []
        self.done.clear()

    def started(self, enqueued_at: float | None) -> None:
        if enqueued_at is not None:
            self.latencies.append(time.time() - enqueued_at)

    def finished(self) -> None:
        self.count += 1
        if self.count == self.target:
            self.done.set()


def result(enqueue: float, drain: float, tally: Tally) -> dict[str, float]:
    return {
        "enqueue_per_s": enqueue,
        "drain_per_s": drain,
        "pickup_p50_ms": percentile(tally.latencies, 0.5) * 1000,
        "pickup_p99_ms": percentile(tally.latencies, 0.99) * 1000,
        "pickup_n": len(tally.latencies),
    }


# -- gpufleet ----------------------------------------------------------------------------


class Dispatcher:
    """The shape of gpufleet's dispatcher: lease up to the free slots, heartbeat, ack."""

    def __init__(self, queue: Any, slots: int, heartbeat_s: float, tally: Tally) -> None:
        self.queue, self.free, self.heartbeat_s, self.tally = queue, slots, heartbeat_s, tally
        self.slot_freed = asyncio.Event()
        self.wake = asyncio.Event()
        self.running: set[asyncio.Task[None]] = set()

    async def listen(self) -> None:
        pubsub = self.queue.redis.pubsub()
        await pubsub.subscribe(self.queue.keys.wake())
        async for message in pubsub.listen():
            if message["type"] == "message":
                self.wake.set()

    async def heartbeat(self, lease: Any) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.queue.heartbeat(lease.task_id, lease.token)

    async def work(self, lease: Any) -> None:
        payload = lease.task.payload or {}
        self.tally.started(payload["1"]["inputs"].get("t"))
        beat = asyncio.create_task(self.heartbeat(lease))
        try:
            await asyncio.sleep(0)  # the no-op
        finally:
            beat.cancel()
        await self.queue.ack(lease.task_id, lease.token, None)
        self.free += 1
        self.slot_freed.set()
        self.tally.finished()

    async def dispatch(self) -> None:
        while True:
            if self.free == 0:
                self.slot_freed.clear()
                await self.slot_freed.wait()
                continue
            self.wake.clear()
            leases = await self.queue.lease("bench", kinds=["comfyui"], limit=self.free)
            if not leases:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 1.0)
                continue
            for lease in leases:
                self.free -= 1
                task = asyncio.create_task(self.work(lease))
                self.running.add(task)
                task.add_done_callback(self.running.discard)


async def gpufleet_part(args: argparse.Namespace) -> dict[str, float]:
    from gpufleet.settings import QueueSettings
    from gpufleet.store.connection import connect
    from gpufleet.store.queue import TaskQueue
    from gpufleet.tasks import TaskSubmit

    redis = connect(args.redis)
    settings = QueueSettings()
    queue = TaskQueue(redis, settings, "bench")
    tally = Tally()
    spec = TaskSubmit(payload={"1": {"class_type": NOOP_GRAPH_CLASS, "inputs": {}}})
    enqueue_rate = await run_concurrently(args.tasks, 32, lambda _: queue.enqueue(spec))

    consumer = Dispatcher(queue, args.concurrency, settings.heartbeat_interval_s, tally)
    tally.expect(args.tasks)
    listener = asyncio.create_task(consumer.listen())
    start = time.perf_counter()
    dispatcher = asyncio.create_task(consumer.dispatch())
    await asyncio.wait_for(tally.done.wait(), 300)
    drain_rate = args.tasks / (time.perf_counter() - start)

    n = int(args.rate * args.latency_seconds)
    tally.expect(n)

    async def submit(_: int) -> None:
        graph = {"1": {"class_type": NOOP_GRAPH_CLASS, "inputs": {"t": time.time()}}}
        await queue.enqueue(TaskSubmit(payload=graph))

    await paced(n, args.rate, submit)
    await asyncio.wait_for(tally.done.wait(), 300)
    dispatcher.cancel()
    listener.cancel()
    await asyncio.gather(dispatcher, listener, return_exceptions=True)
    await redis.aclose()
    return result(enqueue_rate, drain_rate, tally)


# -- saq -----------------------------------------------------------------------------------


async def saq_part(args: argparse.Namespace) -> dict[str, float]:
    from saq import Queue, Worker

    queue = Queue.from_url(args.redis)
    await queue.connect()
    tally = Tally()

    async def noop(ctx: Any, *, t: float | None = None) -> None:
        tally.started(t)
        tally.finished()

    enqueue_rate = await run_concurrently(args.tasks, 32, lambda _: queue.enqueue("noop"))
    tally.expect(args.tasks)
    worker = Worker(queue, functions=[("noop", noop)], concurrency=args.concurrency)
    start = time.perf_counter()
    runner = asyncio.create_task(worker.start())
    await asyncio.wait_for(tally.done.wait(), 300)
    drain_rate = args.tasks / (time.perf_counter() - start)

    n = int(args.rate * args.latency_seconds)
    tally.expect(n)
    await paced(n, args.rate, lambda _: queue.enqueue("noop", t=time.time()))
    await asyncio.wait_for(tally.done.wait(), 300)
    await worker.stop()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await queue.disconnect()
    return result(enqueue_rate, drain_rate, tally)


# -- arq -----------------------------------------------------------------------------------


async def arq_part(args: argparse.Namespace) -> dict[str, float]:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    pool = await create_pool(RedisSettings.from_dsn(args.redis))
    tally = Tally()

    async def noop(ctx: Any, t: float | None = None) -> None:
        tally.started(t)
        tally.finished()

    enqueue_rate = await run_concurrently(args.tasks, 32, lambda _: pool.enqueue_job("noop"))
    tally.expect(args.tasks)
    worker = Worker(
        functions=[func(noop, name="noop")],
        redis_pool=pool,
        max_jobs=args.concurrency,
        handle_signals=False,
        log_results=False,
    )
    start = time.perf_counter()
    runner = asyncio.create_task(worker.main())
    await asyncio.wait_for(tally.done.wait(), 300)
    drain_rate = args.tasks / (time.perf_counter() - start)

    n = int(args.rate * args.latency_seconds)
    tally.expect(n)
    await paced(n, args.rate, lambda _: pool.enqueue_job("noop", time.time()))
    await asyncio.wait_for(tally.done.wait(), 300)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    with contextlib.suppress(asyncio.CancelledError):
        await worker.close()
    return result(enqueue_rate, drain_rate, tally)


PARTS = {"gpufleet": gpufleet_part, "saq": saq_part, "arq": arq_part}


# -- HTTP submit ---------------------------------------------------------------------------


def serve_http(redis_url: str, port: int) -> None:
    import contextlib
    from collections.abc import AsyncIterator

    import uvicorn
    from fastapi import FastAPI

    from gpufleet.api.errors import install_error_handlers
    from gpufleet.api.tasks import router
    from gpufleet.settings import load_settings
    from gpufleet.store.connection import connect
    from gpufleet.wiring import build_services

    settings = load_settings(env_file=None, auth={"enabled": False}, redis={"url": redis_url})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(redis_url)
        async with contextlib.AsyncExitStack() as stack:
            app.state.services = await build_services(settings, redis, stack)
            yield
        await redis.aclose()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    uvicorn.Server(config).run()


def http_submit_rate(redis_url: str, requests: int) -> dict[str, float]:
    if not shutil.which("hey"):
        return {"http_submit_per_s": float("nan")}
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-http", "--redis", redis_url, "--port", str(port)]
    )
    url = f"http://127.0.0.1:{port}/api/v1/tasks"
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "?limit=1", timeout=1).read()
                break
            time.sleep(0.05)
        body = json.dumps(
            {"workflow_id": "text_to_image_v1", "priority": 5, "payload": SAMPLE_GRAPH}
        )
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(body)
        out = subprocess.run(
            ["hey", "-n", str(requests), "-c", "32", "-m", "POST", "-T", "application/json"]
            + ["-D", f.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        os.unlink(f.name)
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        accepted = re.search(r"\[202\]\s+(\d+) responses", out)
        return {"http_submit_per_s": rate, "http_202": int(accepted.group(1)) if accepted else 0}
    finally:
        server.terminate()
        server.wait(10)


SAMPLE_GRAPH = {
    "3": {
        "class_type": "KSampler",
        "inputs": {"seed": 42, "steps": 20, "cfg": 7.0, "model": ["4", 0], "positive": ["6", 0]},
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
}


# -- orchestration -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_venv() -> None:
    if VENV_PYTHON.exists():
        return
    print(f"creating {VENV} (pip install {' '.join(PACKAGES)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "-q", *PACKAGES], check=True)


def run_part(name: str, redis_url: str, args: argparse.Namespace) -> dict[str, float]:
    python = sys.executable if name == "gpufleet" else str(VENV_PYTHON)
    cmd = [python, __file__, "--part", name, "--redis", redis_url]
    cmd += ["--tasks", str(args.tasks), "--concurrency", str(args.concurrency)]
    cmd += ["--rate", str(args.rate), "--latency-seconds", str(args.latency_seconds)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} part failed")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--http-requests", type=int, default=6400)  # hey: a multiple of -c 32
    parser.add_argument("--part", choices=sorted(PARTS))
    parser.add_argument("--serve-http", action="store_true")
    parser.add_argument("--redis", default="")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    if args.part:
        print(json.dumps(asyncio.run(PARTS[args.part](args))))
        return
    if args.serve_http:
        serve_http(args.redis, args.port)
        return

    sys.path.insert(0, str(HERE.parent / "src"))
    import redis

    from gpufleet.store.connection import EmbeddedRedis

    ensure_venv()
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as tmp:
        server = EmbeddedRedis(Path(tmp), port=free_port(), appendfsync="everysec")
        with server:
            client = redis.Redis.from_url(server.url)
            results: dict[str, dict[str, float]] = {}
            for name in ("gpufleet", "saq", "arq"):
                client.flushall()
                print(f"running {name} ...", flush=True)
                results[name] = run_part(name, server.url, args)
            client.flushall()
            print("running HTTP submit ...", flush=True)
            http = http_submit_rate(server.url, args.http_requests)
            client.close()
    report(results, http, args)


def report(results: dict[str, dict[str, float]], http: dict[str, float], args: Any) -> None:
    print()
    print(
        f"{args.tasks} no-op tasks, concurrency {args.concurrency}, pickup at {args.rate:g}/s "
        f"for {args.latency_seconds:g} s; redis-server appendfsync everysec"
    )
    print()
    print("| queue | enqueue/s | drain/s | pickup p50 ms | pickup p99 ms |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['enqueue_per_s']:.0f} | {r['drain_per_s']:.0f} | "
            f"{r['pickup_p50_ms']:.2f} | {r['pickup_p99_ms']:.2f} |"
        )
    g, s, a = results["gpufleet"], results["saq"], results["arq"]
    print()
    print(f"drain   gpufleet/saq = {g['drain_per_s'] / s['drain_per_s']:.2f}x (target >= 0.8x)")
    print(f"drain   gpufleet/arq = {g['drain_per_s'] / a['drain_per_s']:.2f}x (target >= 4x)")
    print(f"enqueue gpufleet/saq = {g['enqueue_per_s'] / s['enqueue_per_s']:.2f}x")
    print(f"enqueue gpufleet/arq = {g['enqueue_per_s'] / a['enqueue_per_s']:.2f}x")
    print(f"pickup p50 gpufleet  = {g['pickup_p50_ms']:.2f} ms (target <= 5 ms)")
    print(
        f"HTTP POST /api/v1/tasks = {http['http_submit_per_s']:.0f}/s "
        f"({http.get('http_202', 0)} x 202 of {args.http_requests}; target >= 500/s)"
    )


if __name__ == "__main__":
    main()
