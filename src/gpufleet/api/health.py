"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gpufleet import __version__
from gpufleet.api.deps import get_components
from gpufleet.api.errors import error_body
from gpufleet.errors import Unauthenticated

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/ready", summary="Redis answers and background loops run", response_model=None)
async def ready(request: Request) -> dict[str, Any] | JSONResponse:
    components = get_components(request)
    try:
        await asyncio.wait_for(components.redis.ping(), timeout=2.0)
    except Exception as exc:  # any failure to answer means not ready
        return JSONResponse(
            error_body("not_ready", f"redis not answering: {type(exc).__name__}"),
            status_code=503,
        )
    dead = [t.get_name() for t in components.loops if t.done()]
    if dead:
        return JSONResponse(
            error_body("not_ready", f"background loops stopped: {', '.join(dead)}"),
            status_code=503,
        )
    return {"status": "ready", "redis": "ok", "loops": [t.get_name() for t in components.loops]}


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    token = get_components(request).settings.auth.metrics_token
    if token is not None:
        expected = f"Bearer {token.get_secret_value()}".encode()
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise Unauthenticated("/metrics needs the configured bearer token")
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
