"""Ollama engine: health, model inventory, queued inference and model pulls.

Health is ``GET /api/version`` (cheap; never an inference call). Inventory is
``GET /api/tags`` (models present) and ``GET /api/ps`` (models loaded). A queued
task's payload is ``{"api": "chat" | "generate" | "embed", "body": {...}}``; the
engine forces ``stream: false`` and sets ``keep_alive`` to ``keep_alive_s``
(gpufleet passes at least the pool's idle timeout, so Ollama does not unload a
model under a worker gpufleet still counts as warm; a negative value keeps it
forever). The result is Ollama's own response body. ``pull`` streams
``/api/pull`` and reports progress as ``pull`` events (on each status change and
every 10 % of a layer).

Events to ``on_event``: ``started {api, model}``, ``finished {eval_count}``,
``pull {model, status, completed, total}``.

Error classification: 400 and 404 (``model 'x' not found``: the payload names a
model this worker does not have; routing should not have sent it here, and the
user must fix the request) → ``EngineRejected``; connection errors, timeouts,
408/429, 5xx (incl. 503 "server busy"), non-JSON or error-carrying 200s, 200s whose
JSON is not the API's answer (no ``message`` / ``response`` / ``embeddings``), dropped
connections → ``EngineUnavailable``. A pull that fails because the model does not
exist in the registry → ``EngineRejected``; other pull failures → unavailable.
Cancellation closes the HTTP request (Ollama stops generating when its client
goes away); there is no server-side cancel by id, so ``cancel()`` is a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import httpx

from gpufleet.engines.base import (
    EngineClient,
    Health,
    Inventory,
    OnEvent,
    _ignore_event,
    body_excerpt,
    cancelled_result,
    check_status,
    emit,
    parse_json,
    run_or_cancel,
)
from gpufleet.errors import EngineRejected, EngineUnavailable
from gpufleet.results import ResultStore

logger = logging.getLogger(__name__)

API_PATHS = {"chat": "/api/chat", "generate": "/api/generate", "embed": "/api/embed"}


def keep_alive_value(keep_alive_s: float) -> int:
    """Ollama's ``keep_alive`` in whole seconds (rounded up); negative means forever."""
    return -1 if keep_alive_s < 0 else math.ceil(keep_alive_s)


class OllamaEngine(EngineClient):
    name = "ollama"

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        request_timeout_s: float = 30.0,
        run_timeout_s: float = 600.0,
    ) -> None:
        super().__init__(http, request_timeout_s=request_timeout_s)
        # A non-streaming answer arrives in one piece at the end, so the read timeout of
        # an inference call must cover the whole generation (long answers on slow GPUs).
        self.run_timeout_s = run_timeout_s

    async def health(self, base_url: str, *, inventory: bool = False) -> Health:
        try:
            response = await self.request("GET", f"{base_url}/api/version")
        except EngineUnavailable as exc:
            return Health(ok=False, detail=str(exc))
        if response.status_code != 200:
            return Health(ok=False, status_code=response.status_code,
                          detail=body_excerpt(response))
        try:
            version = str(response.json()["version"])
        except (ValueError, KeyError, TypeError):
            return Health(ok=False, status_code=200, detail="/api/version is not Ollama's")
        models = await self.inventory(base_url) if inventory else Inventory()
        return Health(ok=True, version=version, models_present=models.models_present,
                      models_loaded=models.models_loaded, status_code=200)

    async def inventory(self, base_url: str) -> Inventory:
        present = await self._model_names(f"{base_url}/api/tags")
        loaded = await self._model_names(f"{base_url}/api/ps")
        return Inventory(models_present=present, models_loaded=loaded)

    async def _model_names(self, url: str) -> tuple[str, ...]:
        response = await self.request("GET", url)
        check_status(response, self.name)
        body = parse_json(response, self.name)
        try:
            return tuple(str(m.get("model") or m["name"]) for m in body["models"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise EngineUnavailable(f"ollama: {url} answered {body_excerpt(response)!r}") from exc

    async def run(
        self,
        base_url: str,
        payload: dict[str, Any],
        *,
        task_id: str,
        on_event: OnEvent = _ignore_event,
        cancel: asyncio.Event | None = None,
        results: ResultStore | None = None,
        keep_alive_s: float | None = None,
    ) -> dict[str, Any]:
        api, body = payload.get("api"), payload.get("body")
        if api not in API_PATHS or not isinstance(body, dict):
            raise EngineRejected(
                "ollama: a task payload is {\"api\": \"chat\"|\"generate\"|\"embed\", "
                "\"body\": {...}}", api=str(api)
            )
        body = {**body, "stream": False}
        if keep_alive_s is not None:
            body["keep_alive"] = keep_alive_value(keep_alive_s)
        model = body.get("model")
        await emit(on_event, {"type": "started", "api": api, "model": model})
        timeout = httpx.Timeout(self.request_timeout_s, read=self.run_timeout_s)
        cancelled, response = await run_or_cancel(
            self.request("POST", base_url + API_PATHS[api], json=body, timeout=timeout), cancel
        )
        if cancelled or response is None:
            logger.info("task %s cancelled on %s", task_id, base_url)
            return cancelled_result()
        if response.status_code == 404:
            raise EngineRejected(f"ollama: model {model!r} not found on the worker "
                                 f"({body_excerpt(response)})", status=404, model=model)
        check_status(response, self.name)
        result = parse_json(response, self.name)
        if not isinstance(result, dict) or "error" in result or not _is_answer(api, result):
            # Not Ollama's answer (a gateway page, another service, a broken worker): the
            # task did not run, whatever the status said.
            raise EngineUnavailable(f"ollama: {api} answered {body_excerpt(response)!r}")
        await emit(on_event, {"type": "finished", "eval_count": result.get("eval_count")})
        logger.info("task %s %s %s done on %s", task_id, api, model, base_url)
        return result

    async def cancel(self, base_url: str, *, task_id: str) -> None:
        logger.debug("ollama has no cancel by id; task %s stops when its request closes",
                     task_id)

    async def pull(self, base_url: str, model: str, on_event: OnEvent = _ignore_event) -> None:
        """Pull ``model`` with NDJSON progress; returns once Ollama says ``success``."""
        logger.info("ollama %s: pulling %s", base_url, model)
        last: tuple[str, int] = ("", -1)
        try:
            async with self.http.stream("POST", f"{base_url}/api/pull",
                                        json={"model": model, "stream": True},
                                        timeout=self.request_timeout_s) as response:
                if response.status_code != 200:
                    await response.aread()
                    _raise_pull_error(model, _error_text(response), response.status_code)
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    status = _parse_line(line, model)
                    if status.get("error"):
                        _raise_pull_error(model, str(status["error"]), 200)
                    decile = _decile(status)
                    if (status.get("status", ""), decile) != last:
                        last = (status.get("status", ""), decile)
                        await emit(on_event, {"type": "pull", "model": model,
                                              "status": status.get("status"),
                                              "completed": status.get("completed"),
                                              "total": status.get("total")})
        except httpx.TimeoutException as exc:
            raise EngineUnavailable(f"ollama: pull of {model} timed out") from exc
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"ollama: pull of {model} failed: {exc!r}") from exc
        if last[0] != "success":
            raise EngineUnavailable(f"ollama: pull of {model} ended at {last[0]!r}")
        logger.info("ollama %s: pulled %s", base_url, model)


# What each API's answer must carry to count as one (``stream: false``).
_ANSWER_FIELDS: dict[str, tuple[str, type]] = {
    "chat": ("message", dict),
    "generate": ("response", str),
    "embed": ("embeddings", list),
}


def _is_answer(api: str, result: dict[str, Any]) -> bool:
    name, kind = _ANSWER_FIELDS[api]
    return isinstance(result.get(name), kind)


def _parse_line(line: str, model: str) -> dict[str, Any]:
    try:
        status = json.loads(line)
    except ValueError as exc:
        raise EngineUnavailable(f"ollama: pull of {model} sent {line[:200]!r}") from exc
    if not isinstance(status, dict):
        raise EngineUnavailable(f"ollama: pull of {model} sent {line[:200]!r}")
    return status


def _decile(status: dict[str, Any]) -> int:
    total, completed = status.get("total") or 0, status.get("completed") or 0
    return int(10 * completed / total) if total else -1


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or body_excerpt(response))
    except (ValueError, AttributeError):
        return body_excerpt(response)


def _raise_pull_error(model: str, message: str, status: int) -> None:
    text = f"ollama: pull of {model} failed: {message}"
    if "does not exist" in message or "not found" in message or status in (400, 404):
        raise EngineRejected(text, status=status, model=model)
    raise EngineUnavailable(text, status=status, model=model)
