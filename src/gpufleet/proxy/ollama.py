"""The Ollama-native front door: ``/api/*`` and ``GET``/``HEAD /``.

Any Ollama client works by pointing ``OLLAMA_HOST`` at gpufleet. Inference calls
(``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``) go to a
worker through ``endpoint.ForwardEndpoint`` (NDJSON passes through byte for byte;
gpufleet sets ``keep_alive``). ``/api/tags`` and ``/api/ps`` are answered from
gpufleet's inventory (pool config + the worker registry) without touching a worker,
so a parked pool's models are listed. Model management is refused: models are
configured per pool. Errors are Ollama's ``{"error": "…"}``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route

from gpufleet.domain import WorkerState
from gpufleet.proxy.endpoint import (
    Authenticator,
    BodyTimeout,
    ClientGone,
    ForwardEndpoint,
    model_of,
    read_body,
)
from gpufleet.proxy.relay import ProxyService, get_service
from gpufleet.routing import normalize_model, pick_worker, pools_serving
from gpufleet.worker_auth import TOKEN_HEADER

logger = logging.getLogger(__name__)

# The Ollama API level gpufleet speaks; clients use /api/version only to gate features.
OLLAMA_COMPAT_VERSION = "0.12.0"
_EPOCH = "1970-01-01T00:00:00Z"
FORWARDED = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
MANAGEMENT = {
    "/api/pull": "POST",
    "/api/push": "POST",
    "/api/create": "POST",
    "/api/copy": "POST",
    "/api/delete": "DELETE",
    "/api/blobs/{digest}": "POST",
}


def _details() -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


async def inventory(service: ProxyService) -> dict[str, dict[str, Any]]:
    """Every model gpufleet can serve: configured on an Ollama pool, or present on one of
    its workers. Value: where it is (pools) and whether any ready worker has it loaded."""
    models: dict[str, dict[str, Any]] = {}
    ollama_pools = [p for p in service.pools.values() if p.engine == "ollama"]
    for pool in ollama_pools:
        for name in pool.models:
            entry = models.setdefault(normalize_model(name), {"pools": set(), "loaded": []})
            entry["pools"].add(pool.name)
    names = {p.name for p in ollama_pools}
    for worker in await service.broker.workers():
        if worker.pool not in names:
            continue
        for name in worker.models_present + worker.models_loaded:
            entry = models.setdefault(normalize_model(name), {"pools": set(), "loaded": []})
            entry["pools"].add(worker.pool)
        if worker.state is WorkerState.ready:
            for name in worker.models_loaded:
                models[normalize_model(name)]["loaded"].append(worker)
    return models


def _tag(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": _EPOCH,
        "size": 0,
        "digest": "",
        "details": _details(),
    }


async def root(request: Request) -> Response:
    """Ollama clients probe ``/`` for this text; a browser is sent to the status page."""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/ui", status_code=307)
    return PlainTextResponse("Ollama is running")


async def version() -> JSONResponse:
    return JSONResponse({"version": OLLAMA_COMPAT_VERSION})


async def tags(request: Request) -> JSONResponse:
    models = await inventory(get_service(request.app))
    return JSONResponse({"models": [_tag(name) for name in sorted(models)]})


def _is_admin(request: Request) -> bool:
    """The caller's role, from the principal ``authenticate`` left on the request (no auth
    dependency, as in a bare proxy app: everyone is admin)."""
    principal = getattr(request.state, "principal", None)
    return principal is None or bool(getattr(principal, "is_admin", False))


async def ps(request: Request) -> JSONResponse:
    """Loaded models; admin keys also get the ids of the workers holding each (user keys
    get only ``worker_count``: which machines run what is not theirs to see)."""
    service = get_service(request.app)
    admin = _is_admin(request)
    loaded = []
    for name, entry in sorted((await inventory(service)).items()):
        if not entry["loaded"]:
            continue
        expires = max(
            (w.last_busy_at or w.ready_since or 0.0) + service.pools[w.pool].idle_timeout_ceiling_s
            for w in entry["loaded"]
        )
        loaded.append(
            {
                **_tag(name),
                "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
                "size_vram": 0,
                "worker_count": len(entry["loaded"]),
                **({"workers": sorted(w.id for w in entry["loaded"])} if admin else {}),
            }
        )
    return JSONResponse({"models": loaded})


SHOW_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {"model": {"type": "string"}, "verbose": {"type": "boolean"}},
                }
            }
        },
    }
}


async def show(request: Request) -> Response:
    service = get_service(request.app)
    try:
        raw = await read_body(
            request.receive,
            service.max_body_bytes,
            timeout_s=service.body_timeout_s,
            declared=request.headers.get("content-length"),
        )
    except ClientGone:
        return Response(status_code=499)
    except BodyTimeout as exc:
        return JSONResponse({"error": str(exc)}, status_code=408,
                            headers={"Connection": "close"})
    if raw is None:
        return JSONResponse({"error": "request body too large"}, status_code=413)
    try:
        payload = json.loads(raw or b"null")
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return JSONResponse({"error": "invalid JSON body"}, status_code=400)
    model = model_of(payload) if isinstance(payload, dict) else ""
    if not model:
        return JSONResponse({"error": "model is required"}, status_code=400)
    served = pools_serving(model, service.pools.values())
    if not served and model not in await inventory(service):
        return JSONResponse({"error": f"model '{model}' not found"}, status_code=404)
    for worker in pick_worker(model, await service.broker.workers(), service.pools)[:2]:
        try:  # metadata only: no slot; the worker answers from its manifest
            upstream = await service.http.post(
                worker.base_url.rstrip("/") + "/api/show",
                json=payload,
                headers={TOKEN_HEADER: worker.token} if worker.token else None,
            )
        except httpx.TransportError as exc:
            logger.warning("proxy /api/show %s: worker %s failed (%s)", model, worker.id, exc)
            continue
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type", "application/json"),
        )
    return JSONResponse(  # configured but parked: what gpufleet knows without a worker
        {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": _details(),
            "model_info": {},
            "capabilities": ["completion"],
            "modified_at": _EPOCH,
        }
    )


async def management(request: Request) -> JSONResponse:
    message = (
        f"{request.url.path} is not available through gpufleet: models are configured "
        "per pool (the 'models' list in config.toml)"
    )
    return JSONResponse({"error": message}, status_code=403)


def build_ollama_router(auth: Authenticator | None = None) -> APIRouter:
    deps = [Depends(auth)] if auth is not None else []
    router = APIRouter(tags=["ollama"])
    hidden: dict[str, Any] = {"include_in_schema": False}
    router.add_api_route("/", root, methods=["GET", "HEAD"], **hidden)
    router.add_api_route("/api/version", version, methods=["GET"])
    router.add_api_route("/api/tags", tags, methods=["GET"], dependencies=deps)
    # HEAD apart and out of the schema: one route with both methods gives two operations
    # the same operationId.
    router.add_api_route("/api/version", version, methods=["HEAD"], **hidden)
    router.add_api_route("/api/tags", tags, methods=["HEAD"], dependencies=deps, **hidden)
    router.add_api_route("/api/ps", ps, methods=["GET"], dependencies=deps)
    router.add_api_route(
        "/api/show",
        show,
        methods=["POST"],
        dependencies=deps,
        openapi_extra=SHOW_OPENAPI,
        responses={400: {"description": "No JSON body or no model."},
                   404: {"description": "No pool serves this model."},
                   413: {"description": "Body larger than [server] max_proxy_body_bytes."}},
    )
    for path, method in MANAGEMENT.items():
        router.add_api_route(path, management, methods=[method], dependencies=deps, **hidden)
    for path in FORWARDED:
        endpoint = ForwardEndpoint("ollama", path, auth=auth, set_keep_alive=True)
        router.routes.append(Route(path, endpoint, methods=["POST"]))
    return router
