"""A simulated ComfyUI 0.3.64 worker: same routes, bodies, validation errors and events.

Answers like ``shared/reference/comfyui-observed.md``: ``/system_stats``,
``/object_info[/{class}]``, ``/prompt`` (GET; POST with real-shaped 400s incl.
``node_errors``), ``/queue`` (GET; POST delete/clear), ``/history[/{id}]`` (GET;
POST delete/clear), ``/view``, ``/interrupt``, ``/models/checkpoints`` and
``/ws?clientId=`` with the observed event order; every route also under ``/api``.
One prompt runs at a time. A graph renders as N steps (each KSampler's ``steps``;
``default_steps`` if there is none) at ``step_time_s`` per step with ``progress``
frames, and every SaveImage writes a tiny real PNG. Not simulated: the cache
(every run is fresh, as with ``--cache-none``), uploads, previews.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from gpufleet.engines.simulated import Recorder, tiny_png
from gpufleet.worker_auth import token_ok
from gpufleet.worker_gate import refuse

INT = "INT"
_BIG = 0xFFFFFFFFFFFFFFFF


def _int(default: int, lo: int, hi: int) -> list[Any]:
    return [INT, {"default": default, "min": lo, "max": hi, "step": 1}]


_SIZE = _int(512, 1, 16384)
# class → (required inputs in object_info form, outputs, is output node). "CKPTS" is
# replaced by the configured checkpoints.
NODES: dict[str, tuple[dict[str, list[Any]], list[str], bool]] = {
    "EmptyImage": ({"width": _SIZE, "height": _SIZE, "batch_size": _int(1, 1, 4096),
                    "color": _int(0, 0, 16777215)}, ["IMAGE"], False),
    "ImageInvert": ({"image": ["IMAGE"]}, ["IMAGE"], False),
    "SaveImage": ({"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                  [], True),
    "PreviewImage": ({"images": ["IMAGE"]}, [], True),
    "CheckpointLoaderSimple": ({"ckpt_name": ["CKPTS"]}, ["MODEL", "CLIP", "VAE"], False),
    "CLIPTextEncode": ({"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]},
                       ["CONDITIONING"], False),
    "EmptyLatentImage": ({"width": _SIZE, "height": _SIZE, "batch_size": _int(1, 1, 4096)},
                         ["LATENT"], False),
    "KSampler": ({"model": ["MODEL"], "seed": _int(0, 0, _BIG), "steps": _int(20, 1, 10000),
                  "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}],
                  "sampler_name": [["euler", "euler_ancestral", "dpmpp_2m"]],
                  "scheduler": [["normal", "karras", "simple"]],
                  "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                  "latent_image": ["LATENT"],
                  "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}]},
                 ["LATENT"], False),
    "VAEDecode": ({"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"], False),
}


@dataclass
class ComfyUIConfig:
    """Knobs. Delays default to 0; set a failure knob at any time, it applies at once."""

    token: str | None = None  # set: every call needs it (the worker gate's check), else 401
    version: str = "0.3.64"
    step_time_s: float = 0.0  # render time per sampler step
    default_steps: int = 1  # steps of a graph without a KSampler
    checkpoints: tuple[str, ...] = ("v1-5-pruned-emaonly.safetensors",)
    image_px: int = 8  # width and height of the PNGs written
    websocket: bool = True  # False: /ws refuses the handshake (clients must poll)
    fail_status: int | None = None  # every HTTP route answers this (502: gateway, no ComfyUI)
    hang: bool = False  # every HTTP route waits until the client gives up
    garbage: bool = False  # JSON routes answer 200 with a body that is not JSON
    runtime_error: str | None = None  # every output node fails with execution_error
    hang_render: bool = False  # renders stop before their first step (until interrupted)
    drop_ws_after: int | None = None  # close each socket abruptly after this many frames
    crash_after_frames: int | None = None  # after this many frames the worker dies (502s)


@dataclass
class _Item:
    number: int
    prompt_id: str
    graph: dict[str, Any]
    client_id: str | None
    outputs: list[str]
    messages: list[list[Any]] = field(default_factory=list)

    def entry(self) -> list[Any]:
        extra = {"client_id": self.client_id} if self.client_id else {}
        return [self.number, self.prompt_id, self.graph, extra, self.outputs]


class SimulatedComfyUI:
    """The ASGI app; ``config`` and ``recorder`` stay inspectable and mutable."""

    def __init__(self, config: ComfyUIConfig | None = None) -> None:
        self.config = config or ComfyUIConfig()
        self.recorder = Recorder()
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.pending: list[_Item] = []
        self.running: _Item | None = None
        self.sockets: dict[str, list[WebSocket]] = {}
        self.dead = False
        self._number = 0
        self._counters: dict[str, int] = {}
        self._frames: dict[int, int] = {}
        self._interrupt = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        routes = [
            Route("/system_stats", self._system_stats),
            Route("/object_info", self._object_info),
            Route("/object_info/{cls}", self._object_info),
            Route("/prompt", self._prompt, methods=["GET", "POST"]),
            Route("/queue", self._queue, methods=["GET", "POST"]),
            Route("/history", self._history, methods=["GET", "POST"]),
            Route("/history/{prompt_id}", self._history),
            Route("/view", self._view),
            Route("/interrupt", self._interrupt_route, methods=["POST"]),
            Route("/models/checkpoints", self._checkpoints),
        ]
        api = [Route("/api" + r.path, r.endpoint, methods=r.methods) for r in routes]
        self.app = Starlette(routes=[*routes, *api, WebSocketRoute("/ws", self._ws)],
                             lifespan=self._lifespan)

    def __repr__(self) -> str:
        return f"<SimulatedComfyUI running={self.running is not None} pending={len(self.pending)}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.config.token
        if token and scope["type"] in ("http", "websocket") and not token_ok(
            scope.get("headers", []), token
        ):
            self.recorder.refused += 1
            await refuse(scope, receive, send)
            return
        if scope["type"] == "http":
            self.recorder.request(scope["method"], scope["path"])
            if self.dead or self.config.fail_status or self.config.hang:
                await self._fail(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _fail(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.config.hang and not self.dead:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.recorder.disconnects += 1
            return
        status = 502 if self.dead else self.config.fail_status or 500
        text = "Bad Gateway" if status == 502 else "500 Internal Server Error"
        await PlainTextResponse(text, status_code=status)(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the render loop (tests without lifespan call this)."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    def _json(self, body: Any, status: int = 200) -> Response:
        if self.config.garbage:
            return PlainTextResponse("<html>not json", status_code=200)
        return JSONResponse(body, status_code=status)

    # -- read-only routes ------------------------------------------------------------------

    async def _system_stats(self, request: Request) -> Response:
        ram = 25_276_510_208
        return self._json({
            "system": {"os": "posix", "ram_total": ram, "ram_free": ram // 2,
                       "comfyui_version": self.config.version, "python_version": "3.11.7",
                       "pytorch_version": "2.5.0+cu124", "embedded_python": False,
                       "argv": ["main.py", "--listen", "0.0.0.0"]},
            "devices": [{"name": "cuda:0 Simulated GPU", "type": "cuda", "index": 0,
                         "vram_total": ram, "vram_free": ram, "torch_vram_total": 0,
                         "torch_vram_free": 0}]})

    def object_info(self, cls: str) -> dict[str, Any]:
        required, outputs, output_node = NODES[cls]
        inputs = {k: [list(self.config.checkpoints)] if v == ["CKPTS"] else v
                  for k, v in required.items()}
        return {"input": {"required": inputs}, "input_order": {"required": list(inputs)},
                "output": outputs, "output_is_list": [False] * len(outputs),
                "output_name": outputs, "name": cls, "display_name": cls, "description": "",
                "python_module": "nodes", "category": "simulated", "output_node": output_node}

    async def _object_info(self, request: Request) -> Response:
        cls = request.path_params.get("cls")
        if cls is not None:
            return self._json({cls: self.object_info(cls)} if cls in NODES else {})
        return self._json({name: self.object_info(name) for name in NODES})

    async def _checkpoints(self, request: Request) -> Response:
        return self._json(list(self.config.checkpoints))

    async def _view(self, request: Request) -> Response:
        q = request.query_params
        name, sub = q.get("filename", ""), q.get("subfolder", "")
        if ".." in name or ".." in sub or name.startswith("/"):
            return Response(status_code=400)
        data = self.files.get((q.get("type", "output"), sub, name))
        if not name or data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/png",
                        headers={"Content-Disposition": f'filename="{name}"'})

    # -- the queue ------------------------------------------------------------------------

    async def _prompt(self, request: Request) -> Response:
        if request.method == "GET":
            return self._json({"exec_info": {"queue_remaining": self._remaining()}})
        try:
            body = json.loads(await request.body())
        except ValueError:
            return PlainTextResponse("500 Internal Server Error\n\nServer got itself in trouble",
                                     status_code=500)
        graph = body.get("prompt") if isinstance(body, dict) else None
        if graph is None:
            return self._error("no_prompt", "No prompt provided", "No prompt provided")
        if not isinstance(graph, dict):
            return PlainTextResponse("500 Internal Server Error\n\nServer got itself in trouble",
                                     status_code=500)
        self.recorder.bodies.append(body)
        rejected = self._validate(graph)
        if rejected is not None:
            return rejected
        number = body.get("number", self._number)
        self._number += 1
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        outputs = [n for n, node in graph.items() if NODES[node["class_type"]][2]]
        self.pending.append(_Item(number, prompt_id, graph, body.get("client_id"), outputs))
        self.recorder.enter()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run_queue(), name="sim-comfyui")
        await self._broadcast_status()
        return self._json({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def _error(self, kind: str, message: str, details: str,
               node_errors: dict[str, Any] | None = None) -> Response:
        error = {"type": kind, "message": message, "details": details, "extra_info": {}}
        return self._json({"error": error, "node_errors": node_errors or {}}, 400)

    def _validate(self, graph: dict[str, Any]) -> Response | None:
        for node_id, node in graph.items():
            cls = node.get("class_type") if isinstance(node, dict) else None
            if cls is None:
                return self._error("invalid_prompt", "Cannot execute because a node is missing "
                                   "the class_type property.", f"Node ID '#{node_id}'")
            if cls not in NODES:
                return self._error("invalid_prompt", f"Cannot execute because node {cls} does "
                                   "not exist.", f"Node ID '#{node_id}'")
        outputs = [n for n, node in graph.items() if NODES[node["class_type"]][2]]
        if not outputs:
            return self._error("prompt_no_outputs", "Prompt has no outputs", "")
        node_errors: dict[str, Any] = {}
        for out in outputs:
            for node_id in _ancestors(graph, out):
                errors = self._node_errors(graph, node_id)
                if errors:
                    entry = node_errors.setdefault(node_id, {
                        "errors": errors, "dependent_outputs": [],
                        "class_type": graph[node_id]["class_type"]})
                    entry["dependent_outputs"].append(out)
        if node_errors:
            return self._error("prompt_outputs_failed_validation",
                               "Prompt outputs failed validation", "", node_errors)
        return None

    def _node_errors(self, graph: dict[str, Any], node_id: str) -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        inputs = graph[node_id].get("inputs") or {}
        required = self.object_info(graph[node_id]["class_type"])["input"]["required"]
        for name, spec in required.items():
            kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
            info: dict[str, Any] = {"input_name": name, "input_config": spec}
            if name not in inputs:
                errors.append(_err("required_input_missing", "Required input is missing", name,
                                   {"input_name": name}))
                continue
            value = inputs[name]
            if isinstance(value, list) and len(value) == 2 and not isinstance(kind, list):
                if str(value[0]) not in graph:
                    errors.append(_err("exception_during_inner_validation",
                                       "Exception when validating inner node", f"'{value[0]}'",
                                       {**info, "exception_message": f"'{value[0]}'",
                                        "exception_type": "KeyError", "traceback": [],
                                        "linked_node": [node_id, 0]}))
                continue
            if isinstance(kind, list):
                if value not in kind:
                    errors.append(_err("value_not_in_list", "Value not in list",
                                       f"{name}: '{value}' not in {kind}",
                                       {**info, "received_value": value}))
            elif kind in (INT, "FLOAT"):
                errors.extend(_check_number(name, value, kind, opts, info))
        return errors

    def _remaining(self) -> int:
        return len(self.pending) + (self.running is not None)

    async def _queue(self, request: Request) -> Response:
        if request.method == "GET":
            running = [self.running.entry()] if self.running else []
            return self._json({"queue_running": running,
                               "queue_pending": [i.entry() for i in self.pending]})
        body = json.loads(await request.body() or b"{}")
        drop = {str(p) for p in body.get("delete", [])}
        keep = [] if body.get("clear") else [i for i in self.pending if i.prompt_id not in drop]
        removed = len(self.pending) - len(keep)
        for _ in range(removed):
            self.recorder.exit()
        self.pending = keep
        if removed:
            await self._broadcast_status()  # ComfyUI's queue_updated()
        return Response(status_code=200)

    async def _interrupt_route(self, request: Request) -> Response:
        raw = await request.body()
        target = json.loads(raw).get("prompt_id") if raw.strip() else None
        if self.running is not None and target in (None, self.running.prompt_id):
            self._interrupt.set()
        return Response(status_code=200)

    async def _history(self, request: Request) -> Response:
        if request.method == "POST":
            body = json.loads(await request.body() or b"{}")
            if body.get("clear"):
                self.history.clear()
            for pid in body.get("delete", []):
                self.history.pop(str(pid), None)
            return Response(status_code=200)
        pid = request.path_params.get("prompt_id")
        if pid is not None:
            return self._json({pid: self.history[pid]} if pid in self.history else {})
        items = list(self.history.items())
        if "max_items" in request.query_params:
            items = items[-int(request.query_params["max_items"]):]
        return self._json(dict(items))

    # -- execution ------------------------------------------------------------------------

    async def _run_queue(self) -> None:
        while self.pending and not self.dead:
            self.running = self.pending.pop(0)
            self._interrupt.clear()
            try:
                await self._execute(self.running)
            finally:
                self.running = None
                self.recorder.exit()

    async def _execute(self, item: _Item) -> None:
        pid, graph = item.prompt_id, item.graph
        await self._send(item, "execution_start", {"prompt_id": pid, "timestamp": _ms()})
        await self._send(item, "execution_cached", {"nodes": [], "prompt_id": pid,
                                                    "timestamp": _ms()})
        order = [n for out in item.outputs for n in _ancestors(graph, out)]
        order = list(dict.fromkeys(order))
        has_sampler = any(graph[n]["class_type"] == "KSampler" for n in order)
        outputs: dict[str, Any] = {}
        done: list[str] = []
        for node_id in order:
            cls = graph[node_id]["class_type"]
            await self._send(item, "executing", {"node": node_id, "display_node": node_id,
                                                 "prompt_id": pid})
            steps = int(graph[node_id]["inputs"].get("steps", 0)) if cls == "KSampler" else 0
            if not has_sampler and node_id == order[-1]:
                steps = self.config.default_steps
            if not await self._render(item, node_id, steps):
                return await self._finish(item, "execution_interrupted", {
                    "prompt_id": pid, "node_id": node_id, "node_type": cls, "executed": done,
                    "timestamp": _ms()}, {})
            if NODES[cls][2]:
                prefix = str(graph[node_id]["inputs"].get("filename_prefix", "ComfyUI"))
                error = self.config.runtime_error or (
                    "**** ERROR: Saving image outside the output folder is not allowed."
                    if ".." in prefix else None)
                if error:
                    return await self._finish(item, "execution_error", {
                        "prompt_id": pid, "node_id": node_id, "node_type": cls,
                        "executed": done, "exception_message": error,
                        "exception_type": "Exception", "traceback": [], "current_inputs": {},
                        "current_outputs": order, "timestamp": _ms()}, outputs)
                image = self._write_png(cls, prefix, item)
                outputs[node_id] = {"images": [image]}
                await self._send(item, "executed", {"node": node_id, "display_node": node_id,
                                                    "output": outputs[node_id], "prompt_id": pid})
            done.append(node_id)
        await self._finish(item, "execution_success", {"prompt_id": pid, "timestamp": _ms()},
                           outputs)

    async def _render(self, item: _Item, node_id: str, steps: int) -> bool:
        """Sleep ``steps`` × ``step_time_s`` with progress frames; False if interrupted."""
        if self.config.hang_render:
            await self._interrupt.wait()
        for step in range(1, steps + 1):
            if self.config.step_time_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._interrupt.wait(), self.config.step_time_s)
            if self._interrupt.is_set():
                return False
            await self._send(item, "progress", {"value": step, "max": steps,
                                                "prompt_id": item.prompt_id, "node": node_id})
        return not self._interrupt.is_set()

    def _write_png(self, cls: str, prefix: str, item: _Item) -> dict[str, str]:
        kind = "output" if cls == "SaveImage" else "temp"
        sub, _, base = prefix.rpartition("/") if kind == "output" else ("", "", "ComfyUI_temp")
        self._counters[prefix] = self._counters.get(prefix, 0) + 1
        name = f"{base}_{self._counters[prefix]:05d}_.png"
        digest = hashlib.sha256(json.dumps(item.graph, sort_keys=True).encode()).digest()
        px = self.config.image_px
        png = tiny_png(px, px, (digest[0], digest[1], digest[2]),
                       {"prompt": json.dumps(item.graph)})
        self.files[(kind, sub, name)] = png
        return {"filename": name, "subfolder": sub, "type": kind}

    async def _finish(self, item: _Item, kind: str, data: dict[str, Any],
                      outputs: dict[str, Any]) -> None:
        await self._send(item, kind, data)
        ok = kind == "execution_success"
        self.history[item.prompt_id] = {
            "prompt": item.entry(), "outputs": outputs,
            "status": {"status_str": "success" if ok else "error", "completed": ok,
                       "messages": item.messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None,
                         "real_node_id": n} for n in outputs}}
        self.running = None
        await self._broadcast_status()
        await self._send(item, "executing", {"node": None, "prompt_id": item.prompt_id})

    # -- websocket ------------------------------------------------------------------------

    async def _ws(self, ws: WebSocket) -> None:
        if not self.config.websocket or self.dead:
            await ws.close(code=1008)
            return
        sid = ws.query_params.get("clientId") or uuid.uuid4().hex
        await ws.accept()
        self._frames[id(ws)] = 0
        self.sockets.setdefault(sid, []).append(ws)
        try:
            await self._to(ws, {"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": self._remaining()}}, "sid": sid}})
            while True:
                message = await ws.receive_json()
                if message.get("type") == "feature_flags":
                    await self._to(ws, {"type": "feature_flags", "data": {
                        "supports_preview_metadata": True, "max_upload_size": 104857600}})
        except Exception:  # the client went away, or we closed it
            pass
        finally:
            with contextlib.suppress(ValueError):
                self.sockets[sid].remove(ws)
            self._frames.pop(id(ws), None)

    async def _to(self, ws: WebSocket, frame: dict[str, Any]) -> None:
        cfg = self.config
        try:
            await ws.send_json(frame)
        except Exception:
            return
        frames = self._frames[id(ws)] = self._frames.get(id(ws), 0) + 1
        if cfg.crash_after_frames is not None and frames >= cfg.crash_after_frames:
            self.dead = True
            self.history.clear()
            self._interrupt.set()
        if self.dead or (cfg.drop_ws_after is not None and frames >= cfg.drop_ws_after):
            with contextlib.suppress(Exception):
                await ws.close(code=1011)

    async def _send(self, item: _Item, kind: str, data: dict[str, Any]) -> None:
        if kind.startswith("execution_"):
            item.messages.append([kind, data])
        for ws in list(self.sockets.get(item.client_id or "", [])):
            await self._to(ws, {"type": kind, "data": data})

    async def _broadcast_status(self) -> None:
        frame = {"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": self._remaining()}}}}
        for sockets in list(self.sockets.values()):
            for ws in list(sockets):
                await self._to(ws, frame)


def _ancestors(graph: dict[str, Any], node_id: str) -> list[str]:
    """``node_id`` and every node it depends on, dependencies first."""
    seen: list[str] = []

    def visit(n: str) -> None:
        if n in seen or n not in graph:
            return
        for value in (graph[n].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                visit(str(value[0]))
        seen.append(n)

    visit(node_id)
    return seen


def _err(kind: str, message: str, details: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _check_number(name: str, value: Any, kind: str, opts: dict[str, Any],
                  info: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        number = int(value) if kind == INT else float(value)
    except (TypeError, ValueError) as exc:
        return [_err("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                     f"{name}, {value}, {exc}", {**info, "received_value": value,
                                                 "exception_message": str(exc)})]
    if "max" in opts and number > opts["max"]:
        return [_err("value_bigger_than_max", f"Value {number} bigger than max of {opts['max']}",
                     name, {**info, "received_value": value})]
    if "min" in opts and number < opts["min"]:
        return [_err("value_smaller_than_min",
                     f"Value {number} smaller than min of {opts['min']}", name,
                     {**info, "received_value": value})]
    return []


def _ms() -> int:
    return int(time.time() * 1000)
