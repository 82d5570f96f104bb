"""A simulated Ollama worker: Ollama's native API and its OpenAI-compatible ``/v1``.

Routes: ``GET/HEAD /``, ``/api/version``, ``/api/tags``, ``/api/ps``, ``POST
/api/show``, ``/api/generate`` and ``/api/chat`` (NDJSON stream by default, or
``stream: false``), ``/api/embed``, ``/api/embeddings``, ``/api/pull`` (NDJSON
progress), ``/v1/chat/completions`` (SSE or not, ``usage``), ``/v1/completions``,
``/v1/embeddings``, ``GET /v1/models[/{model}]``. Errors are ``{"error": "..."}``
on ``/api/*`` and ``{"error": {"message", "type", "param", "code"}}`` on ``/v1/*``;
an unknown model is a 404 ``model 'x' not found``. An answer is the words of
``reply``, one token each, after ``first_token_s`` and at ``tokens_per_s``.
Inference watches for the client going away and stops (``recorder.disconnects``).
``keep_alive`` is honoured in ``/api/ps`` (seconds, Go durations, 0, negative).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gpufleet.engines.simulated import Recorder
from gpufleet.worker_auth import token_ok
from gpufleet.worker_gate import refuse

_DROP = b"\x00drop"  # a chunk that means: close the connection here, mid-answer


@dataclass
class OllamaConfig:
    """Knobs. Delays default to 0; a failure knob set at any time applies at once."""

    token: str | None = None  # set: every call needs it (the worker gate's check), else 401
    version: str = "0.12.3"
    models: tuple[str, ...] = ("llama3.2:latest", "nomic-embed-text:latest")
    pullable: tuple[str, ...] | None = None  # names /api/pull can fetch; None: any name
    reply: str = "Hello from the simulated Ollama worker."  # one token per word
    first_token_s: float = 0.0  # time to the first token (load + prompt eval)
    tokens_per_s: float | None = None  # None: no delay between tokens
    embedding_dim: int = 8
    pull_steps: int = 3  # progress lines per layer pulled
    pull_step_s: float = 0.0
    fail_status: int | None = None  # every route answers this (502: gateway, no Ollama)
    hang: bool = False  # every route waits until the client gives up
    garbage: bool = False  # 200 with a body that is not JSON
    wrong_json: bool = False  # 200 with JSON that is not Ollama's answer: {"status": "ok"}
    fail_infer_status: int | None = None  # inference routes answer this (health stays fine)
    drop_after_tokens: int | None = None  # connection dropped after N tokens
    error_after_tokens: int | None = None  # mid-stream {"error": ...} line after N tokens


def normalize(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


def parse_keep_alive(value: Any, default_s: float = 300.0) -> float:
    """Seconds; negative means forever. Accepts numbers and Go durations ("5m", "1h30m")."""
    if value is None or value == "":
        return default_s
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(-?[\d.]+)(ms|s|m|h)?", str(value))
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}
    return sum(float(n) * scale[u] for n, u in parts) if parts else default_s


class SimulatedOllama:
    """The ASGI app; ``config``, ``recorder``, ``present`` and ``loaded`` are inspectable."""

    def __init__(self, config: OllamaConfig | None = None) -> None:
        self.config = config or OllamaConfig()
        self.recorder = Recorder()
        self.present: list[str] = [normalize(m) for m in self.config.models]
        self.loaded: dict[str, float] = {}  # model → expires_at (epoch s; inf: forever)
        self._ids = 0
        post = ["POST"]
        self.app = Starlette(routes=[
            Route("/", self._root, methods=["GET", "HEAD"]),
            Route("/api/version", self._version, methods=["GET", "HEAD"]),
            Route("/api/tags", self._tags, methods=["GET", "HEAD"]),
            Route("/api/ps", self._ps),
            Route("/api/show", self._show, methods=post),
            Route("/api/generate", self._infer, methods=post),
            Route("/api/chat", self._infer, methods=post),
            Route("/api/embed", self._embed, methods=post),
            Route("/api/embeddings", self._embed, methods=post),
            Route("/api/pull", self._pull, methods=post),
            Route("/v1/chat/completions", self._infer, methods=post),
            Route("/v1/completions", self._infer, methods=post),
            Route("/v1/embeddings", self._embed, methods=post),
            Route("/v1/models", self._v1_models),
            Route("/v1/models/{model:path}", self._v1_models),
        ])

    def __repr__(self) -> str:
        return f"<SimulatedOllama models={len(self.present)} in_flight={self.recorder.current}>"

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
            if self.config.hang:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.recorder.disconnects += 1
                return
            if self.config.fail_status:
                status = self.config.fail_status
                text = "Bad Gateway" if status == 502 else "simulated failure"
                response = (PlainTextResponse(text, status) if status == 502
                            else self._error(scope["path"], text, status))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    # -- helpers -----------------------------------------------------------------------------

    def _json(self, body: Any, status: int = 200) -> Response:
        if self.config.garbage:
            return PlainTextResponse("<html>oops", status_code=200)
        if self.config.wrong_json:
            return JSONResponse({"status": "ok"}, status_code=200)
        return JSONResponse(body, status_code=status)

    def _error(self, path: str, message: str, status: int) -> Response:
        if path.startswith("/v1/"):
            kind = {404: "not_found_error", 400: "invalid_request_error"}.get(status, "api_error")
            return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                           "code": None}}, status_code=status)
        return JSONResponse({"error": message}, status_code=status)

    def has(self, model: str) -> bool:
        return normalize(model) in self.present

    def _not_found(self, path: str, model: str) -> Response:
        return self._error(path, f"model '{model}' not found", 404)

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        if not raw.strip():
            return self._error(request.url.path, "missing request body", 400)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return self._error(request.url.path, f"invalid character: {exc}", 400)
        if not isinstance(body, dict):
            return self._error(request.url.path, "request body must be an object", 400)
        self.recorder.bodies.append(body)
        return body

    def _model_entry(self, name: str) -> dict[str, Any]:
        family = name.split(":")[0].rstrip("0123456789.") or "llama"
        return {"name": name, "model": name, "modified_at": _iso(), "size": 2_019_393_189,
                "digest": f"{_h(name):064x}"[:64],
                "details": {"parent_model": "", "format": "gguf", "family": family,
                            "families": [family], "parameter_size": "3.2B",
                            "quantization_level": "Q4_K_M"}}

    def _touch(self, model: str, keep_alive: Any) -> None:
        seconds = parse_keep_alive(keep_alive)
        self.loaded[normalize(model)] = float("inf") if seconds < 0 else time.time() + seconds

    def _expire(self) -> None:
        now = time.time()
        self.loaded = {m: t for m, t in self.loaded.items() if t > now}

    # -- model routes ------------------------------------------------------------------------

    async def _root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request) -> Response:
        return self._json({"version": self.config.version})

    async def _tags(self, request: Request) -> Response:
        return self._json({"models": [self._model_entry(m) for m in self.present]})

    async def _ps(self, request: Request) -> Response:
        self._expire()
        far = "2318-08-23T00:00:00Z"
        return self._json({"models": [
            {**self._model_entry(m), "size_vram": 2_019_393_189, "context_length": 4096,
             "expires_at": far if t == float("inf") else _iso(t)}
            for m, t in self.loaded.items()]})

    async def _show(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        model = str(body.get("model") or body.get("name") or "")
        if not self.has(model):
            return self._not_found(request.url.path, model)
        entry = self._model_entry(normalize(model))
        embed = "embed" in model
        return self._json({"modelfile": f"FROM {model}\n", "parameters": "", "template":
                           "{{ .Prompt }}", "details": entry["details"], "model_info": {
                               "general.architecture": entry["details"]["family"]},
                           "capabilities": ["embedding"] if embed else ["completion"],
                           "modified_at": entry["modified_at"]})

    async def _v1_models(self, request: Request) -> Response:
        def item(name: str) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": int(time.time()),
                    "owned_by": "library"}

        model = request.path_params.get("model")
        if model is None:
            return self._json({"object": "list", "data": [item(m) for m in self.present]})
        if not self.has(model):
            return self._not_found(request.url.path, model)
        return self._json(item(model))

    async def _pull(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        model = normalize(str(body.get("model") or body.get("name") or ""))
        allowed = self.config.pullable
        if allowed is not None and model not in {normalize(m) for m in allowed}:
            return self._error(request.url.path, "pull model manifest: file does not exist", 500)

        async def progress() -> AsyncIterator[bytes]:
            total, digest = 1000 * self.config.pull_steps, f"sha256:{_h(model):064x}"[:71]
            yield _line({"status": "pulling manifest"})
            for step in range(1, self.config.pull_steps + 1):
                await asyncio.sleep(self.config.pull_step_s)
                yield _line({"status": f"pulling {digest[7:19]}", "digest": digest,
                             "total": total, "completed": step * 1000})
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                yield _line({"status": status})
            if model not in self.present:
                self.present.append(model)

        if body.get("stream", True) is False:
            async for _ in progress():
                pass
            return self._json({"status": "success"})
        return _Lines(progress(), self, "application/x-ndjson")

    # -- inference ---------------------------------------------------------------------------

    async def _embed(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        path, model = request.url.path, str(body.get("model", ""))
        if not self.has(model):
            return self._not_found(path, model)
        raw = body.get("input", body.get("prompt", ""))
        texts = raw if isinstance(raw, list) else [raw]
        dim = int(body.get("dimensions") or self.config.embedding_dim)
        vectors = [[round((_h(str(t)) >> i) % 1000 / 1000, 3) for i in range(dim)]
                   for t in texts]
        with self.recorder.working():
            await asyncio.sleep(self.config.first_token_s)
        self._touch(model, body.get("keep_alive"))
        tokens = sum(len(str(t).split()) for t in texts)
        if path == "/api/embeddings":
            return self._json({"embedding": vectors[0]})
        if path == "/api/embed":
            return self._json({"model": model, "embeddings": vectors, "total_duration": 1000,
                               "load_duration": 0, "prompt_eval_count": tokens})
        return self._json({"object": "list", "model": model, "data": [
            {"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _infer(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        if self.config.fail_infer_status:  # e.g. a model that does not fit: 500 at load
            return self._error(request.url.path, "simulated inference failure",
                               self.config.fail_infer_status)
        path, model = request.url.path, str(body.get("model", ""))
        if not self.has(model):
            return self._not_found(path, model)
        openai = path.startswith("/v1/")
        stream = bool(body.get("stream", not openai))
        shapes = _Shapes(path, model, body, self._next_id())
        if shapes.load_only:  # empty prompt / messages: load (or unload) the model only
            self._touch(model, body.get("keep_alive"))
            if parse_keep_alive(body.get("keep_alive")) == 0:
                self.loaded.pop(normalize(model), None)
            return self._json(shapes.final("", 0, load=True))
        limit = body.get("max_tokens") or (body.get("options") or {}).get("num_predict")
        words = self.config.reply.split(" ")[: int(limit) if limit else None]
        tokens = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        chunks = self._generate(tokens, shapes, stream, body.get("keep_alive"))
        media = ("text/event-stream" if openai else "application/x-ndjson") if stream \
            else "application/json"
        return _Lines(chunks, self, media, whole=not stream)

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def _generate(self, tokens: list[str], shapes: _Shapes, stream: bool,
                        keep_alive: Any) -> AsyncIterator[bytes]:
        cfg = self.config
        with self.recorder.working():
            await asyncio.sleep(cfg.first_token_s)
            text = ""
            for i, token in enumerate(tokens):
                if i and cfg.tokens_per_s:
                    await asyncio.sleep(1 / cfg.tokens_per_s)
                if cfg.drop_after_tokens is not None and i >= cfg.drop_after_tokens:
                    yield _DROP
                    return
                if cfg.error_after_tokens is not None and i >= cfg.error_after_tokens:
                    yield shapes.error_line("simulated error mid-stream")
                    return
                text += token
                if stream:
                    yield shapes.chunk(token, first=i == 0)
            self._touch(shapes.model, keep_alive)
            if parse_keep_alive(keep_alive) == 0:
                self.loaded.pop(normalize(shapes.model), None)
            if stream:
                for line in shapes.stream_end(len(tokens)):
                    yield line
            else:
                yield json.dumps(shapes.final(text, len(tokens))).encode()


class _Shapes:
    """The bodies of one answer, in the shape its route speaks (Ollama or OpenAI)."""

    def __init__(self, path: str, model: str, body: dict[str, Any], n: int) -> None:
        self.path, self.model, self.body = path, model, body
        self.openai = path.startswith("/v1/")
        self.chat = path.endswith("chat") or path.endswith("chat/completions")
        self.id = f"chatcmpl-{n}" if self.chat else f"cmpl-{n}"
        prompt = body.get("messages") if self.chat else body.get("prompt")
        self.load_only = not self.openai and not prompt
        self.prompt_tokens = len(json.dumps(prompt or "").split())

    def _native(self, text: str, done: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _iso()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        return {**out, "done": done}

    def _usage(self, count: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": count,
                "total_tokens": self.prompt_tokens + count}

    def _openai(self, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model,
                "system_fingerprint": "fp_ollama", "choices": [{"index": 0, **choice}]}

    def chunk(self, token: str, *, first: bool) -> bytes:
        if not self.openai:
            return _line(self._native(token, False))
        if self.chat:
            delta = {"role": "assistant", "content": token} if first else {"content": token}
            data = self._openai("chat.completion.chunk", {"delta": delta, "finish_reason": None})
        else:
            data = self._openai("text_completion", {"text": token, "finish_reason": None})
        return _sse(data)

    def final(self, text: str, count: int, *, load: bool = False) -> dict[str, Any]:
        if self.openai:
            if self.chat:
                choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
                kind = "chat.completion"
            else:
                choice, kind = {"text": text}, "text_completion"
            return {**self._openai(kind, {**choice, "finish_reason": "stop"}),
                    "usage": self._usage(count)}
        stats: dict[str, Any] = {"done_reason": "load"} if load else {
            "done_reason": "stop", "total_duration": 1_000_000, "load_duration": 0,
            "prompt_eval_count": self.prompt_tokens, "prompt_eval_duration": 1000,
            "eval_count": count, "eval_duration": 1000 * max(count, 1)}
        if not self.chat and not load:
            stats["context"] = [1, 2, 3]
        return {**self._native(text, True), **stats}

    def stream_end(self, count: int) -> list[bytes]:
        if not self.openai:
            return [_line(self.final("", count))]
        if self.chat:
            last = self._openai("chat.completion.chunk", {
                "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"})
        else:
            last = self._openai("text_completion", {"text": "", "finish_reason": "stop"})
        lines = [_sse(last)]
        if (self.body.get("stream_options") or {}).get("include_usage"):
            usage = {**last, "choices": [], "usage": self._usage(count)}
            lines.append(_sse(usage))
        return [*lines, b"data: [DONE]\n\n"]

    def error_line(self, message: str) -> bytes:
        if self.openai:
            return _sse({"error": {"message": message, "type": "api_error", "param": None,
                                   "code": None}})
        return _line({"error": message})


class _Lines(Response):
    """Send chunks as they come; stop if the client leaves; ``_DROP`` cuts the connection."""

    def __init__(self, chunks: AsyncIterator[bytes], sim: SimulatedOllama, media_type: str,
                 *, whole: bool = False) -> None:
        super().__init__(media_type=media_type)
        self.chunks, self.sim, self.whole = chunks, sim, whole

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        sender = asyncio.create_task(self._send_all(send))
        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait([sender, watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, watcher):
                task.cancel()
            results = await asyncio.gather(sender, watcher, return_exceptions=True)
            await self.chunks.aclose()  # type: ignore[attr-defined]
        if sender.cancelled() or isinstance(results[0], asyncio.CancelledError):
            self.sim.recorder.disconnects += 1
        elif isinstance(results[0], BaseException):
            raise results[0]

    async def _start(self, send: Send, headers: dict[bytes, bytes]) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", (self.media_type or "").encode()),
                                *headers.items()]})

    async def _send_all(self, send: Send) -> None:
        started = False
        async for chunk in self.chunks:
            if chunk == _DROP:  # promise more body than we send, then hang up
                if not started:
                    await self._start(send, {b"content-length": b"1000"})
                await send({"type": "http.response.body", "body": b'{"mod', "more_body": True})
                return
            if self.sim.config.garbage:
                chunk = b"<html>oops\n"
            elif self.sim.config.wrong_json:
                chunk = b'{"status": "ok"}\n'
            if self.whole:
                await self._start(send, {b"content-length": str(len(chunk)).encode()})
                await send({"type": "http.response.body", "body": chunk})
                return
            if not started:
                await self._start(send, {})
                started = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _h(text: str) -> int:
    """A stable hash (``hash()`` differs per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big")


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _iso(epoch: float | None = None) -> str:
    return datetime.fromtimestamp(epoch or time.time(), UTC).isoformat().replace("+00:00", "Z")
