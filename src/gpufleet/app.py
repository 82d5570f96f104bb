"""``create_app(settings)``: the FastAPI app and the lifespan that owns every resource.

The lifespan opens Redis (starting an embedded ``redis-server`` when no URL is
configured), builds the typed ``Services`` (``gpufleet.wiring``) once from settings,
starts the background loops, and on shutdown stops them and closes everything in
reverse order. There are no
module-level clients: tests build as many apps as they like.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import cast

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpufleet import __version__
from gpufleet.api import build_router
from gpufleet.api.auth import authenticate, authenticate_work
from gpufleet.api.errors import install_error_handlers
from gpufleet.api.request_metrics import RequestMetricsMiddleware
from gpufleet.errors import StoreError
from gpufleet.health_checker import register_static_workers
from gpufleet.loops import spawn_loop
from gpufleet.metrics import DEFERRED, HTTP_REQUESTS, UP
from gpufleet.proxy import ProxyService, build_proxy_router, forward_routes, make_http_client
from gpufleet.settings import Settings, redact_url
from gpufleet.store.connection import EmbeddedRedis, connect
from gpufleet.store.history import FLUSH_INTERVAL_S
from gpufleet.wiring import Services, build_services

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


def start_background_loops(services: Services) -> None:
    """The loops every replica runs. Each is one ``*_once`` coroutine plus a timer."""
    settings = services.settings
    housekeeping_s = max(1.0, min(settings.queue.heartbeat_interval_s, 5.0))
    services.loops.append(
        spawn_loop("queue-housekeeping", services.queue.requeue_expired, housekeeping_s,
                   services.stop)
    )
    services.loops.append(
        spawn_loop("health", services.health_checker.check_once,
                   settings.workers.health_interval_s, services.stop)
    )
    dispatcher = services.dispatcher
    services.loops.append(
        spawn_loop("dispatch", dispatcher.dispatch_once, settings.workers.dispatch_interval_s,
                   services.stop, wake=dispatcher.wake)
    )
    # buffered arrivals / service / boot samples, one pipeline a flush
    services.loops.append(
        spawn_loop("history-flush", services.history.flush, FLUSH_INTERVAL_S, services.stop)
    )
    if settings.usage.flush_interval_s > 0:  # buffered proxy usage
        services.loops.append(
            spawn_loop("usage-flush", services.usage.maybe_flush,
                       settings.usage.flush_interval_s, services.stop)
        )
    # every [scaling] interval_s, and at once on {prefix}:wake
    services.loops.append(services.reconciler.spawn(services.stop))


def create_app(settings: Settings, *, freeze_gc: bool = False) -> FastAPI:
    """The app. ``freeze_gc`` (what ``gpufleet serve`` asks for): ``gc.freeze()`` once
    started. Not for tests, which build many apps in one process."""

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
            services = await build_services(settings, redis, stack)
            # The proxy's own state (upstream clients, slot broker); closed before the
            # dispatcher, usage and history it records into (the stack is LIFO).
            proxy_http = make_http_client(settings.proxy)
            stack.push_async_callback(proxy_http.aclose)
            proxy = ProxyService(settings, services.registry, redis, proxy_http,
                                 history=services.history)
            proxy.attribution = services.usage
            stack.push_async_callback(proxy.aclose)
            await register_static_workers(settings, services.registry, services.events)
            if not settings.auth.enabled:
                logger.warning(
                    "AUTH IS DISABLED ([auth] enabled = false): anyone who can reach this "
                    "port can spend your GPU budget. Use this for a local demo only."
                )
            app.state.services = services
            app.state.proxy = proxy
            app.state.loop = asyncio.get_running_loop()
            stack.push_async_callback(_stop_loops, services)
            start_background_loops(services)
            if freeze_gc:
                # What is built by now (imports, settings, app, services: ~80,000 objects)
                # lives as long as the process: out of the cyclic collector's sight, so a
                # full collection does not walk it while requests wait (p99).
                gc.freeze()
            UP.set(1)
            stack.callback(UP.set, 0)
            logger.info("gpufleet %s ready with %d pool(s)", __version__, len(settings.pools))
            yield

    app = GpufleetApp(
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
    forwarded = forward_routes(auth=authenticate_work)
    app.router.routes[:0] = forwarded
    app.forwarded = {route.path: route for route in forwarded if isinstance(route, Route)}
    app.cors = bool(settings.auth.cors_origins)
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


class GpufleetApp(FastAPI):
    """FastAPI, plus a short way in for the proxy's inference POSTs (``forwarded``).

    Those requests are most of the traffic and each one is cheap, so the ~10 ASGI layers
    FastAPI and Starlette put in front of every route (error middlewares, the exit-stack
    middleware, routing by regex, our metrics and security-header middlewares) were a large
    share of the proxy's CPU per request (``bench/proxy_overhead.py``). ``forward`` gives
    them the same answer through one layer: the same endpoint (``ForwardEndpoint``), the
    security headers, ``gpufleet_http_requests_total`` under the route's template, and
    errors raised before the answer started turned into answers by the app's own exception
    handlers. Anything else — other paths and methods, every request when ``[auth]
    cors_origins`` is set (CORS headers are Starlette's to write), a ``root_path``,
    FastAPI's OpenTelemetry when it is configured — takes the whole stack.
    """

    forwarded: dict[str, Route]
    cors: bool = False
    _traced_now: bool = False
    _traced_at: float = -1e18

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http" and scope["method"] == "POST" and not self.root_path:
            route = getattr(self, "forwarded", {}).get(scope["path"])
        if route is None or self.cors or self._traced():
            await super().__call__(scope, receive, send)
            return
        await self.forward(route, scope, receive, send)

    def _traced(self) -> bool:
        """FastAPI's own OpenTelemetry is on (asked at most once a second: the question
        reads the environment, ~10 µs)."""
        now = time.monotonic()
        if now - self._traced_at >= 1.0:
            telemetry = getattr(self, "_native_telemetry", None)
            self._traced_now = telemetry is not None and bool(telemetry.enabled())
            self._traced_at = now
        return self._traced_now

    async def forward(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        scope["route"] = route
        status = 0  # not started yet

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = with_security_headers(message.get("headers") or [])
            await send(message)

        try:
            await route.app(scope, receive, answer)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None or status:  # no handler, or the answer had started
                raise
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, answer)
        finally:
            DEFERRED.inc(HTTP_REQUESTS, (route.path, f"{(status or 500) // 100}xx"))

    def _handler_for(self, exc: Exception) -> Callable[..., Awaitable[Response]] | None:
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                return cast(Callable[..., Awaitable[Response]], handler)
        return None


SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}


_SECURITY_ITEMS = tuple(SECURITY_HEADERS.items())


def with_security_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` and each of ``SECURITY_HEADERS`` they do not set already."""
    headers = list(headers)
    if not any(name.lower() in SECURITY_HEADERS for name, _ in headers):
        return headers + list(_SECURITY_ITEMS)  # the usual case: none of them set
    present = {name.lower() for name, _ in headers}
    return headers + [(k, v) for k, v in _SECURITY_ITEMS if k not in present]


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
                message["headers"] = with_security_headers(message.get("headers", []))
            await send(message)

        await self.app(scope, receive, send_with_headers)


def request_shutdown(app: FastAPI) -> None:
    """Begin a graceful stop as soon as the server is told to stop (SIGTERM), before the
    open requests have drained: the loops end after their current tick, so the dispatcher
    leases no new task (its running ones go on, and whatever is still running when the
    lifespan ends is handed back) and the reconciler releases the leader lock at once.

    Safe to call from a signal handler; a no-op before the lifespan has started.
    """
    services: Services | None = getattr(app.state, "services", None)
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if services is None or loop is None or loop.is_closed():
        return
    loop.call_soon_threadsafe(services.stop.set)


async def _stop_loops(services: Services) -> None:
    services.stop.set()
    # Each loop ends by itself once its tick returns; cancel only those that do not within
    # the grace period (cancelling a redis-py 8.1 call in flight can hang the caller).
    if services.loops:
        _, pending = await asyncio.wait(services.loops, timeout=LOOP_STOP_GRACE_S)
        for task in pending:
            task.cancel()
    await asyncio.gather(*services.loops, return_exceptions=True)
