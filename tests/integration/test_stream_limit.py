"""Open event streams are capped per key ([auth] max_streams_per_key), over a real socket.

Task event streams and fleet event streams count together; one more is 429 with the usual
error body; a stream the client closes gives its place back (the server notices the
disconnect), so a new one is accepted; other keys are not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpufleet.app import create_app
from gpufleet.loopback import LoopbackServer
from gpufleet.settings import load_settings
from gpufleet.store.streams import StreamPlaces

CAP = 3
GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}


@pytest.fixture
async def live(redis_url: str, redis: Any, tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        results={"dir": tmp_path / "results"},
        auth={"max_streams_per_key": CAP},
    )
    app = create_app(settings)
    server = LoopbackServer(app, name="gpufleet")
    await server.start()
    try:
        yield server.url, app.state.services
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def stream(client: httpx.AsyncClient, path: str) -> AsyncIterator[httpx.Response]:
    """The answer; once accepted, its first line was read and ``response.lines`` goes on."""
    async with client.stream("GET", path) as response:
        if response.status_code == 200:
            lines = response.aiter_lines()
            assert await anext(lines) == ": connected"
            response.lines = lines  # type: ignore[attr-defined]
        else:
            await response.aread()
        yield response


async def until_accepted(
    held: contextlib.AsyncExitStack, client: httpx.AsyncClient, path: str
) -> httpx.Response:
    """A closed stream's place comes back once the server has seen the disconnect; the
    accepted stream is kept open in ``held``."""
    for _ in range(100):
        response = await held.enter_async_context(stream(client, path))
        if response.status_code == 200:
            return response
        assert response.status_code == 429
        await asyncio.sleep(0.05)
    raise AssertionError("a closed stream's place never came back")


async def test_streams_over_the_cap_are_429_until_one_closes(live: tuple[str, Any]) -> None:
    url, components = live
    keys = components.apikeys
    admin, admin_key = await keys.create("ops", role="admin")
    _, user_key = await keys.create("alice", role="user")
    async with (
        httpx.AsyncClient(base_url=url, timeout=10,
                          headers={"Authorization": f"Bearer {admin_key}"}) as client,
        httpx.AsyncClient(base_url=url, timeout=10,
                          headers={"Authorization": f"Bearer {user_key}"}) as user,
    ):
        task = (await client.post("/api/v1/tasks", json={"payload": GRAPH})).json()
        task_events = f"/api/v1/tasks/{task['id']}/events"
        paths = [task_events, "/api/v1/events/stream", task_events]
        async with contextlib.AsyncExitStack() as held:
            opened = [await held.enter_async_context(stream(client, p)) for p in paths]
            assert [r.status_code for r in opened] == [200] * CAP
            places = StreamPlaces(components.redis, prefix="gpufleet")
            assert await places.held(admin.id) == CAP

            for path in (task_events, "/api/v1/events/stream"):
                async with stream(client, path) as refused:
                    assert refused.status_code == 429, path
                    error = refused.json()["error"]
                    assert error["code"] == "rate_limited"
                    assert "max_streams_per_key" in error["message"]
                    assert int(refused.headers["retry-after"]) >= 1

            # Another key has places of its own.
            mine = (await user.post("/api/v1/tasks", json={"payload": GRAPH})).json()
            async with stream(user, f"/api/v1/tasks/{mine['id']}/events") as other:
                assert other.status_code == 200

            # Close one of the three: a new stream is accepted, and the cap holds again.
            await opened[1].aclose()
            await until_accepted(held, client, "/api/v1/events/stream")
            assert await places.held(admin.id) == CAP
            async with stream(client, task_events) as refused:
                assert refused.status_code == 429
        # Every stream closed: every place is given back.
        for _ in range(100):
            if await places.held(admin.id) == 0:
                break
            await asyncio.sleep(0.05)
        assert await places.held(admin.id) == 0


async def test_a_finished_task_stream_gives_its_place_back(live: tuple[str, Any]) -> None:
    url, components = live
    key, secret = await components.apikeys.create("bob", role="user")
    places = StreamPlaces(components.redis, prefix="gpufleet")
    async with httpx.AsyncClient(base_url=url, timeout=10,
                                 headers={"Authorization": f"Bearer {secret}"}) as client:
        for _ in range(CAP + 2):  # more streams than the cap, one after the other
            task = (await client.post("/api/v1/tasks", json={"payload": GRAPH})).json()
            async with stream(client, f"/api/v1/tasks/{task['id']}/events") as response:
                assert response.status_code == 200
                assert (await client.post(f"/api/v1/tasks/{task['id']}/cancel")).is_success
                body = [line async for line in response.lines]  # type: ignore[attr-defined]
            assert "event: cancelled" in body
    for _ in range(100):
        if await places.held(key.id) == 0:
            break
        await asyncio.sleep(0.05)
    assert await places.held(key.id) == 0


def test_the_cap_is_a_documented_setting_with_a_sane_default() -> None:
    settings = load_settings(env_file=None)
    assert settings.auth.max_streams_per_key == 20
