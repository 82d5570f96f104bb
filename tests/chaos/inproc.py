"""An in-process fleet for the cloud-fault tests: everything real but the clouds and GPUs.

``CloudFleet`` wires the real ``Reconciler``, ``HealthChecker`` and ``Dispatcher`` (with the
real Novita / SURF clients and the real ComfyUI / Ollama engine clients) to the simulated
clouds and to one simulated worker per instance, all through ``httpx`` transports (no
sockets), on a real Redis and one ``FakeClock``::

    fleet = CloudFleet(redis)
    ids = await fleet.submit_comfy(10)
    await fleet.run_until(lambda: fleet.all_done(ids))
    fleet.novita.instances            # the cloud's own view, for assertions

A worker answers only while the cloud says its instance is ``running`` (otherwise the
connection is refused), so a stopped or deleted instance is a dead worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import redis.asyncio as aioredis
from starlette.types import ASGIApp

from gpufleet.dispatch import Dispatcher
from gpufleet.engines.comfyui import ComfyUIEngine
from gpufleet.engines.ollama import OllamaEngine
from gpufleet.engines.simulated import (
    ComfyUIConfig,
    OllamaConfig,
    SimulatedComfyUI,
    SimulatedOllama,
)
from gpufleet.health_checker import HealthChecker
from gpufleet.providers.base import RetryPolicy
from gpufleet.providers.novita import NovitaProvider
from gpufleet.providers.simulated import (
    FakeClock,
    SimNovitaConfig,
    SimSurfConfig,
    create_novita_app,
    create_surf_app,
)
from gpufleet.providers.surf import SurfProvider
from gpufleet.scaling.reconciler import Reconciler
from gpufleet.settings import Settings, load_settings
from gpufleet.store.events import EventLog
from gpufleet.store.leader import LeaderLock
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.queue import TaskQueue
from gpufleet.store.workers import WorkerRegistry
from gpufleet.tasks import TaskSubmit

PREFIX = "chaos"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

COMFY_POOL: dict[str, Any] = {
    "name": "comfy", "provider": "novita", "engine": "comfyui", "product_id": "4090.sim",
    "image": "ghcr.io/example/comfyui:latest", "slots": 1, "max_workers": 4,
    "idle_timeout_s": 60, "boot_timeout_s": 120, "park_timeout_s": 300,
    "price_per_hour": 0.67,
}
LLM_POOL: dict[str, Any] = {
    "name": "llm", "provider": "surf", "engine": "ollama", "name_filter": "gpufleet-gpu",
    "slots": 2, "min_workers": 1, "max_workers": 3, "idle_timeout_s": 60,
    "boot_timeout_s": 120, "models": ["llama3.2"], "price_per_hour": 1.2,
}
SURF_IPS = ("10.9.0.1", "10.9.0.2", "10.9.0.3")


def graph(n: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": n}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                     "filename_prefix": f"chaos{n}"}},
    }


class Routes(httpx.AsyncBaseTransport):
    """Sends each request to the ASGI app its host names; no app: connection refused."""

    def __init__(self, lookup: Callable[[str], ASGIApp | None]) -> None:
        self.lookup = lookup

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        app = self.lookup(request.url.host)
        if app is None:
            raise httpx.ConnectError("connection refused (instance not running)",
                                     request=request)
        return await httpx.ASGITransport(app=app).handle_async_request(request)


class CloudFleet:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        pools: list[dict[str, Any]] | None = None,
        novita: SimNovitaConfig | None = None,
        surf: SimSurfConfig | None = None,
        provider_timeout_s: float = 0.1,
    ) -> None:
        self.redis = redis
        self.clock = FakeClock()
        self.novita_made: dict[str, Any] = {}  # every instance the cloud ever had, kept
        self.settings: Settings = load_settings(
            env_file=None,
            redis={"url": "redis://unused", "key_prefix": PREFIX},
            queue={"lease_ttl_s": 60.0, "heartbeat_interval_s": 0.2, "retry_backoff_s": 0.0,
                   "retry_backoff_max_s": 0.0, "default_max_attempts": 5},
            workers={"health_interval_s": 1.0, "health_timeout_s": 0.5, "unhealthy_after": 2},
            providers={
                "novita": {"api_key": "sim-novita-key", "base_url": "http://novita.sim",
                           "timeout_s": provider_timeout_s},
                "surf": {"api_token": "sim-surf-token", "timeout_s": provider_timeout_s,
                         "base_url": "http://surf.sim/v1/workspace"},
            },
            pools=pools or [COMFY_POOL, LLM_POOL],
        )
        self.novita_app = create_novita_app(
            novita or SimNovitaConfig(create_s=2, pull_s=10, start_s=4, stop_s=2, remove_s=2,
                                      seed=7),
            clock=self.clock,
            engine_url=lambda inst, port: f"http://{inst.id}.novita.test:{port}",
            on_change=lambda inst, old, new: self.novita_made.setdefault(inst.id, inst),
        )
        self.surf_app = create_surf_app(surf or SimSurfConfig(workspaces=[], seed=7),
                                        clock=self.clock)
        for i, ip in enumerate(SURF_IPS):
            self.surf.add_workspace(f"gpufleet-gpu-{i:02d}", "paused", ip=ip)
        self.comfy_workers: dict[str, SimulatedComfyUI] = {}
        self.ollama_workers: dict[str, SimulatedOllama] = {}
        self.registry = WorkerRegistry(redis, prefix=PREFIX, clock=self.clock)
        self.events = EventLog(redis, prefix=PREFIX, clock=self.clock)
        self.queue = TaskQueue(redis, self.settings.queue, key_prefix=PREFIX, clock=self.clock)
        retry = RetryPolicy(sleep=self.clock.sleep, attempts=3)
        self.providers = {
            "novita": NovitaProvider(self.settings.providers.novita, pools=self.settings.pools,
                                     transport=httpx.ASGITransport(app=self.novita_app),
                                     retry=retry),
            "surf": SurfProvider(self.settings.providers.surf, pools=self.settings.pools,
                                 transport=httpx.ASGITransport(app=self.surf_app), retry=retry,
                                 clock=self.clock, sleep=self.clock.sleep),
        }
        self.http = httpx.AsyncClient(transport=Routes(self._worker_app))
        self.reconciler = Reconciler(
            self.settings, redis, registry=self.registry, events=self.events,
            providers=self.providers, queue=self.queue,
            pool_state=PoolStateStore(redis, prefix=PREFIX, clock=self.clock),
            lock=LeaderLock(redis, prefix=PREFIX, replica_id="r1", ttl_s=1e9),
            clock=self.clock,
        )
        self.health = HealthChecker(self.settings, self.registry, self.http,
                                    events=self.events, clock=self.clock)
        engines = {
            "comfyui": ComfyUIEngine(self.http, websocket=False, poll_interval_s=0.01,
                                     request_timeout_s=2.0, stall_timeout_s=5.0),
            "ollama": OllamaEngine(self.http, request_timeout_s=2.0, run_timeout_s=5.0),
        }
        self.dispatcher = Dispatcher(self.settings, self.registry, self.queue, self.http,
                                     engines=engines, clock=self.clock)

    @property
    def novita(self) -> Any:
        return self.novita_app.state.sim

    @property
    def surf(self) -> Any:
        return self.surf_app.state.sim

    # -- the simulated workers behind the instances ---------------------------------------

    def _worker_app(self, host: str) -> ASGIApp | None:
        if host.endswith(".novita.test"):
            instance_id = host.split(".", 1)[0]
            inst = self.novita.instances.get(instance_id)
            if inst is None or inst.status != "running":
                return None
            if instance_id not in self.comfy_workers:
                self.comfy_workers[instance_id] = SimulatedComfyUI(ComfyUIConfig())
            return self.comfy_workers[instance_id]
        for ws in self.surf.workspaces.values():
            if ws.ip == host:
                if ws.status != "running":
                    return None
                if ws.id not in self.ollama_workers:
                    self.ollama_workers[ws.id] = SimulatedOllama(
                        OllamaConfig(models=("llama3.2",), reply=f"answer from {ws.name}"))
                return self.ollama_workers[ws.id]
        return None

    # -- work --------------------------------------------------------------------------

    async def submit_comfy(self, n: int) -> list[str]:
        return [(await self.queue.enqueue(TaskSubmit(payload=graph(i), pool="comfy"))).id
                for i in range(n)]

    async def submit_chat(self, n: int) -> list[str]:
        ids = []
        for i in range(n):
            body = {"model": "llama3.2", "messages": [{"role": "user", "content": f"q{i}"}]}
            task = await self.queue.enqueue(TaskSubmit(kind="ollama", pool="llm",
                                                       payload={"api": "chat", "body": body}))
            ids.append(task.id)
        return ids

    async def statuses(self, ids: list[str]) -> dict[str, str]:
        return {i: (await self.queue.get(i, include_payload=False)).status.value for i in ids}

    async def all_done(self, ids: list[str]) -> bool:
        return set((await self.statuses(ids)).values()) <= TERMINAL

    # -- time --------------------------------------------------------------------------

    async def step(self, dt: float) -> None:
        """``dt`` seconds pass; then one tick of every loop, in the order a replica runs them."""
        self.clock.advance(dt)
        await self.reconciler.reconcile_once()
        await self.health.check_once()
        await self.queue.requeue_expired()
        await self.dispatcher.dispatch_once()
        for _ in range(20):  # let the runs just started get to their end
            if not self.dispatcher.running:
                break
            await asyncio.sleep(0.01)

    async def run_until(self, done: Callable[[], Awaitable[bool]], *, dt: float = 5.0,
                        max_steps: int = 400) -> int:
        for n in range(max_steps):
            if await done():
                return n
            await self.step(dt)
        raise AssertionError(f"not done after {max_steps} steps of {dt} s")

    async def aclose(self) -> None:
        await self.dispatcher.aclose(grace_s=1.0)
        await self.health.aclose()
        await self.reconciler.release()
        for provider in self.providers.values():
            await provider.aclose()
        await self.http.aclose()
        for sim in self.comfy_workers.values():
            await sim.aclose()
        await self.queue.aclose()
