"""Serve any ASGI app on a free loopback port for a test: a real socket, lifespan on.

Use it when ``httpx.ASGITransport`` is not enough: streaming (it buffers the whole
body), websockets, client disconnects, dropped connections, or third-party clients
(``ollama``, ``openai``, ``websockets``) that open their own connections.

    async with serve(app) as url:             # uvicorn as a task of the test's loop
        await httpx.AsyncClient().get(f"{url}/api/version")

    with serve_in_thread(app) as url:         # uvicorn in a thread with its own loop,
        ollama.Client(host=url).list()        # for sync clients that would block the loop

``serve`` needs the app's asyncio objects to live in the test's loop (the usual case).
``serve_in_thread`` runs the app in another loop: share only thread-safe state with it.
Both stop the server (and run the app's lifespan shutdown) on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

import uvicorn
from starlette.types import ASGIApp

from gpufleet.loopback import LoopbackServer, free_port

__all__ = ["serve", "serve_in_thread"]


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, *, name: str = "test-server") -> AsyncIterator[str]:
    """Run ``app`` under uvicorn in the running loop; yields ``http://127.0.0.1:PORT``."""
    server = LoopbackServer(app, name=name)
    url = await server.start()
    try:
        yield url
    finally:
        await server.stop()


class _ThreadServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # signals belong to pytest's main thread
        yield


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, *, start_timeout_s: float = 10.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread; yields ``http://127.0.0.1:PORT``."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=2)
    server = _ThreadServer(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True,
                              name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        thread.join(timeout=start_timeout_s)
        raise RuntimeError(f"uvicorn did not start on port {port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout_s)
