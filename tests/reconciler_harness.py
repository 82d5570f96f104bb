"""A fleet for reconciler tests: real Redis, the real Novita and SURF clients talking to the
simulated clouds over ``httpx.ASGITransport``, and one ``FakeClock`` shared by everything.

    fleet = Fleet(redis, pools=[COMFY])
    r = fleet.reconciler()
    await fleet.enqueue(5, pool="comfy")
    report = await r.reconcile_once()
    fleet.novita.count("POST", "/gpu/instance/create")   # what the cloud saw
"""

from __future__ import annotations

from typing import Any

import httpx
import redis.asyncio as aioredis

from gpufleet.domain import WorkerState
from gpufleet.providers.base import Provider, RetryPolicy
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
from gpufleet.settings import QueueSettings, Settings, load_settings
from gpufleet.store.events import EventLog
from gpufleet.store.leader import LeaderLock
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.queue import TaskQueue
from gpufleet.store.workers import WorkerRegistry
from gpufleet.tasks import TaskSubmit

NOVITA_KEY = "sim-novita-key"
SURF_TOKEN = "sim-surf-token"
PREFIX = "rt"
GRAPH = {"1": {"class_type": "KSampler", "inputs": {"seed": 1}}}

COMFY: dict[str, Any] = {
    "name": "comfy",
    "provider": "novita",
    "engine": "comfyui",
    "product_id": "4090.sim",
    "image": "ghcr.io/example/comfyui:latest",
    "slots": 1,
    "max_workers": 10,
    "idle_timeout_s": 120,
    "boot_timeout_s": 600,
    "price_per_hour": 0.67,
}
GPU: dict[str, Any] = {
    "name": "gpu",
    "provider": "surf",
    "engine": "ollama",
    "name_filter": "gpufleet-gpu",
    "slots": 4,
    "max_workers": 2,
    "idle_timeout_s": 60,
    "price_per_hour": 1.2,
}


class Fleet:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        pools: list[dict[str, Any]],
        novita: SimNovitaConfig | None = None,
        surf: SimSurfConfig | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.clock = FakeClock()
        self.settings: Settings = load_settings(
            env_file=None,
            redis={"url": "redis://unused", "key_prefix": PREFIX},
            scaling={"interval_s": interval_s},
            providers={
                "novita": {"api_key": NOVITA_KEY, "base_url": "http://novita.sim"},
                "surf": {"api_token": SURF_TOKEN, "base_url": "http://surf.sim/v1/workspace"},
            },
            pools=pools,
        )
        self.novita_app = create_novita_app(
            novita or SimNovitaConfig(create_s=2, pull_s=10, start_s=4, stop_s=2, remove_s=2),
            clock=self.clock,
        )
        self.surf_app = create_surf_app(surf or SimSurfConfig(), clock=self.clock)
        self.registry = WorkerRegistry(redis, prefix=PREFIX, clock=self.clock)
        self.events = EventLog(redis, prefix=PREFIX, clock=self.clock)
        self.pool_state = PoolStateStore(redis, prefix=PREFIX, clock=self.clock)
        self.queue = TaskQueue(redis, QueueSettings(), key_prefix=PREFIX, clock=self.clock)
        self._providers: list[Provider] = []

    @property
    def novita(self) -> Any:
        return self.novita_app.state.sim

    @property
    def surf(self) -> Any:
        return self.surf_app.state.sim

    def providers(self) -> dict[str, Provider]:
        """A fresh pair of clients (each replica has its own), closed by ``aclose``."""
        retry = RetryPolicy(sleep=self.clock.sleep, attempts=2)
        nov = NovitaProvider(
            self.settings.providers.novita,
            pools=self.settings.pools,
            transport=httpx.ASGITransport(app=self.novita_app),
            retry=retry,
        )
        surf = SurfProvider(
            self.settings.providers.surf,
            pools=self.settings.pools,
            transport=httpx.ASGITransport(app=self.surf_app),
            retry=retry,
            clock=self.clock,
            sleep=self.clock.sleep,
        )
        self._providers += [nov, surf]
        return {"novita": nov, "surf": surf}

    def reconciler(self, replica_id: str = "r1", *, lock_ttl_s: float = 30.0) -> Reconciler:
        lock = LeaderLock(self.redis, prefix=PREFIX, replica_id=replica_id, ttl_s=lock_ttl_s)
        return Reconciler(
            self.settings,
            self.redis,
            registry=self.registry,
            events=self.events,
            providers=self.providers(),
            queue=self.queue,
            pool_state=self.pool_state,
            lock=lock,
            clock=self.clock,
        )

    async def enqueue(self, n: int, **kw: Any) -> None:
        for _ in range(n):
            if kw.get("kind") == "ollama":
                body = {"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}]}
                await self.queue.enqueue(TaskSubmit(payload={"api": "chat", "body": body}, **kw))
            else:
                await self.queue.enqueue(TaskSubmit(payload=GRAPH, **kw))

    async def ready_all(self, pool: str | None = None) -> list[str]:
        """What the health checker would do: booting workers with an endpoint become ready."""
        moved = []
        for w in await self.registry.list_workers(pool):
            if w.state is WorkerState.booting and w.base_url:
                assert await self.registry.transition(w.id, WorkerState.ready, "healthy")
                moved.append(w.id)
        return moved

    async def states(self, pool: str | None = None) -> dict[str, str]:
        return {w.id: w.state.value for w in await self.registry.list_workers(pool)}

    async def aclose(self) -> None:
        for provider in self._providers:
            await provider.aclose()
        await self.queue.aclose()
