"""The embedded redis-server really runs, keeps data in its AOF, and stops cleanly."""

from __future__ import annotations

from pathlib import Path

import redis as sync_redis
import redis.asyncio as aioredis

from gpufleet.store.connection import EmbeddedRedis, find_redis_server


async def test_real_redis_answers_and_runs_lua(redis: aioredis.Redis) -> None:
    assert await redis.ping()
    info = await redis.info("server")
    assert "redis_version" in info
    assert await redis.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, "k", 41) == 41


def test_binary_found() -> None:
    assert Path(find_redis_server()).name == "redis-server"


def test_embedded_unix_socket_aof_survives_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "data")
    url = server.start()
    assert url.startswith("unix://")
    pid = server.process.pid if server.process else 0
    client = sync_redis.Redis.from_url(url)
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("appendfsync")["appendfsync"] == "always"
    assert client.config_get("hz")["hz"] == "1"  # an idle embedded server wakes once a second
    client.set("accepted", "yes")
    client.close()
    server.kill()  # SIGKILL: only the AOF can bring the key back
    server.stop()

    again = EmbeddedRedis(tmp_path / "data")
    url = again.start()
    client = sync_redis.Redis.from_url(url)
    assert client.get("accepted") == b"yes"
    client.close()
    again.stop()
    assert again.process is None
    assert (
        not Path(f"/proc/{pid}").exists()
        or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    )
