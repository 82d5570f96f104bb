"""One place that turns errors into HTTP answers: ``{"error": {"code", "message"}}``.

gpufleet's own API (``/api/v1/…``, ``/health``, ``/ready``) always answers errors
in that shape. The Ollama/OpenAI-compatible proxy formats its own errors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpufleet import errors

logger = logging.getLogger(__name__)

# Most specific first: the first isinstance match wins.
STATUS_BY_ERROR: list[tuple[type[errors.GpufleetError], int]] = [
    (errors.Unauthenticated, 401),
    (errors.Forbidden, 403),
    (errors.LimitExceeded, 429),
    (errors.BudgetExhausted, 402),
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


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An error in the shape the caller's API speaks.

    gpufleet's own API: ``{"error": {"code", "message"}}``; the Ollama-native proxy
    (``/api/…`` but not ``/api/v1/…``): ``{"error": "message"}``; the OpenAI-compatible
    proxy (``/v1/…``): ``{"error": {"message", "type", "param", "code"}}``.
    """
    path = request.url.path
    body: dict[str, Any]
    if path.startswith("/api/") and not path.startswith("/api/v1/"):
        body = {"error": message}
    elif path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "api_error"
        if status == 404:
            kind = "not_found_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    else:
        body = error_body(code, message, **extra)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def status_for(exc: errors.GpufleetError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


async def _gpufleet_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.GpufleetError)
    status = status_for(exc)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if isinstance(exc, errors.Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    if status >= 500:
        logger.warning("%s %s -> %s: %s", request.method, request.url.path, status, exc)
    extra: dict[str, Any] = {}
    if isinstance(exc, errors.BudgetExhausted):
        extra = {"team": exc.team, "period": exc.period, "resets_at": exc.resets_at}
    return error_response(request, status, exc.code, str(exc), headers, **extra)


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
    return error_response(request, 422, "validation_error", message, fields=fields)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {
        400: "bad_request",
        404: "not_found",
        405: "method_not_allowed",
        408: "request_timeout",
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
    return error_response(request, 500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.GpufleetError, _gpufleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    document_errors(app)


# -- the error answers, in the OpenAPI document ---------------------------------------------

ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "title": "Error",
        "description": "gpufleet's error answer.",
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "fields": {
                        "type": "array",
                        "description": "Validation errors only: one entry per bad field.",
                        "items": {
                            "type": "object",
                            "required": ["field", "message"],
                            "properties": {
                                "field": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        },
                    },
                },
            }
        },
    },
    "OllamaError": {
        "title": "OllamaError",
        "description": "An error as Ollama answers it.",
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "OpenAIError": {
        "title": "OpenAIError",
        "description": "An error as the OpenAI API answers it.",
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
}
_DESCRIPTIONS = {
    "400": "The body cannot be read as JSON.",
    "401": "Missing, invalid or revoked API key.",
    "402": "The team's spend budget for the day or month is spent (code budget_exhausted).",
    "403": "This key may not do this (admin only, or above the key's limits).",
    "404": "No such resource (another key's task is not found either).",
    "422": "The request does not validate; each bad field is named.",
    "429": "Over the key's rate limit; see Retry-After.",
    "503": "Redis cannot be asked (limits fail closed), or a dependency is unavailable.",
}


def _error_schema_name(path: str) -> str:
    if path.startswith("/api/") and not path.startswith("/api/v1/"):
        return "OllamaError"
    if path.startswith("/v1/"):
        return "OpenAIError"
    return "Error"


def add_error_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Document every error answer the handlers above give, in place.

    Operations behind a key (they carry ``security``) can answer 401, 403, 429 and 503;
    those with path parameters 404; those with a body 400 (not JSON at all); those
    with parameters or a body 422. Every error
    response, including ones a router declares itself, gets the shape of its API
    (``Error``, ``OllamaError`` or ``OpenAIError``) instead of FastAPI's
    ``HTTPValidationError``, which gpufleet never sends.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(ERROR_SCHEMAS)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        ref = {"$ref": f"#/components/schemas/{_error_schema_name(path)}"}
        for operation in operations.values():
            if isinstance(operation, dict) and "responses" in operation:
                _document_operation(operation, ref)
    return schema


def _document_operation(operation: dict[str, Any], ref: dict[str, str]) -> None:
    responses: dict[str, Any] = operation["responses"]
    codes: list[str] = []
    if operation.get("security"):
        codes += ["401", "403", "429", "503"]
    params = operation.get("parameters", [])
    if any(p.get("in") == "path" for p in params):
        codes.append("404")
    if "requestBody" in operation:
        codes.append("400")
    if params or "requestBody" in operation:
        codes.append("422")
    for code in codes:
        responses.setdefault(code, {"description": _DESCRIPTIONS[code]})
    for code, response in responses.items():
        if code[:1] not in "45":
            continue
        if code in _DESCRIPTIONS and response.get("description") in (None, "Validation Error"):
            response["description"] = _DESCRIPTIONS[code]
        response.setdefault("description", "Error.")
        response["content"] = {"application/json": {"schema": ref}}


def document_errors(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the error answers (see ``add_error_responses``)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_error_responses(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
