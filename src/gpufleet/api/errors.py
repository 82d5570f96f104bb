"""One place that turns errors into HTTP answers: ``{"error": {"code", "message"}}``.

gpufleet's own API (``/api/v1/…``, ``/health``, ``/ready``) always answers errors
in that shape. The Ollama/OpenAI-compatible proxy formats its own errors.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpufleet import errors

logger = logging.getLogger(__name__)

# Most specific first: the first isinstance match wins.
STATUS_BY_ERROR: list[tuple[type[errors.GpufleetError], int]] = [
    (errors.TaskNotFound, 404),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.IdempotencyConflict, 409),
    (errors.InvalidState, 409),
    (errors.EngineRejected, 422),
    (errors.RateLimited, 503),
    (errors.StoreError, 503),
    (errors.ProviderUnavailable, 503),
    (errors.InsufficientCapacity, 503),
    (errors.EngineUnavailable, 503),
    (errors.ProviderError, 502),
    (errors.EngineError, 502),
]


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def status_for(exc: errors.GpufleetError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


async def _gpufleet_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.GpufleetError)
    status = status_for(exc)
    headers = {}
    if isinstance(exc, errors.RateLimited) and exc.retry_after:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if status >= 500:
        logger.warning("%s %s -> %s: %s", request.method, request.url.path, status, exc)
    return JSONResponse(error_body(exc.code, str(exc)), status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        fields.append({"field": ".".join(loc), "message": err.get("msg", "")})
    message = (
        "; ".join(f"{f['field']}: {f['message']}" if f["field"] else f["message"] for f in fields)
        or "invalid request"
    )
    return JSONResponse(error_body("validation_error", message, fields=fields), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
        401: "unauthorized",
        403: "forbidden",
        409: "conflict",
        429: "rate_limited",
    }.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s: unexpected error", request.method, request.url.path)
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.GpufleetError, _gpufleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
