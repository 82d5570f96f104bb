"""The engine interface: how gpufleet talks to one GPU worker (ComfyUI or Ollama).

An ``EngineClient`` is stateless about workers: every call takes the worker's
``base_url``, so one client (sharing one ``httpx.AsyncClient``) serves a whole
pool. The dispatcher calls ``run`` for a leased task, the registry polls
``health`` and ``inventory``, and ``pull`` warms a fresh Ollama worker.

Contract every implementation keeps (``tests/contract/test_engine_contract.py``):

- ``health`` never raises for an unreachable or unready worker; it answers
  ``Health(ok=False, detail=...)`` (a cloud gateway answers 502 until the engine
  listens: a running instance is not a ready worker).
- ``run`` returns the task's result (JSON-able) or raises an ``EngineError``:
  ``EngineUnavailable`` (transient: worker down, 5xx, timeout, garbage, dropped
  connection — run it again, elsewhere) or ``EngineRejected`` (terminal: the
  worker refused this input; running it again changes nothing). ``details`` keeps
  the worker's own words (``node_errors`` for ComfyUI).
- **Cancellation**: when the ``cancel`` event is set, ``run`` stops the work on
  the worker (ComfyUI: remove from the queue and interrupt; Ollama: close the
  request, which Ollama treats as cancelled) and *returns* ``cancelled_result(...)``,
  a dict with ``"cancelled": True``; check it with ``is_cancelled(result)``. It does
  not raise ``asyncio.CancelledError``, which stays reserved for the dispatcher's own
  task being cancelled (shutdown) — then ``run`` cleans up the same way and re-raises.
- Progress goes to ``on_event`` as small dicts with a ``"type"`` key (see each
  engine's docstring); a failing ``on_event`` is logged, never fatal to the run.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from gpufleet.errors import EngineRejected, EngineUnavailable
from gpufleet.results import ResultStore
from gpufleet.worker_auth import WorkerAuth

logger = logging.getLogger(__name__)

OnEvent = Callable[[dict[str, Any]], Awaitable[None]]
T = TypeVar("T")

# Worker bodies can be large (ComfyUI tracebacks with tensor reprs); errors keep a prefix.
MAX_ERROR_BODY_CHARS = 500


@dataclass(frozen=True)
class Inventory:
    """Models a worker has on disk (``present``) and in memory (``loaded``)."""

    models_present: tuple[str, ...] = ()
    models_loaded: tuple[str, ...] = ()


@dataclass(frozen=True)
class Health:
    """One health probe: ``ok`` means the engine itself answered, not just its gateway."""

    ok: bool
    version: str = ""
    models_present: tuple[str, ...] = ()
    models_loaded: tuple[str, ...] = ()
    status_code: int | None = None
    detail: str = ""


def cancelled_result(**extra: Any) -> dict[str, Any]:
    """The result ``run`` returns when its ``cancel`` event was set."""
    return {"cancelled": True, **extra}


def is_cancelled(result: dict[str, Any]) -> bool:
    return result.get("cancelled") is True


async def emit(on_event: OnEvent, event: dict[str, Any]) -> None:
    """Call ``on_event``; a broken listener must not fail the task it listens to."""
    try:
        await on_event(event)
    except Exception:
        logger.exception("on_event failed for %s event", event.get("type"))


async def run_or_cancel(
    work: Coroutine[Any, Any, T], cancel: asyncio.Event | None
) -> tuple[bool, T | None]:
    """Run ``work`` until it ends or ``cancel`` is set: ``(False, result)`` or ``(True, None)``.

    ``work`` is cancelled (its HTTP request closed) when ``cancel`` wins, and also when
    the caller itself is cancelled; a finished ``work`` wins a tie.
    """
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
    try:
        await asyncio.wait([t for t in (task, waiter) if t], return_when=asyncio.FIRST_COMPLETED)
    finally:
        pending = [t for t in (task, waiter) if t and not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if task.cancelled():
        return True, None
    return False, task.result()


async def _ignore_event(event: dict[str, Any]) -> None:
    return None


class EngineClient(ABC):
    """Talks to workers of one engine kind over HTTP."""

    name: str = "engine"

    def __init__(self, http: httpx.AsyncClient, *, request_timeout_s: float = 30.0) -> None:
        self.http = http
        # Per HTTP call (connect, each read); a render may take far longer in total.
        self.request_timeout_s = request_timeout_s

    def __repr__(self) -> str:
        return f"<{type(self).__name__} timeout={self.request_timeout_s}s>"

    @abstractmethod
    async def health(self, base_url: str, *, inventory: bool = False) -> Health:
        """Probe the worker cheaply; with ``inventory``, also list its models."""

    @abstractmethod
    async def inventory(self, base_url: str) -> Inventory:
        """Models present and loaded; raises ``EngineUnavailable`` if unreachable."""

    @abstractmethod
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
        """Run one task to its end; see the module docstring for the contract."""

    @abstractmethod
    async def cancel(self, base_url: str, *, task_id: str) -> None:
        """Stop ``task_id``'s work on the worker if it is there; a no-op otherwise."""

    async def pull(self, base_url: str, model: str, on_event: OnEvent = _ignore_event) -> None:
        """Fetch ``model`` onto the worker; engines without model pulls do nothing."""
        return None

    # -- helpers shared by the implementations ---------------------------------------------

    def worker_headers(self, url: str) -> dict[str, str]:
        """The worker's secret for a connection httpx does not make (a websocket); httpx
        requests get it from the client's ``WorkerAuth``."""
        auth = getattr(self.http, "auth", None)
        return auth.tokens.headers_for(url) if isinstance(auth, WorkerAuth) else {}

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One HTTP call with transport failures mapped to ``EngineUnavailable``."""
        kwargs.setdefault("timeout", self.request_timeout_s)
        try:
            return await self.http.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Nothing listens (or the host is gone): the worker, not this task, is the problem.
            raise EngineUnavailable(
                f"{self.name}: {method} {url} failed: {type(exc).__name__}: {exc}",
                url=url, unreachable=True,
            ) from exc
        except httpx.TimeoutException as exc:
            raise EngineUnavailable(f"{self.name}: {method} {url} timed out", url=url) from exc
        except httpx.HTTPError as exc:
            raise EngineUnavailable(
                f"{self.name}: {method} {url} failed: {type(exc).__name__}: {exc}", url=url
            ) from exc


def body_excerpt(response: httpx.Response) -> str:
    text = response.text
    return text if len(text) <= MAX_ERROR_BODY_CHARS else text[:MAX_ERROR_BODY_CHARS] + "…"


def parse_json(response: httpx.Response, engine: str) -> Any:
    """The JSON body, or ``EngineUnavailable`` if a worker answered garbage."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineUnavailable(
            f"{engine}: {response.request.url.path} answered {response.status_code} "
            f"with non-JSON: {body_excerpt(response)!r}",
            status=response.status_code,
        ) from exc


def check_status(response: httpx.Response, engine: str) -> None:
    """Map an error status to our tree: 5xx/408/429 transient, other 4xx terminal."""
    status = response.status_code
    if status < 400:
        return
    message = _error_message(response)
    text = f"{engine}: {response.request.url.path} answered {status}: {message}"
    if status >= 500 or status in (408, 429):
        raise EngineUnavailable(text, status=status)
    raise EngineRejected(text, status=status)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body_excerpt(response)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if error else body_excerpt(response)
