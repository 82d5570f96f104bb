"""Serve ASGI apps on loopback ports inside the running event loop.

Used by ``gpufleet demo`` (simulated clouds and workers next to the real service)
and by tests that need a real socket (streaming). ``WorkerHost`` serves many
simulated workers from one port, each under its own path prefix
(``http://127.0.0.1:PORT/w/<name>``), so a hundred simulated instances do not
need a hundred servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class LoopbackServer:
    """uvicorn on a loopback address as a task of the current loop; ``url`` once started.

    ``host`` defaults to 127.0.0.1; the demo binds simulated SURF workspaces to
    127.0.0.2, 127.0.0.3, ... (Linux routes all of 127.0.0.0/8 to ``lo``) so that each
    gets its own address with the same port, as real VMs do.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        port: int | None = None,
        name: str = "server",
        host: str = "127.0.0.1",
        timeout_graceful_shutdown_s: int = 2,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.name = name
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level="warning", lifespan="on",
            timeout_graceful_shutdown=timeout_graceful_shutdown_s,
        )
        self.server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<LoopbackServer {self.name} {self.url}>"

    async def start(self) -> str:
        self._task = asyncio.create_task(self.server.serve(), name=f"loopback-{self.name}")
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
                raise RuntimeError(f"{self.name} did not start")
            await asyncio.sleep(0.01)
        logger.info("%s listening on %s", self.name, self.url)
        return self.url

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None


class WorkerHost:
    """One ASGI app that routes ``/w/<name>/...`` to the app registered under ``name``."""

    def __init__(self) -> None:
        self.apps: dict[str, ASGIApp] = {}

    def add(self, name: str, app: ASGIApp) -> None:
        self.apps[name] = app

    def remove(self, name: str) -> None:
        self.apps.pop(name, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        path: str = scope.get("path", "")
        parts = path.split("/", 3)  # "", "w", name, rest
        app = self.apps.get(parts[2]) if len(parts) >= 3 and parts[1] == "w" else None
        if app is None:
            if scope["type"] == "http":
                # What a cloud gateway answers when nothing listens behind it.
                await send({"type": "http.response.start", "status": 502,
                            "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body", "body": b"Bad Gateway"})
            return
        # Like starlette's Mount: the path keeps the prefix, root_path names it.
        child = dict(scope)
        child["root_path"] = scope.get("root_path", "") + f"/w/{parts[2]}"
        await app(child, receive, send)
