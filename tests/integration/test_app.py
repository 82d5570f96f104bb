"""The app against a real Redis: health, readiness, metrics, error shape, lifespan cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gpufleet.app import create_app
from gpufleet.settings import load_settings
from tests.conftest import free_port


async def test_ready_health_metrics_with_real_redis(redis_url: str) -> None:
    app = create_app(load_settings(env_file=None, redis={"url": redis_url}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/health")).json()["status"] == "ok"
            ready = await client.get("/ready")
            assert ready.status_code == 200
            assert ready.json()["redis"] == "ok"
            metrics = await client.get("/metrics")
            assert "gpufleet_build_info" in metrics.text
            assert "process_resident_memory_bytes" in metrics.text
            missing = await client.get("/api/v1/nothing-here")
            assert missing.status_code == 404
            assert missing.json() == {"error": {"code": "not_found", "message": "Not Found"}}
            assert (await client.get("/docs")).status_code == 200


async def test_api_docs_can_be_turned_off(redis_url: str) -> None:
    """/docs and /redoc load scripts from a CDN: one setting turns both off; the schema stays."""
    for enabled in (True, False):
        settings = load_settings(env_file=None, redis={"url": redis_url},
                                 server={"api_docs": enabled})
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for page in ("/docs", "/redoc"):
                    answer = await client.get(page)
                    assert answer.status_code == (200 if enabled else 404), (enabled, page)
                    if not enabled:
                        assert answer.json()["error"]["code"] == "not_found"
                assert (await client.get("/openapi.json")).status_code == 200


def test_api_docs_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_SERVER__API_DOCS", "false")
    assert load_settings(env_file=None).server.api_docs is False


async def test_ready_is_503_when_redis_is_gone(tmp_path: Path) -> None:
    from gpufleet.store.connection import EmbeddedRedis

    server = EmbeddedRedis(tmp_path, port=free_port())
    server.start()
    app = create_app(load_settings(env_file=None, redis={"url": server.url}))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/ready")).status_code == 200
                server.kill()
                answer = await client.get("/ready")
                assert answer.status_code == 503
                assert answer.json()["error"]["code"] == "not_ready"
                assert (await client.get("/health")).status_code == 200
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_serve_with_embedded_redis_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "GPUFLEET_CONFIG": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufleet", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                if ready.status_code == 200:
                    # The served process does not tell the internet what it runs on.
                    assert "server" not in ready.headers, ready.headers
                    assert ready.headers["x-content-type-options"] == "nosniff"
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        pidfile = tmp_path / "gpufleet" / "redis" / "redis.pid"
        redis_pid = int(pidfile.read_text())
        assert Path(f"/proc/{redis_pid}").exists()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 130, out  # typer's status for Ctrl-C, kept by gpufleet.entry
    assert "embedded redis-server" in out
    for _ in range(100):
        if not Path(f"/proc/{redis_pid}").exists():
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{redis_pid}").exists(), "redis-server left running after Ctrl-C"


@pytest.mark.timeout(60)
def test_serve_exits_3_when_it_cannot_bind(tmp_path: Path) -> None:
    """uvicorn could not start (the port is taken): status 3, as uvicorn.run exits with,
    and the embedded redis-server the lifespan started is stopped again."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "GPUFLEET_CONFIG": ""}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gpufleet", "serve", "--host", "127.0.0.1", "--port",
             str(port)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50,
        )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "embedded redis-server" in done.stderr
    assert "stopped" in done.stderr
