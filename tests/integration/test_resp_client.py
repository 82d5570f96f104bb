"""The lean RESP client against a real redis-server: scripts, errors, auth, broken links."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

from gpufleet.store.connection import EmbeddedRedis
from gpufleet.store.resp import RespClient
from tests.conftest import free_port

SCRIPT = "redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]); return redis.call('ZCARD', KEYS[1])"


async def test_pipelined_scripts_answer_in_order(redis: aioredis.Redis, redis_url: str) -> None:
    sha = await redis.script_load(SCRIPT)
    client = RespClient.for_client(aioredis.Redis.from_url(redis_url))
    assert client is not None
    try:
        replies = await asyncio.gather(
            *(client.execute_many([("EVALSHA", sha, 1, "z", 1.5, f"m{i}")]) for i in range(50))
        )
        assert sorted(r[0] for r in replies) == list(range(1, 51))
        assert await redis.zcard("z") == 50
        mixed = await client.execute_many(
            [("EVALSHA", "0" * 40, 0), ("GET", "nope"), ("INCRBY", "n", "x"), ("INCR", "n")]
        )
        assert isinstance(mixed[0], NoScriptError)
        assert mixed[1] is None
        assert isinstance(mixed[2], ResponseError)
        assert mixed[3] == 1
    finally:
        await client.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies(
    redis: aioredis.Redis, redis_url: str
) -> None:
    client = RespClient.for_client(aioredis.Redis.from_url(redis_url))
    assert client is not None
    try:
        await redis.set("a", "1")
        gone = asyncio.ensure_future(client.execute_many([("DEBUG", "SLEEP", "0.05")]))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert await client.execute_many([("GET", "a")]) == [b"1"]
    finally:
        await client.aclose()


async def test_username_password_and_db_from_the_url(
    redis: aioredis.Redis, redis_server: EmbeddedRedis
) -> None:
    await redis.execute_command("ACL", "SETUSER", "h18", "on", ">s3cret", "~*", "+@all")
    host_port = redis_server.url.removeprefix("redis://").split("/")[0]
    try:
        good = RespClient.for_client(aioredis.Redis.from_url(f"redis://h18:s3cret@{host_port}/2"))
        assert good is not None
        assert await good.execute_many([("SET", "k", "v"), ("CLIENT", "INFO")]) is not None
        await good.aclose()
        db2 = aioredis.Redis.from_url(f"redis://{host_port}/2")
        assert await db2.get("k") == b"v"
        await db2.flushdb()
        await db2.aclose()
        bad = RespClient.for_client(aioredis.Redis.from_url(f"redis://h18:wrong@{host_port}/0"))
        assert bad is not None
        with pytest.raises(ConnectionError, match="refused"):
            await bad.execute_many([("PING",)])
    finally:
        await redis.execute_command("ACL", "DELUSER", "h18")


async def test_a_lost_server_fails_the_call_and_the_next_call_reconnects(tmp_path) -> None:
    server = EmbeddedRedis(tmp_path, port=free_port(), appendfsync="everysec")
    server.start()
    client = RespClient.for_client(aioredis.Redis.from_url(server.url))
    assert client is not None
    try:
        assert await client.execute_many([("PING",)]) == ["PONG"]
        server.kill()
        with pytest.raises(ConnectionError):
            await client.execute_many([("PING",)])
        server.start()
        assert await client.execute_many([("PING",)]) == ["PONG"]
    finally:
        await client.aclose()
        server.stop()
