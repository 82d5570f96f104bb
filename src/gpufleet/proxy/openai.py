"""The OpenAI-compatible front door: ``/v1/*``, forwarded to the worker's own ``/v1/*``.

Any OpenAI SDK works with ``base_url="http://gpufleet:8000/v1"``. Completions and
embeddings go to a worker through ``endpoint.ForwardEndpoint`` (SSE passes
through byte for byte; the body is not rewritten, so the worker's
``OLLAMA_KEEP_ALIVE`` governs how long it keeps the model). ``/v1/models`` is
answered from gpufleet's inventory. Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.routing import Route

from gpufleet.proxy.endpoint import Authenticator, ForwardEndpoint
from gpufleet.proxy.ollama import inventory
from gpufleet.proxy.relay import error_payload, get_service
from gpufleet.routing import normalize_model

FORWARDED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "gpufleet"}


def build_openai_router(auth: Authenticator | None = None) -> APIRouter:
    deps = [Depends(auth)] if auth is not None else []
    router = APIRouter(tags=["openai"])

    @router.get("/v1/models", dependencies=deps)
    async def models(request: Request) -> JSONResponse:
        names = sorted(await inventory(get_service(request.app)))
        return JSONResponse({"object": "list", "data": [_model(n) for n in names]})

    @router.get("/v1/models/{model:path}", dependencies=deps)
    async def model(request: Request, model: str) -> JSONResponse:
        name = normalize_model(model)
        if name not in await inventory(get_service(request.app)):
            message = f"The model `{model}` does not exist"
            return JSONResponse(error_payload("openai", message, 404), status_code=404)
        return JSONResponse(_model(model))

    for path in FORWARDED:
        endpoint = ForwardEndpoint("openai", path, auth=auth)
        router.routes.append(Route(path, endpoint, methods=["POST"]))
    return router
