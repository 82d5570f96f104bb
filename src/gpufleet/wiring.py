"""The typed ``Services`` the lifespan builds once, and ``build_services`` that builds them.

``create_app``'s lifespan calls ``build_services(settings, redis, stack)`` once and keeps the
result on ``app.state.services``; ``api.deps`` has one typed getter per field, and the proxy
reads the same object. Nothing builds a store on first use: every store, client and loop
object a request can reach is a field here, made before the first request.

This module sits below ``gpufleet.api`` and ``gpufleet.proxy`` (import-linter layers), so it
names nothing of theirs: the proxy's own ``ProxyService`` is built by ``create_app`` and kept
on ``app.state.proxy``; the API's page-cursor codec is made from ``cursor_key``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from gpufleet.dispatch import Dispatcher
from gpufleet.health_checker import HealthChecker
from gpufleet.providers import build_providers
from gpufleet.providers.base import Provider
from gpufleet.providers.catalog import GpuCatalog
from gpufleet.results import DirectoryResultStore, ResultStore
from gpufleet.scaling.reconciler import Reconciler
from gpufleet.settings import Settings
from gpufleet.store.apikeys import ApiKeyStore
from gpufleet.store.connection import default_data_dir
from gpufleet.store.demand import DemandReader
from gpufleet.store.events import EventLog
from gpufleet.store.history import HistoryStore
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.queue import TaskQueue
from gpufleet.store.streams import StreamPlaces
from gpufleet.store.teams import Periods, TeamStore
from gpufleet.store.usage import UsageStore
from gpufleet.store.workers import WorkerRegistry
from gpufleet.worker_auth import WorkerAuth


@dataclass(frozen=True, slots=True)
class Services:
    """Everything the lifespan opened that a request or a loop uses, each typed."""

    settings: Settings
    redis: aioredis.Redis
    registry: WorkerRegistry
    events: EventLog
    # provider name ("novita", "surf", "static") -> its client
    providers: Mapping[str, Provider]
    # One recorder of pool history for the queue, proxy, dispatcher and reconciler.
    history: HistoryStore
    teams: TeamStore
    usage: UsageStore
    queue: TaskQueue
    results: ResultStore
    # What each pool's GPUs offer (GPU requirements).
    gpus: GpuCatalog
    apikeys: ApiKeyStore
    # Derived from the auth secret: every replica reads every replica's page cursors.
    cursor_key: bytes
    stream_places: StreamPlaces
    pool_state: PoolStateStore
    # Demand as GET /pools shows it and as the reconciler scales on: one reader.
    demand: DemandReader
    # Set to make the reconciler tick now (the API sets it after a pool's knobs change).
    scale_wake: asyncio.Event
    dispatcher: Dispatcher
    health_checker: HealthChecker
    reconciler: Reconciler
    # Runtime: the background loops started for this app, and the event that stops them.
    loops: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def results_dir(settings: Settings) -> Path:
    """Where task outputs are copied: ``[results] dir``, else beside the embedded Redis."""
    if settings.results.dir:
        return settings.results.dir
    base = settings.redis.data_dir or default_data_dir()
    return base.parent / "results" if base.name == "redis" else base / "results"


async def build_services(
    settings: Settings,
    redis: aioredis.Redis,
    stack: contextlib.AsyncExitStack,
    *,
    providers: Mapping[str, Provider] | None = None,
) -> Services:
    """Build every service once; each one's close is pushed on ``stack`` (closed LIFO).

    ``providers`` replaces the clients ``build_providers(settings)`` would make (tests pass
    simulated clouds); they are closed by whoever made them.
    """
    prefix = settings.redis.key_prefix
    registry = WorkerRegistry(redis, prefix=prefix, pool_tokens=settings.pool_tokens())
    events = EventLog(redis, prefix=prefix)
    # Closed after the queue, proxy, dispatcher and reconciler (the stack is LIFO), so its
    # last flush sees their samples.
    history = HistoryStore(redis, prefix=prefix, pools=settings.pools)
    stack.push_async_callback(history.aclose)
    # Teams and usage attribution; usage is closed (flushed) after the dispatcher and the
    # proxy that record into it.
    periods = Periods(settings.usage.timezone)
    teams = TeamStore(
        redis,
        prefix=prefix,
        cache_ttl_s=settings.auth.key_cache_ttl_s,
        max_teams=settings.usage.max_teams,
        periods=periods,
    )
    usage = UsageStore(
        redis,
        prefix=prefix,
        periods=periods,
        teams=teams,
        retention_days=settings.usage.retention_days,
        flush_interval_s=settings.usage.flush_interval_s,
    )
    stack.push_async_callback(usage.flush)
    queue = TaskQueue(redis, settings.queue, key_prefix=prefix, history=history)
    stack.push_async_callback(queue.aclose)
    results = DirectoryResultStore(results_dir(settings))
    if providers is None:
        providers = build_providers(settings)
        for provider in providers.values():
            stack.push_async_callback(provider.aclose)
    # What each pool's GPUs offer (GPU requirements); reads Novita's products if needed.
    gpus = GpuCatalog(settings, providers)
    gpus.start()
    stack.push_async_callback(gpus.aclose)
    # Engines (health probes, queued runs) share one client; per-call timeouts are the
    # engines' own. No pool cap: worker slots bound the concurrency. WorkerAuth adds each
    # worker's secret to every call under its base_url.
    engine_http = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        trust_env=False,
        auth=WorkerAuth(registry.tokens),
    )
    stack.push_async_callback(engine_http.aclose)
    dispatcher = Dispatcher(settings, registry, queue, engine_http, results=results,
                            history=history, usage=usage)
    # Runs before the HTTP client, the queue and Redis close (the stack is LIFO), and after
    # the loops stop (pushed later): leases of unfinished tasks are handed back.
    stack.push_async_callback(dispatcher.aclose)
    health = HealthChecker(settings, registry, engine_http, events=events,
                           on_change=dispatcher.wake.set)
    stack.push_async_callback(health.aclose)
    # The reconciler acts only while this replica holds the leader lock; its loop releases
    # the lock when it stops, so another replica takes over at once.
    demand = DemandReader(redis, prefix=prefix, queue=queue, pools=settings.pools)
    pool_state = PoolStateStore(
        redis,
        prefix=prefix,
        periods=periods,
        usage_retention_days=settings.usage.retention_days,
    )
    reconciler = Reconciler(
        settings,
        redis,
        registry=registry,
        events=events,
        providers=providers,
        queue=queue,
        pool_state=pool_state,
        history=history,
        demand=demand,
    )
    secret = settings.auth.secret.get_secret_value() if settings.auth.secret else None
    apikeys = await ApiKeyStore.open(
        redis, secret, prefix=prefix, cache_ttl_s=settings.auth.key_cache_ttl_s
    )
    return Services(
        settings=settings,
        redis=redis,
        registry=registry,
        events=events,
        providers=providers,
        history=history,
        teams=teams,
        usage=usage,
        queue=queue,
        results=results,
        gpus=gpus,
        apikeys=apikeys,
        cursor_key=apikeys.derive_key("task-cursor"),
        stream_places=StreamPlaces(redis, prefix=prefix),
        pool_state=pool_state,
        demand=demand,
        scale_wake=reconciler.wake,
        dispatcher=dispatcher,
        health_checker=health,
        reconciler=reconciler,
    )
