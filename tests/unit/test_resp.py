"""The lean RESP client's wire format: encoding commands, reading replies in pieces."""

from __future__ import annotations

import fakeredis
import pytest
from redis.exceptions import NoScriptError, ResponseError

from gpufleet.store.connection import connect
from gpufleet.store.resp import RespClient, _Incomplete, _parse, _Protocol, encode


def test_encode_is_an_array_of_bulk_strings() -> None:
    assert encode("EVALSHA", b"ab", 2, 1.5) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\n1.5\r\n"
    )


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b":42\r\n", 42),
        (b"+OK\r\n", "OK"),
        (b"$3\r\nabc\r\n", b"abc"),
        (b"$-1\r\n", None),
        (b"*2\r\n:1\r\n$1\r\nx\r\n", [1, b"x"]),
        (b"*-1\r\n", None),
    ],
)
def test_parse_reads_each_reply_kind(raw: bytes, value: object) -> None:
    assert _parse(raw, 0) == (value, len(raw))


def test_error_replies_become_redis_py_exceptions() -> None:
    noscript, _ = _parse(b"-NOSCRIPT No matching script\r\n", 0)
    other, _ = _parse(b"-ERR wrong number of arguments\r\n", 0)
    assert isinstance(noscript, NoScriptError)
    assert isinstance(other, ResponseError)
    assert not isinstance(other, NoScriptError)


@pytest.mark.parametrize("raw", [b":4", b"$3\r\nab", b"*2\r\n:1\r\n"])
def test_a_reply_cut_short_waits_for_more(raw: bytes) -> None:
    with pytest.raises(_Incomplete):
        _parse(raw, 0)


async def test_replies_split_across_reads_resolve_in_order() -> None:
    import asyncio

    protocol = _Protocol()
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(3)]
    protocol.waiting.extend(futures)
    stream = b":1\r\n$5\r\nhello\r\n-ERR no\r\n"
    for i in range(0, len(stream), 3):  # three bytes at a time
        protocol.data_received(stream[i : i + 3])
    assert futures[0].result() == 1
    assert futures[1].result() == b"hello"
    assert isinstance(futures[2].result(), ResponseError)
    assert not protocol.waiting
    assert protocol.buf == b""


async def test_only_plain_tcp_and_unix_servers_get_the_lean_client() -> None:
    tcp = connect("redis://10.0.0.1:6390/3")
    unix = connect("unix:///run/redis.sock")
    fake = fakeredis.FakeAsyncRedis()
    tls = connect("rediss://10.0.0.1:6390/0")
    try:
        lean = RespClient.for_client(tcp)
        assert lean is not None
        assert (lean.host, lean.port, lean.db) == ("10.0.0.1", 6390, 3)
        lean = RespClient.for_client(unix)
        assert lean is not None
        assert lean.path == "/run/redis.sock"
        assert RespClient.for_client(fake) is None
        assert RespClient.for_client(tls) is None
    finally:
        for client in (tcp, unix, fake, tls):
            await client.aclose()
