"""``gpufleet worker-gate``: the lock on a worker's engine port.

Runs inside the worker image, in front of ComfyUI or Ollama::

    ComfyUI listens on 127.0.0.1:8189 (not reachable from outside)
    gpufleet worker-gate --upstream http://127.0.0.1:8189 --listen 0.0.0.0:8188

and answers every HTTP request and websocket handshake that does not carry the worker's
secret (``X-Gpufleet-Worker-Token: <secret>`` or ``Authorization: Bearer <secret>``)
with 401 (a websocket: 403), before the engine sees a byte. The secret comes from the
environment variable ``GPUFLEET_WORKER_TOKEN`` (gpufleet puts it into a Novita
instance's ``envs`` when it creates it). Calls that pass are relayed to the engine as
they came — streamed both ways, websockets included — minus the secret itself, so the
engine never sees it. Without a secret the gate refuses to start (an open gate would
be no gate).

``TokenGate`` is the check alone (an ASGI middleware, also used by the simulated
workers); ``GateProxy`` the relay; ``create_gate_app`` both together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gpufleet.worker_auth import TOKEN_ENV, presented_token, token_ok

logger = logging.getLogger(__name__)

# Connection-level headers a proxy must not pass on (RFC 9110 §7.6.1), and the secret.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
_WS_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-accept",
    }
)


class TokenGate:
    """ASGI middleware: only requests with ``token`` reach ``app`` (which never sees it)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("a worker gate needs a non-empty token")
        self.app = app
        self._token = token

    def __repr__(self) -> str:
        return f"<TokenGate {self.app!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers", []))
        if not token_ok(headers, self._token):
            await refuse(scope, receive, send)
            return
        inner = dict(scope)
        inner["headers"] = [
            (name, value)
            for name, value in headers
            if name.lower() != b"x-gpufleet-worker-token"
            and not (
                name.lower() == b"authorization"
                and presented_token([(name, value)]) == self._token
            )
        ]
        await self.app(inner, receive, send)


async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a call without the right secret: 401 (a websocket handshake: 403)."""
    given = presented_token(scope.get("headers", [])) is not None
    logger.info(
        "worker gate: refused %s %s from %s (%s token)",
        scope.get("method", "WEBSOCKET"),
        scope.get("path", ""),
        (scope.get("client") or ("?",))[0],
        "wrong" if given else "no",
    )
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})  # the server answers 403
        return
    body = json.dumps({"error": "this worker needs gpufleet's worker token"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="gpufleet-worker"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class GateProxy:
    """ASGI app relaying every HTTP request and websocket to ``upstream`` (streamed)."""

    def __init__(self, upstream: str, *, connect_timeout_s: float = 10.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            trust_env=False,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"<GateProxy {self.upstream}>"

    async def aclose(self) -> None:
        await self.client.aclose()

    def _target(self, scope: Scope, *, websocket: bool = False) -> str:
        base = self.upstream
        if websocket:
            base = base.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        raw: bytes = scope.get("raw_path") or str(scope["path"]).encode()
        query: bytes = scope.get("query_string", b"")
        path = raw.decode("latin-1")
        return base + path + (f"?{query.decode('latin-1')}" if query else "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        has_body = any(k.lower() in (b"content-length", b"transfer-encoding")
                       for k, _ in scope["headers"])
        body_done = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ConnectionResetError("client went away")
                    chunk = message.get("body", b"")
                    if chunk:
                        yield chunk
                    if not message.get("more_body", False):
                        return
            finally:
                body_done.set()

        if not has_body:
            body_done.set()
        request = self.client.build_request(
            scope["method"],
            self._target(scope),
            headers=headers,
            content=body() if has_body else None,
        )
        relay = asyncio.create_task(self._relay(request, send))

        async def watch() -> None:  # the client leaving cancels the engine's work
            await body_done.wait()
            while (await receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, watcher):
                task.cancel()
            await asyncio.gather(relay, watcher, return_exceptions=True)

    async def _relay(self, request: httpx.Request, send: Send) -> None:
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.HTTPError, ConnectionResetError) as exc:
            logger.warning("worker gate: upstream %s failed: %s", request.url, exc)
            await _plain(send, 502, b'{"error": "the engine behind the worker gate is down"}')
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:  # the engine broke off mid-answer: so do we
            logger.warning("worker gate: upstream %s broke off: %s", request.url, exc)
        finally:
            await response.aclose()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in _HOP_BY_HOP and k.lower() not in _WS_HANDSHAKE
        ]
        try:
            upstream = await connect(
                self._target(scope, websocket=True),
                additional_headers=headers,
                max_size=None,
                proxy=None,
                compression=None,
            )
        except Exception as exc:
            logger.warning("worker gate: upstream websocket failed: %s", exc)
            await send({"type": "websocket.close", "code": 1011})
            return
        await send({"type": "websocket.accept"})
        to_engine = asyncio.create_task(_client_to_engine(receive, upstream))
        to_client = asyncio.create_task(_engine_to_client(upstream, send))
        try:
            await asyncio.wait({to_engine, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_engine, to_client):
                task.cancel()
            await asyncio.gather(to_engine, to_client, return_exceptions=True)
            await upstream.close()
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1000})


async def _client_to_engine(receive: Receive, upstream: ClientConnection) -> None:
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        text = message.get("text")
        await upstream.send(text if text is not None else message.get("bytes") or b"")


async def _engine_to_client(upstream: ClientConnection, send: Send) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for frame in upstream:
            message: Message = {"type": "websocket.send"}
            message["text" if isinstance(frame, str) else "bytes"] = frame
            await send(message)


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_gate_app(upstream: str, token: str) -> TokenGate:
    """The gate: ``TokenGate`` in front of a ``GateProxy`` to ``upstream``."""
    return TokenGate(GateProxy(upstream), token)


def token_from_env(name: str = TOKEN_ENV, env: Any = None) -> str:
    """The secret from the environment; ``ValueError`` if it is missing or empty."""
    value = str((env if env is not None else os.environ).get(name, "")).strip()
    if not value:
        raise ValueError(f"{name} is not set: the worker gate will not run without a token")
    return value


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::]:8188`` for IPv6, ``:8188`` for every interface)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen wants host:port, not {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def run_gate(upstream: str, listen: str, token: str, log_level: str = "info") -> None:
    """Serve the gate until SIGINT/SIGTERM (uvicorn)."""
    import uvicorn

    host, port = parse_listen(listen)
    logger.info("worker gate on %s:%d in front of %s", host, port, upstream)
    uvicorn.run(
        create_gate_app(upstream, token),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        ws_max_size=1 << 30,
        proxy_headers=False,
    )
