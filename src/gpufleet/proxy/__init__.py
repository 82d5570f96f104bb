"""gpufleet's Ollama- (``/api/*``, ``GET /``) and OpenAI- (``/v1/*``) compatible front door.

``build_proxy_router(auth=…)`` returns one router with both. ``auth`` is the API's
``authenticate`` dependency (passed in, because ``gpufleet.proxy`` and
``gpufleet.api`` must not import each other); ``None`` serves without keys.
The per-app state lives in ``Components.extras["proxy"]`` (a ``ProxyService``,
built by the lifespan; closed with ``await service.aclose()``).
"""

from __future__ import annotations

from fastapi import APIRouter

from gpufleet.proxy.config import ProxySettings
from gpufleet.proxy.streaming import Authenticator, ProxyService, make_http_client

__all__ = ["ProxyService", "ProxySettings", "build_proxy_router", "make_http_client"]


def build_proxy_router(auth: Authenticator | None = None) -> APIRouter:
    from gpufleet.proxy.ollama import build_ollama_router
    from gpufleet.proxy.openai import build_openai_router

    router = APIRouter()
    router.include_router(build_ollama_router(auth))
    router.include_router(build_openai_router(auth))
    return router
