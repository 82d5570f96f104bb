"""Real processes for the multi-process chaos tests (and ``bench/chaos_report.py``).

``Fleet`` runs, all on loopback:

- one real ``redis-server`` (``EmbeddedRedis`` on a TCP port, AOF with ``appendfsync
  always``) that a test may SIGKILL and start again on the same port and data dir;
- one simulated-cloud process (``python -m tests.chaos.cloud``): a simulated Novita whose
  running instances are simulated Ollama workers, plus a control API that reports the
  cloud's own view (instances, every create, executions per prompt);
- N ``gpufleet serve`` replicas (``python -m gpufleet serve``), each with the same
  ``config.toml`` (short lease, heartbeat, scaling and health intervals; one Novita pool
  of Ollama workers that boot in a fraction of a second) and its own port and log file.

Tasks are Ollama ``generate`` calls whose prompt is a unique marker, so the engines'
own count of each prompt is the number of times the task ran. Process handling is
synchronous (``subprocess``); HTTP and Redis calls are async.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from gpufleet.loopback import free_port
from gpufleet.store.apikeys import ApiKeyStore
from gpufleet.store.connection import EmbeddedRedis
from tests.chaos.cloud import API_KEY, MODEL, PRODUCT

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "gpufleet"
SECRET = "chaos-test-server-secret-0123456789"
POOL = "gpu"
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class FleetConfig:
    replicas: int = 3
    lease_ttl_s: float = 5.0
    heartbeat_s: float = 1.0
    scaling_interval_s: float = 0.5
    health_interval_s: float = 0.5
    dispatch_interval_s: float = 0.5
    max_workers: int = 3
    slots: int = 8
    idle_timeout_s: float = 600.0
    boot_s: float = 0.3
    first_token_s: float = 0.0
    max_attempts: int = 10
    log_level: str = "info"


@dataclass
class Replica:
    index: int
    port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.alive, f"replica {self.index} is running"
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log.open("ab") as out:
            out.write(f"\n==== start #{self.starts} ====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpufleet", "serve", "--config", str(self.config),
                 "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            )

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.alive:
            self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    async def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.index} did not exit in {timeout_s} s")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Submitted:
    ids: dict[str, str] = field(default_factory=dict)  # marker -> task id (202 answered)
    refused: int = 0  # submissions that never got a 202 after their retries


class Fleet:
    """Use as ``async with Fleet(tmp_path, FleetConfig(...)) as fleet``."""

    def __init__(self, workdir: Path, config: FleetConfig | None = None,
                 start: Iterable[int] | None = None) -> None:
        self.dir = workdir
        self.cfg = config or FleetConfig()
        self.redis_server = EmbeddedRedis(workdir / "redis", port=free_port(),
                                          appendfsync="always")
        self.cloud_proc: subprocess.Popen[bytes] | None = None
        self.urls: dict[str, str] = {}
        self.replicas: list[Replica] = []
        self.admin_key = ""
        self.redis: aioredis.Redis | None = None
        self.http = httpx.AsyncClient(timeout=30.0, trust_env=False)
        self._rng = random.Random(4)
        self._start = start

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        try:
            await self.start(self._start)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self, replicas: Iterable[int] | None = None) -> None:
        """Redis, the cloud, an admin key; then ``replicas`` (default: all) until ready."""
        self.dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.redis_server.start)
        self.redis = aioredis.Redis.from_url(self.redis_server.url, decode_responses=True)
        await self._start_cloud()
        store = await ApiKeyStore.open(self.redis, SECRET, prefix=PREFIX)
        _, self.admin_key = await store.create("chaos-admin", role="admin")
        self.http.headers["Authorization"] = f"Bearer {self.admin_key}"
        config = self.dir / "config.toml"
        config.write_text(self.config_toml())
        config.chmod(0o600)
        for i in range(self.cfg.replicas):
            self.replicas.append(Replica(i, free_port(), config, self.dir / f"replica-{i}.log"))
        await self.start_replicas(range(self.cfg.replicas) if replicas is None else replicas)

    async def start_replicas(self, indexes: Iterable[int]) -> None:
        wanted = list(indexes)
        for i in wanted:
            self.replicas[i].start()
        for i in wanted:
            await self.wait_ready(self.replicas[i])

    def _spawn_cloud(self, out: Path) -> subprocess.Popen[bytes]:
        with (self.dir / "cloud.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.cloud", "--out", str(out),
                 "--boot-s", str(self.cfg.boot_s),
                 "--first-token-s", str(self.cfg.first_token_s)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )

    def _stop_cloud(self) -> None:
        if self.cloud_proc is not None:
            self.cloud_proc.terminate()
            try:
                self.cloud_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.cloud_proc.kill()
                self.cloud_proc.wait()

    async def _start_cloud(self) -> None:
        out = self.dir / "cloud.json"
        self.cloud_proc = self._spawn_cloud(out)
        deadline = time.monotonic() + 30
        while not out.exists():
            if self.cloud_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("simulated cloud did not start: "
                                   + (self.dir / "cloud.log").read_text()[-2000:])
            await asyncio.sleep(0.05)
        self.urls = json.loads(out.read_text())

    async def aclose(self) -> None:
        for replica in self.replicas:
            if replica.proc is not None and replica.alive:
                with contextlib.suppress(ProcessLookupError):
                    replica.signal(signal.SIGCONT)
            replica.kill()
        self._stop_cloud()
        await self.http.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await asyncio.to_thread(self.redis_server.stop)

    def config_toml(self) -> str:
        c = self.cfg
        return f"""
[server]
host = "127.0.0.1"
log_level = "{c.log_level}"

[redis]
url = "{self.redis_server.url}"
key_prefix = "{PREFIX}"

[queue]
lease_ttl_s = {c.lease_ttl_s}
heartbeat_interval_s = {c.heartbeat_s}
default_max_attempts = {c.max_attempts}
retry_backoff_s = 0.2
retry_backoff_max_s = 1.0

[scaling]
interval_s = {c.scaling_interval_s}

[workers]
health_interval_s = {c.health_interval_s}
health_timeout_s = 3.0
dispatch_interval_s = {c.dispatch_interval_s}
pull_models_on_ready = false

[results]
dir = "{self.dir / 'results'}"

[auth]
secret = "{SECRET}"

[providers.novita]
base_url = "{self.urls['novita']}"
api_key = "{API_KEY}"
timeout_s = 60.0

[[pools]]
name = "{POOL}"
provider = "novita"
engine = "ollama"
product_id = "{PRODUCT.id}"
image = "ollama/ollama:latest"
gpu_num = 1
rootfs_gb = 50
port = 11434
models = ["{MODEL}"]
slots = {c.slots}
min_workers = 0
max_workers = {c.max_workers}
idle_timeout_s = {c.idle_timeout_s}
boot_timeout_s = 60.0
price_per_hour = {PRODUCT.price_per_hour}
"""

    # -- replicas ----------------------------------------------------------------------------

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    async def ready(self, replica: Replica) -> bool:
        try:
            answer = await self.http.get(f"{replica.url}/ready", timeout=3.0)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    async def wait_ready(self, replica: Replica, timeout_s: float = 45.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.ready(replica):
            if not replica.alive:
                raise RuntimeError(f"replica {replica.index} exited:\n{replica.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {replica.index} not ready:\n"
                                   f"{replica.log_text()[-3000:]}")
            await asyncio.sleep(0.1)

    async def is_leader(self, replica: Replica) -> bool | None:
        """``gpufleet_is_leader`` from the replica's /metrics (None: it does not answer)."""
        try:
            answer = await self.http.get(f"{replica.url}/metrics", timeout=3.0)
        except httpx.HTTPError:
            return None
        match = re.search(r"^gpufleet_is_leader\s+([0-9.e+-]+)$", answer.text, re.M)
        return bool(match and float(match.group(1)) == 1.0)

    async def wait_leader(self, among: Iterable[Replica] | None = None,
                          timeout_s: float = 60.0) -> Replica:
        """The one replica (of ``among``) that reports itself leader."""
        candidates = list(among) if among is not None else self.replicas
        deadline = time.monotonic() + timeout_s
        while True:
            for replica in candidates:
                if replica.alive and await self.is_leader(replica):
                    return replica
            if time.monotonic() > deadline:
                raise TimeoutError("no leader")
            await asyncio.sleep(0.1)

    async def lock_holder(self) -> tuple[str | None, int | None]:
        """The reconciler lock's holder and fencing token, straight from Redis."""
        assert self.redis is not None
        holder, epoch = await self.redis.hmget(f"{PREFIX}:leader:reconciler", ["holder", "epoch"])
        return holder, int(epoch) if epoch else None

    # -- tasks ---------------------------------------------------------------------------------

    @staticmethod
    def task_body(marker: str, priority: int = 5) -> dict[str, Any]:
        return {"kind": "ollama", "pool": POOL, "priority": priority,
                "payload": {"api": "generate", "body": {"model": MODEL, "prompt": marker}}}

    async def submit(self, markers: Iterable[str], *, concurrency: int = 16,
                     attempts: int = 20, priority: int = 5,
                     to: Iterable[Replica] | None = None) -> Submitted:
        """POST each task to a live replica (of ``to``); on a dropped connection or 5xx,
        try another with the same Idempotency-Key. Only a 202 counts as accepted."""
        targets = list(to) if to is not None else self.replicas
        out = Submitted()
        queue: asyncio.Queue[str] = asyncio.Queue()
        for marker in markers:
            queue.put_nowait(marker)

        async def one(marker: str) -> None:
            # As a patient client does: back off 0.1 s doubling to 2 s (about 30 s over 20
            # attempts), so a loaded machine's slow replica restart is ridden out.
            for attempt in range(attempts):
                pause = min(0.1 * 2**attempt, 2.0)
                live = [r for r in targets if r.alive] or targets
                replica = self._rng.choice(live)
                try:
                    answer = await self.http.post(
                        f"{replica.url}/api/v1/tasks", json=self.task_body(marker, priority),
                        headers={"Idempotency-Key": marker}, timeout=10.0,
                    )
                except httpx.HTTPError:
                    await asyncio.sleep(pause)
                    continue
                if answer.status_code == 202:
                    out.ids[marker] = answer.json()["id"]
                    return
                await asyncio.sleep(pause)
            out.refused += 1

        async def worker() -> None:
            while not queue.empty():
                await one(queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out

    async def task_states(self, ids: Iterable[str]) -> dict[str, dict[str, str]]:
        assert self.redis is not None
        fields = ["status", "result", "attempts", "errors"]
        ids = list(ids)
        states: dict[str, dict[str, str]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id in chunk:
                    pipe.hmget(f"{PREFIX}:task:{task_id}", fields)
                rows = await pipe.execute()
            for task_id, row in zip(chunk, rows, strict=True):
                states[task_id] = {k: v for k, v in zip(fields, row, strict=True) if v is not None}
        return states

    async def wait_finished(self, ids: Iterable[str], timeout_s: float,
                            while_waiting: Any = None) -> dict[str, dict[str, str]]:
        ids = list(ids)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(Exception):  # Redis may be down mid-test
                states = await self.task_states(ids)
                if all(s.get("status") in TERMINAL for s in states.values()):
                    return states
            if time.monotonic() > deadline:
                states = await self.task_states(ids)
                open_ = {i: s.get("status") for i, s in states.items()
                         if s.get("status") not in TERMINAL}
                raise TimeoutError(f"{len(open_)} task(s) not finished: "
                                   f"{list(open_.items())[:10]}")
            await asyncio.sleep(0.25)

    async def running(self) -> int:
        """Tasks leased right now (in flight), fleet-wide."""
        assert self.redis is not None
        return int(await self.redis.zcard(f"{PREFIX}:leases"))

    # -- the cloud --------------------------------------------------------------------------

    async def cloud(self) -> dict[str, Any]:
        answer = await self.http.get(f"{self.urls['control']}/state")
        answer.raise_for_status()
        state: dict[str, Any] = answer.json()
        return state

    async def hold_lists(self, hold: bool) -> None:
        answer = await self.http.post(f"{self.urls['control']}/hold-lists", json={"hold": hold})
        answer.raise_for_status()

    async def set_first_token_s(self, seconds: float) -> None:
        answer = await self.http.post(f"{self.urls['control']}/engine",
                                      json={"first_token_s": seconds})
        answer.raise_for_status()

    async def events(self, kind: str = "scale") -> list[dict[str, Any]]:
        """Every fleet event of ``kind``, oldest first, from the event stream in Redis."""
        assert self.redis is not None
        raw: Any = await self.redis.xrange(f"{PREFIX}:events")
        return [dict(data, id=event_id) for event_id, data in raw if data.get("kind") == kind]


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    """Poll ``check`` until it answers True; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout_s} s: {check}")
        await asyncio.sleep(0.05)


def reexecutions(executions: dict[str, int], markers: Iterable[str]) -> int:
    """Runs beyond the first, summed over ``markers`` (the engines' own count)."""
    return sum(max(0, executions.get(m, 0) - 1) for m in markers)
