"""``create_app(settings)``: the FastAPI app and the lifespan that owns every resource.

The lifespan opens Redis (starting an embedded ``redis-server`` when no URL is
configured), builds the components from settings, starts the background loops,
and on shutdown stops them and closes everything in reverse order. There are no
module-level clients: tests build as many apps as they like.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpufleet import __version__
from gpufleet.api import build_router
from gpufleet.api.auth import authenticate, authenticate_work
from gpufleet.api.cursors import CursorCodec
from gpufleet.api.deps import Components
from gpufleet.api.errors import install_error_handlers
from gpufleet.api.request_metrics import RequestMetricsMiddleware
from gpufleet.dispatch import Dispatcher
from gpufleet.errors import StoreError
from gpufleet.health_checker import HealthChecker, register_static_workers
from gpufleet.loops import spawn_loop
from gpufleet.metrics import UP
from gpufleet.providers import build_providers
from gpufleet.providers.catalog import GpuCatalog
from gpufleet.proxy import ProxyService, build_proxy_router, forward_routes, make_http_client
from gpufleet.results import DirectoryResultStore
from gpufleet.scaling.reconciler import Reconciler
from gpufleet.settings import Settings, redact_url
from gpufleet.store.apikeys import ApiKeyStore
from gpufleet.store.connection import EmbeddedRedis, connect, default_data_dir
from gpufleet.store.demand import DemandReader
from gpufleet.store.events import EventLog
from gpufleet.store.history import FLUSH_INTERVAL_S, HistoryStore
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.queue import TaskQueue
from gpufleet.store.teams import Periods, TeamStore
from gpufleet.store.usage import UsageStore
from gpufleet.store.workers import WorkerRegistry
from gpufleet.worker_auth import WorkerAuth

logger = logging.getLogger(__name__)
# How long shutdown lets background loops finish their current tick before cancelling them.
LOOP_STOP_GRACE_S = 5.0


async def _open_redis(settings: Settings, stack: contextlib.AsyncExitStack) -> str:
    if settings.redis.url:
        logger.info("using Redis at %s", redact_url(settings.redis.url))
        return settings.redis.url
    embedded = EmbeddedRedis(settings.redis.data_dir, appendfsync=settings.redis.appendfsync)
    url = await asyncio.to_thread(embedded.start)
    stack.callback(embedded.stop)
    logger.info("using embedded redis-server %s (data in %s)", url, embedded.data_dir)
    return url


def results_dir(settings: Settings) -> Path:
    """Where task outputs are copied: ``[results] dir``, else beside the embedded Redis."""
    if settings.results.dir:
        return settings.results.dir
    base = settings.redis.data_dir or default_data_dir()
    return base.parent / "results" if base.name == "redis" else base / "results"


def start_background_loops(components: Components) -> None:
    """The loops every replica runs. Each is one ``*_once`` coroutine plus a timer."""
    queue: TaskQueue = components.extras["queue"]
    settings = components.settings
    housekeeping_s = max(1.0, min(settings.queue.heartbeat_interval_s, 5.0))
    components.loops.append(
        spawn_loop("queue-housekeeping", queue.requeue_expired, housekeeping_s, components.stop)
    )
    health: HealthChecker = components.extras["health_checker"]
    components.loops.append(
        spawn_loop("health", health.check_once, settings.workers.health_interval_s,
                   components.stop)
    )
    dispatcher: Dispatcher = components.extras["dispatcher"]
    components.loops.append(
        spawn_loop("dispatch", dispatcher.dispatch_once, settings.workers.dispatch_interval_s,
                   components.stop, wake=dispatcher.wake)
    )
    history: HistoryStore | None = components.extras.get("history")
    if history is not None:  # buffered arrivals / service / boot samples, one pipeline a flush
        components.loops.append(
            spawn_loop("history-flush", history.flush, FLUSH_INTERVAL_S, components.stop)
        )
    usage: UsageStore | None = components.extras.get("usage")
    if usage is not None and settings.usage.flush_interval_s > 0:  # buffered proxy usage
        components.loops.append(
            spawn_loop("usage-flush", usage.maybe_flush, settings.usage.flush_interval_s,
                       components.stop)
        )
    reconciler: Reconciler | None = components.extras.get("reconciler")
    if reconciler is not None:  # every [scaling] interval_s, and at once on {prefix}:wake
        components.loops.append(reconciler.spawn(components.stop))


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            url = await _open_redis(settings, stack)
            redis = connect(url)
            stack.push_async_callback(redis.aclose)
            try:
                await redis.ping()
            except Exception as exc:
                raise StoreError(f"cannot reach Redis at {redact_url(url)}: {exc}") from exc
            prefix = settings.redis.key_prefix
            registry = WorkerRegistry(redis, prefix=prefix, pool_tokens=settings.pool_tokens())
            components = Components(
                settings=settings,
                redis=redis,
                registry=registry,
                events=EventLog(redis, prefix=prefix),
            )
            # One recorder of pool history for the queue, proxy, dispatcher and reconciler;
            # closed after them (the stack is LIFO), so its last flush sees their samples.
            history = HistoryStore(redis, prefix=prefix, pools=settings.pools)
            stack.push_async_callback(history.aclose)
            components.extras["history"] = history
            # Teams and usage attribution; usage is closed (flushed) after the dispatcher and
            # the proxy that record into it.
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
            components.extras["teams"] = teams
            components.extras["usage"] = usage
            queue = TaskQueue(redis, settings.queue, key_prefix=prefix, history=history)
            stack.push_async_callback(queue.aclose)
            components.extras["queue"] = queue
            components.extras["results"] = DirectoryResultStore(results_dir(settings))
            components.providers = build_providers(settings)
            for provider in components.providers.values():
                stack.push_async_callback(provider.aclose)
            # What each pool's GPUs offer (GPU requirements); reads Novita's products if needed.
            catalog = components.extras["gpus"] = GpuCatalog(settings, components.providers)
            catalog.start()
            stack.push_async_callback(catalog.aclose)
            proxy_http = make_http_client(settings.proxy)
            stack.push_async_callback(proxy_http.aclose)
            proxy = ProxyService(settings, registry, redis, proxy_http, history=history)
            proxy.attribution = usage
            stack.push_async_callback(proxy.aclose)
            components.extras["proxy_http"] = proxy_http
            components.extras["proxy"] = proxy
            # Engines (health probes, queued runs) share one client; per-call timeouts are
            # the engines' own. No pool cap: worker slots bound the concurrency. WorkerAuth
            # adds each worker's secret to every call under its base_url.
            engine_http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                trust_env=False,
                auth=WorkerAuth(registry.tokens),
            )
            stack.push_async_callback(engine_http.aclose)
            dispatcher = Dispatcher(settings, registry, queue, engine_http,
                                    results=components.extras["results"], history=history,
                                    usage=usage)
            # Runs before the HTTP client, the queue and Redis close (the stack is LIFO), and
            # after the loops stop (pushed later): leases of unfinished tasks are handed back.
            stack.push_async_callback(dispatcher.aclose)
            health = HealthChecker(settings, registry, engine_http, events=components.events,
                                   on_change=dispatcher.wake.set)
            stack.push_async_callback(health.aclose)
            components.extras["dispatcher"] = dispatcher
            components.extras["health_checker"] = health
            await register_static_workers(settings, registry, components.events)
            # The reconciler acts only while this replica holds the leader lock; its loop
            # releases the lock when it stops, so another replica takes over at once.
            # Demand as GET /pools shows it and as the reconciler scales on: one reader.
            demand = DemandReader(redis, prefix=prefix, queue=queue, pools=settings.pools)
            reconciler = Reconciler(
                settings,
                redis,
                registry=registry,
                events=components.events,
                providers=components.providers,
                queue=queue,
                pool_state=PoolStateStore(
                    redis,
                    prefix=prefix,
                    periods=periods,
                    usage_retention_days=settings.usage.retention_days,
                ),
                history=history,
                demand=demand,
            )
            components.extras["pool_state"] = reconciler.pool_state
            components.extras["reconciler"] = reconciler
            components.extras["wake"] = reconciler.wake
            components.extras["demand"] = demand.pool_demand
            secret = settings.auth.secret.get_secret_value() if settings.auth.secret else None
            components.extras["apikeys"] = await ApiKeyStore.open(
                redis, secret, prefix=prefix, cache_ttl_s=settings.auth.key_cache_ttl_s
            )
            components.extras["cursors"] = CursorCodec(
                components.extras["apikeys"].derive_key("task-cursor")
            )
            if not settings.auth.enabled:
                logger.warning(
                    "AUTH IS DISABLED ([auth] enabled = false): anyone who can reach this "
                    "port can spend your GPU budget. Use this for a local demo only."
                )
            app.state.components = components
            app.state.loop = asyncio.get_running_loop()
            stack.push_async_callback(_stop_loops, components)
            start_background_loops(components)
            UP.set(1)
            stack.callback(UP.set, 0)
            logger.info("gpufleet %s ready with %d pool(s)", __version__, len(settings.pools))
            yield

    app = FastAPI(
        title="gpufleet",
        version=__version__,
        description="Rent GPUs only while there is work for them.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a public CDN: [server] api_docs = false
        # turns both pages off (the OpenAPI document itself is served by gpufleet).
        docs_url="/docs" if settings.server.api_docs else None,
        redoc_url="/redoc" if settings.server.api_docs else None,
    )
    install_error_handlers(app)
    app.include_router(build_router())
    app.include_router(build_proxy_router(auth=authenticate))
    # New work: a team over its spend budget is refused (402) before the body is read.
    app.router.routes[:0] = forward_routes(auth=authenticate_work)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestMetricsMiddleware)
    if settings.auth.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.auth.cors_origins,
            allow_methods=["*"],
            allow_headers=["authorization", "content-type", "x-api-key", "idempotency-key"],
        )
    return app


SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}


class SecurityHeadersMiddleware:
    """Adds conservative security headers to every HTTP answer (pure ASGI: streams untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS.items() if k not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def request_shutdown(app: FastAPI) -> None:
    """Begin a graceful stop as soon as the server is told to stop (SIGTERM), before the
    open requests have drained: the loops end after their current tick, so the dispatcher
    leases no new task (its running ones go on, and whatever is still running when the
    lifespan ends is handed back) and the reconciler releases the leader lock at once.

    Safe to call from a signal handler; a no-op before the lifespan has started.
    """
    components: Components | None = getattr(app.state, "components", None)
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if components is None or loop is None or loop.is_closed():
        return
    loop.call_soon_threadsafe(components.stop.set)


async def _stop_loops(components: Components) -> None:
    components.stop.set()
    # Each loop ends by itself once its tick returns; cancel only those that do not within
    # the grace period (cancelling a redis-py 8.1 call in flight can hang the caller).
    if components.loops:
        _, pending = await asyncio.wait(components.loops, timeout=LOOP_STOP_GRACE_S)
        for task in pending:
            task.cancel()
    await asyncio.gather(*components.loops, return_exceptions=True)
