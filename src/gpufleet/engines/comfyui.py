"""ComfyUI engine: runs an API-format graph on one worker and copies its outputs home.

Health is ``GET /system_stats`` (a Novita gateway answers 502 until ComfyUI
listens). A run opens ``/ws?clientId=<fresh id>`` first, then POSTs
``{prompt, client_id, prompt_id}`` (``prompt_id`` is a UUID derived from the task
id, so ``cancel(task_id=...)`` needs no memory) and follows the socket until
``execution_success`` / ``execution_error`` / ``execution_interrupted``. If the
socket cannot be opened, or drops, it polls ``/history/{prompt_id}`` (and
``/queue``, to notice a prompt the worker lost). Every output file
(``type: output``) is fetched from ``/view`` and put into the ``ResultStore``
before ``run`` returns: workers are deleted on scale-down.

Events to ``on_event``: ``queued {prompt_id, number}``, ``started``, ``executing
{node, class_type}``, ``progress {node, value, max}``, ``executed {node}``,
``polling {reason}`` (fell back from the socket), ``output {filename, size}``.

Error classification (the retry rule is ``error.transient``):

- 400 from ``POST /prompt`` → ``EngineRejected``; ``details`` has ComfyUI's
  ``error`` and ``node_errors``. The graph is invalid on this image; no retry helps.
- connection errors, timeouts, 5xx, non-JSON bodies, a socket that dropped while
  the worker stopped answering, no progress for ``stall_timeout_s``, a prompt that
  vanished from queue and history, an interrupt we did not ask for, a missing
  output file → ``EngineUnavailable``.
- ``execution_error`` at run time: **out-of-memory** errors (CUDA OOM, allocation
  failures) → ``EngineUnavailable``, since another worker (or the same one, less
  loaded) may well succeed; **every other** execution error → ``EngineRejected``,
  because it is deterministic for the graph (a bad input, a path outside the
  output folder, a missing model) and a retry only burns GPU time. ``details``
  keeps node_id, node_type, exception_type and exception_message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

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
from gpufleet.errors import EngineError, EngineRejected, EngineUnavailable
from gpufleet.results import ResultStore, guess_content_type, sanitize_name

logger = logging.getLogger(__name__)

# The websockets library logs handshake headers at DEBUG, the worker's secret among them:
# its client logs go here, never below INFO, whatever the root level.
_WS_LOGGER = logging.getLogger("gpufleet.engines.comfyui.websocket")
_WS_LOGGER.setLevel(logging.INFO)
_PROMPT_NS = uuid.UUID("6c1f3a52-8f0e-4b7e-9d7a-0b6f2f0c1a11")
_OOM_MARKERS = ("outofmemory", "out of memory", "allocation on device", "cuda error: out")


def prompt_id_for(task_id: str) -> str:
    """The ComfyUI prompt id gpufleet uses for a task (stable, a canonical UUID)."""
    return str(uuid.uuid5(_PROMPT_NS, task_id))


class ComfyUIEngine(EngineClient):
    name = "comfyui"

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        request_timeout_s: float = 30.0,
        stall_timeout_s: float = 600.0,
        poll_interval_s: float = 0.5,
        websocket: bool = True,
    ) -> None:
        super().__init__(http, request_timeout_s=request_timeout_s)
        # No websocket frame for this long (or, when polling, no result for this long)
        # means a hung worker. Ten minutes covers a long VAE decode, which sends nothing.
        self.stall_timeout_s = stall_timeout_s
        self.poll_interval_s = poll_interval_s
        self.websocket = websocket

    async def health(self, base_url: str, *, inventory: bool = False) -> Health:
        try:
            response = await self.request("GET", f"{base_url}/system_stats")
        except EngineUnavailable as exc:
            return Health(ok=False, detail=str(exc))
        if response.status_code != 200:
            return Health(ok=False, status_code=response.status_code,
                          detail=body_excerpt(response))
        try:
            system = response.json()["system"]
            version = str(system.get("comfyui_version", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            return Health(ok=False, status_code=200, detail="system_stats is not ComfyUI's")
        models = await self.inventory(base_url) if inventory else Inventory()
        return Health(ok=True, version=version, models_present=models.models_present,
                      models_loaded=models.models_loaded, status_code=200)

    async def inventory(self, base_url: str) -> Inventory:
        """Checkpoints on disk (``/models/checkpoints``); ComfyUI does not say what is loaded."""
        response = await self.request("GET", f"{base_url}/models/checkpoints")
        if response.status_code == 404:
            return Inventory()
        check_status(response, self.name)
        names = parse_json(response, self.name)
        return Inventory(models_present=tuple(str(n) for n in names or ()))

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
        prompt_id = prompt_id_for(task_id)
        client_id = uuid.uuid4().hex
        ws = await self._connect(base_url, client_id) if self.websocket else None
        try:
            cancelled, entry = await run_or_cancel(
                self._submit_and_follow(base_url, payload, prompt_id, client_id, ws, on_event),
                cancel,
            )
        except asyncio.CancelledError:
            await asyncio.shield(self._stop(base_url, prompt_id))
            raise
        except EngineUnavailable as exc:
            if exc.details.get("stalled"):  # the worker answers but the prompt hangs: stop it
                await self._stop(base_url, prompt_id)
            raise
        finally:
            if ws is not None:
                await ws.close()
        if cancelled or entry is None:
            await self._stop(base_url, prompt_id)
            logger.info("task %s prompt %s cancelled", task_id, prompt_id)
            return cancelled_result(prompt_id=prompt_id)
        outputs = await self._copy_outputs(base_url, task_id, entry, results, on_event)
        logger.info("task %s prompt %s succeeded, %d outputs", task_id, prompt_id, len(outputs))
        return {"prompt_id": prompt_id, "outputs": outputs,
                "node_outputs": entry.get("outputs") or {}}

    async def cancel(self, base_url: str, *, task_id: str) -> None:
        await self._stop(base_url, prompt_id_for(task_id), quiet=False)

    # -- steps of a run -------------------------------------------------------------------

    async def _connect(self, base_url: str, client_id: str) -> ClientConnection | None:
        url = base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            return await connect(f"{url}/ws?clientId={client_id}", proxy=None, max_size=None,
                                 open_timeout=self.request_timeout_s,
                                 additional_headers=self.worker_headers(base_url) or None,
                                 logger=_WS_LOGGER)
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            logger.info("comfyui %s: no websocket (%s); will poll", base_url, exc)
            return None

    async def _submit_and_follow(
        self, base_url: str, graph: dict[str, Any], prompt_id: str, client_id: str,
        ws: ClientConnection | None, on_event: OnEvent,
    ) -> dict[str, Any]:
        body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        response = await self.request("POST", f"{base_url}/prompt", json=body)
        if response.status_code == 400:
            raise _rejected(parse_json(response, self.name))
        check_status(response, self.name)
        answer = parse_json(response, self.name)
        if not isinstance(answer, dict) or not answer.get("prompt_id"):
            raise EngineUnavailable(f"comfyui: /prompt answered {body_excerpt(response)!r}")
        prompt_id = str(answer["prompt_id"])  # an older ComfyUI mints its own
        await emit(on_event, {"type": "queued", "prompt_id": prompt_id,
                              "number": answer.get("number")})
        if ws is not None:
            try:
                await self._follow_socket(base_url, ws, graph, prompt_id, on_event)
            except ConnectionClosed as exc:
                logger.warning("comfyui %s: websocket dropped (%s); polling", base_url, exc)
                await emit(on_event, {"type": "polling", "reason": "websocket dropped"})
        return await self._poll(base_url, prompt_id)

    async def _follow_socket(self, base_url: str, ws: ClientConnection, graph: dict[str, Any],
                             prompt_id: str, on_event: OnEvent) -> None:
        """Relay progress until the prompt ends; errors raise, success returns."""
        started = False
        while True:
            try:
                async with asyncio.timeout(self.stall_timeout_s):
                    raw = await ws.recv()
            except TimeoutError:
                raise EngineUnavailable(
                    f"comfyui: no progress for {self.stall_timeout_s}s", stalled=True
                ) from None
            if isinstance(raw, bytes):
                continue  # preview images
            try:
                frame = json.loads(raw)
                kind, data = frame["type"], frame.get("data") or {}
            except (ValueError, KeyError, TypeError):
                continue
            if kind == "status" and "sid" not in data and not started:
                await self._check_still_there(base_url, prompt_id)  # the queue changed
            if data.get("prompt_id") != prompt_id:
                continue
            started = started or kind == "execution_start"
            if kind in ("execution_success", "execution_error", "execution_interrupted"):
                _raise_for_messages([[kind, data]])
                return
            if kind == "executing" and data.get("node") is None:
                return  # the legacy "done" signal
            event = _progress_event(kind, data, graph)
            if event is not None:
                await emit(on_event, event)

    async def _poll(self, base_url: str, prompt_id: str) -> dict[str, Any]:
        """Wait for the history entry (ComfyUI writes it just after execution_success)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stall_timeout_s
        while True:
            entry = await self._history(base_url, prompt_id)
            if entry is None:
                await self._check_still_there(base_url, prompt_id)
                entry = await self._history(base_url, prompt_id)
            if entry is not None:
                _raise_for_messages((entry.get("status") or {}).get("messages") or [])
                return entry
            if loop.time() > deadline:
                raise EngineUnavailable(f"comfyui: prompt {prompt_id} unfinished after "
                                        f"{self.stall_timeout_s}s", stalled=True)
            await asyncio.sleep(self.poll_interval_s)

    async def _check_still_there(self, base_url: str, prompt_id: str) -> None:
        """Raise if a prompt that has not started left the queue without a history entry."""
        if await self._queued(base_url, prompt_id):
            return
        if await self._history(base_url, prompt_id) is None:
            raise EngineUnavailable(f"comfyui: prompt {prompt_id} is neither queued "
                                    "nor in history (deleted, or the worker restarted)")

    async def _history(self, base_url: str, prompt_id: str) -> dict[str, Any] | None:
        response = await self.request("GET", f"{base_url}/history/{prompt_id}")
        check_status(response, self.name)
        body = parse_json(response, self.name)
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    async def _queued(self, base_url: str, prompt_id: str) -> bool:
        response = await self.request("GET", f"{base_url}/queue")
        check_status(response, self.name)
        body = parse_json(response, self.name)
        entries = [*body.get("queue_running", []), *body.get("queue_pending", [])]
        return any(len(e) > 1 and e[1] == prompt_id for e in entries)

    async def _stop(self, base_url: str, prompt_id: str, *, quiet: bool = True) -> None:
        """Remove the prompt from the queue, then interrupt it if it already runs."""
        try:
            for path, body in (("/queue", {"delete": [prompt_id]}),
                               ("/interrupt", {"prompt_id": prompt_id})):
                check_status(await self.request("POST", base_url + path, json=body), self.name)
        except EngineError as exc:
            if not quiet:
                raise
            logger.warning("comfyui %s: could not stop prompt %s: %s", base_url, prompt_id, exc)

    async def _copy_outputs(self, base_url: str, task_id: str, entry: dict[str, Any],
                            results: ResultStore | None,
                            on_event: OnEvent) -> list[dict[str, Any]]:
        """Fetch every ``type: output`` file from ``/view`` into ``results``."""
        copied: list[dict[str, Any]] = []
        for node_id, node_out in (entry.get("outputs") or {}).items():
            for item in _files(node_out):
                if results is None:
                    copied.append({**item, "node_id": node_id})
                    continue
                params = {k: item.get(k, "") for k in ("filename", "subfolder", "type")}
                response = await self.request("GET", f"{base_url}/view", params=params)
                if response.status_code != 200:
                    raise EngineUnavailable(f"comfyui: output {params['filename']!r} of node "
                                            f"{node_id} answered {response.status_code}")
                name = sanitize_name("_".join(p for p in (params["subfolder"],
                                                          params["filename"]) if p))
                if any(c["filename"] == name for c in copied):
                    name = sanitize_name(f"{node_id}_{name}")
                media = response.headers.get("content-type", "").split(";")[0]
                stored = await results.put(task_id, name, response.content,
                                           media or guess_content_type(name))
                copied.append({**stored.to_dict(), "node_id": str(node_id)})
                await emit(on_event, {"type": "output", "filename": name, "size": stored.size})
        return copied


def _files(node_out: Any) -> list[dict[str, Any]]:
    """Every file item under any key (images, gifs, videos, audio...) of an output."""
    if not isinstance(node_out, dict):
        return []
    return [item for items in node_out.values() if isinstance(items, list)
            for item in items if isinstance(item, dict) and item.get("filename")
            and item.get("type", "output") == "output"]


def _progress_event(
    kind: str, data: dict[str, Any], graph: dict[str, Any]
) -> dict[str, Any] | None:
    node = data.get("node")
    if kind == "execution_start":
        return {"type": "started", "prompt_id": data.get("prompt_id")}
    if kind == "executing":
        class_type = (graph.get(str(node)) or {}).get("class_type")
        return {"type": "executing", "node": node, "class_type": class_type}
    if kind == "progress":
        return {"type": "progress", "node": node, "value": data.get("value"),
                "max": data.get("max")}
    if kind == "executed":
        return {"type": "executed", "node": node}
    return None


def _rejected(body: Any) -> EngineRejected:
    if not isinstance(body, dict):
        return EngineRejected(f"comfyui: prompt rejected: {str(body)[:300]}", status=400)
    error = body.get("error") or {}
    node_errors = body.get("node_errors") or {}
    message = error.get("message", "prompt rejected") if isinstance(error, dict) else str(error)
    if isinstance(error, dict) and error.get("details"):
        message += f" ({error['details']})"
    for node_id, entry in list(node_errors.items())[:5]:
        for err in (entry.get("errors") or [])[:3]:
            message += (f"; node {node_id} ({entry.get('class_type')}): "
                        f"{err.get('message')}: {err.get('details')}")
    return EngineRejected(f"comfyui: {message}", status=400, error=error, node_errors=node_errors)


def _raise_for_messages(messages: list[Any]) -> None:
    """Raise for an ``execution_error`` / ``execution_interrupted`` among the messages."""
    for message in messages:
        if not isinstance(message, list | tuple) or len(message) != 2:
            continue
        kind, data = message
        if kind == "execution_interrupted":
            raise EngineUnavailable("comfyui: prompt was interrupted on the worker",
                                    node_id=data.get("node_id"))
        if kind == "execution_error":
            exc_type = str(data.get("exception_type", ""))
            exc_message = str(data.get("exception_message", ""))[:2000]
            details = {k: data.get(k) for k in ("prompt_id", "node_id", "node_type")}
            text = (f"comfyui: node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{exc_type}: {exc_message.strip()[:300]}")
            details.update(exception_type=exc_type, exception_message=exc_message)
            if any(m in f"{exc_type} {exc_message}".lower() for m in _OOM_MARKERS):
                raise EngineUnavailable(text, **details)
            raise EngineRejected(text, **details)
