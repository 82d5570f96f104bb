"""``redis+sentinel://`` URLs: a real Sentinel (redis-server --sentinel) in front of the
test Redis; gpufleet asks it for the master and works through it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gpufleet.loopback import free_port
from gpufleet.settings import QueueSettings
from gpufleet.store.connection import EmbeddedRedis, connect, find_redis_server, parse_sentinel_url
from gpufleet.store.queue import TaskQueue
from gpufleet.tasks import TaskSubmit


def test_parse_sentinel_urls() -> None:
    one = parse_sentinel_url("redis+sentinel://s1:26379,s2:26380/mymaster/2")
    assert one.hosts == (("s1", 26379), ("s2", 26380))
    assert (one.service, one.db, one.password) == ("mymaster", 2, None)
    two = parse_sentinel_url("redis+sentinel://:p%40ss@s1/gpufleet")
    assert two.hosts == (("s1", 26379),)
    assert (two.service, two.db, two.password) == ("gpufleet", 0, "p@ss")


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379",
        "redis+sentinel:///mymaster",
        "redis+sentinel://s1:port/mymaster",
        "redis+sentinel://s1:26379/mymaster/db",
        "redis+sentinel://s1:26379/a/1/2",
    ],
)
def test_bad_sentinel_urls_say_what_is_wrong(url: str) -> None:
    with pytest.raises(ValueError, match="sentinel"):
        parse_sentinel_url(url)


@pytest.fixture
def sentinel(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[int]:
    master_port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor gpufleet 127.0.0.1 {master_port} 1\n"
    )
    proc = subprocess.Popen(
        [find_redis_server(), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        for _ in range(200):  # until the sentinel answers for the service
            try:
                if client.sentinel_get_master_addr_by_name("gpufleet"):
                    break
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        else:
            pytest.fail("redis sentinel did not start")
        yield port
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


async def test_the_queue_works_through_a_sentinel_url(sentinel: int, redis: object) -> None:
    client = connect(f"redis+sentinel://127.0.0.1:{sentinel}/gpufleet/0")
    try:
        assert await client.ping()
        queue = TaskQueue(client, QueueSettings(), key_prefix="sentinel-test")
        task = await queue.enqueue(
            TaskSubmit.model_validate(
                {"kind": "ollama", "payload": {"api": "generate", "body": {"model": "m"}}}
            )
        )
        assert (await queue.get(task.id)).id == task.id
        await queue.aclose()
    finally:
        await client.aclose()
