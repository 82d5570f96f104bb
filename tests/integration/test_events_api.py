"""/api/v1/events: recent as JSON, live as SSE over a real socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from gpufleet.app import create_app
from gpufleet.loopback import LoopbackServer
from gpufleet.settings import load_settings


async def test_recent_events_newest_first(api: Any) -> None:
    await api.services.events.emit("scale", pool="a", action="Create", reason="3 queued")
    await api.services.events.emit("scale", pool="b", action="Stop", reason="idle")
    listed = (await api.get("/api/v1/events")).json()
    assert [e["pool"] for e in listed] == ["b", "a"]
    assert [e["pool"] for e in (await api.get("/api/v1/events?pool=a")).json()] == ["a"]
    _, user_key = await api.keys.create("u")
    user = await api.get("/api/v1/events", headers={"Authorization": f"Bearer {user_key}"})
    assert user.status_code == 403


async def test_sse_stream_delivers_new_events(redis_url: str, redis: Any) -> None:
    app = create_app(load_settings(env_file=None, redis={"url": redis_url}))
    server = LoopbackServer(app, name="gpufleet")
    await server.start()
    try:
        components = app.state.services
        _, key = await components.apikeys.create("admin", role="admin")
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            httpx.AsyncClient(base_url=server.url, headers=headers) as client,
            client.stream("GET", "/api/v1/events/stream") as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            assert await anext(lines) == ": connected"
            await asyncio.sleep(0.05)
            await components.events.emit("scale", pool="p", action="Create")
            data = None
            while data is None:
                line = await asyncio.wait_for(anext(lines), 5)
                if line.startswith("data: "):
                    data = json.loads(line[6:])
            assert data["action"] == "Create"
            assert data["pool"] == "p"
    finally:
        await server.stop()
