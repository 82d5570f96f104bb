"""Loopback servers and the worker host that serves many simulated workers on one port."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from gpufleet.loopback import LoopbackServer, WorkerHost


def tiny(name: str) -> FastAPI:
    app = FastAPI()

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": name}

    return app


async def test_worker_host_routes_by_prefix_and_502s_unknown() -> None:
    host = WorkerHost()
    host.add("a", tiny("a"))
    host.add("b", tiny("b"))
    server = LoopbackServer(host, name="host")
    await server.start()
    try:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{server.url}/w/a/api/version")).json() == {"version": "a"}
            assert (await client.get(f"{server.url}/w/b/api/version")).json() == {"version": "b"}
            assert (await client.get(f"{server.url}/w/c/api/version")).status_code == 502
            host.remove("a")
            assert (await client.get(f"{server.url}/w/a/api/version")).status_code == 502
            assert (await client.get(f"{server.url}/w/b/nope")).status_code == 404
    finally:
        await server.stop()
