"""gpufleet's Ollama- (``/api/*``, ``GET /``) and OpenAI- (``/v1/*``) compatible front door.

``build_proxy_router(auth=…)`` returns one router with both. ``auth`` is the API's
``authenticate`` dependency (passed in, because ``gpufleet.proxy`` and
``gpufleet.api`` must not import each other); ``None`` serves without keys.
The per-app state lives in ``app.state.proxy`` (a ``ProxyService``,
built by the lifespan; closed with ``await service.aclose()``).
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.routing import BaseRoute

from gpufleet.proxy.config import ProxySettings
from gpufleet.proxy.endpoint import Authenticator
from gpufleet.proxy.relay import ProxyService, make_http_client

__all__ = [
    "ProxyService",
    "ProxySettings",
    "build_proxy_router",
    "forward_routes",
    "make_http_client",
]


def build_proxy_router(auth: Authenticator | None = None) -> APIRouter:
    from gpufleet.proxy.ollama import build_ollama_router
    from gpufleet.proxy.openai import build_openai_router

    router = APIRouter()
    router.include_router(build_ollama_router(auth))
    router.include_router(build_openai_router(auth))
    return router


def forward_routes(auth: Authenticator | None = None) -> list[BaseRoute]:
    """The inference routes (``POST /api/chat`` …, ``/v1/chat/completions`` …) alone, for
    ``app.router.routes[:0] = forward_routes(auth)``: matched first, a proxied request
    skips the scan of every API route (~0.1 ms per request with the full app). The same
    routes stay in ``build_proxy_router`` too, where they are simply never reached."""
    from starlette.routing import Route

    from gpufleet.proxy.endpoint import ForwardEndpoint
    from gpufleet.proxy.ollama import FORWARDED as OLLAMA
    from gpufleet.proxy.openai import FORWARDED as OPENAI

    routes: list[BaseRoute] = [
        Route(path, ForwardEndpoint("ollama", path, auth=auth, set_keep_alive=True),
              methods=["POST"])
        for path in OLLAMA
    ]
    routes += [
        Route(path, ForwardEndpoint("openai", path, auth=auth), methods=["POST"])
        for path in OPENAI
    ]
    return routes
