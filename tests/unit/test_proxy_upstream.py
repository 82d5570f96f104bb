"""The proxy's lean upstream client against a raw asyncio server (real sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gpufleet.proxy.upstream import UpstreamClient, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.url = ""

    async def start(self, handler: Handler) -> asyncio.Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/chat"
        return server


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(connect_timeout_s=2)
    yield upstream
    await upstream.aclose()


async def body_of(client: UpstreamClient, url: str, payload: bytes = b"{}") -> bytes:
    response = await client.post(url, payload)
    parts = []
    try:
        while (chunk := await response.read_chunk()) is not None:
            parts.append(chunk)
    finally:
        await response.aclose()
    return b"".join(parts)


async def test_keep_alive_connection_is_reused_and_chunked_bodies_decoded(
    client: UpstreamClient,
) -> None:
    server = Server()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            await writer.drain()

    async with await server.start(echo):
        assert await body_of(client, server.url, b'{"a":1}') == b'{"a":1}'
        assert await body_of(client, server.url, b'{"b":2}') == b'{"b":2}'
    assert server.connections == 1


async def test_ended_only_once_the_last_piece_was_read(client: UpstreamClient) -> None:
    """``ended`` lets the relay send the body's last piece as the end of the answer: it
    must not be true while more of the body may come, nor before the last piece is read."""
    server = Server()
    go_on = asyncio.Event()

    async def in_two(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await writer.drain()
        await go_on.wait()
        writer.write(b"-last")
        await writer.drain()
        await asyncio.sleep(0.5)

    async with await server.start(in_two):
        response = await client.post(server.url, b"{}")
        try:
            assert await response.read_chunk() == b"first"
            assert not response.ended  # half of the declared length is still to come
            go_on.set()
            assert await response.read_chunk() == b"-last"
            assert response.ended
            assert await response.read_chunk() is None
        finally:
            await response.aclose()
        assert not response.ended  # closed: nothing more to say about it


async def test_a_body_that_came_with_the_head_has_not_ended_before_it_is_read(
    client: UpstreamClient,
) -> None:
    server = Server()

    async def at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nall")
        await writer.drain()
        await asyncio.sleep(0.5)

    async with await server.start(at_once):
        response = await client.post(server.url, b"{}")
        try:
            for _ in range(50):  # until the body, sent with the head, has been parsed
                if response._conn is not None and response._conn.complete:
                    break
                await asyncio.sleep(0.01)
            assert not response.ended  # complete, but its one piece is still unread
            assert await response.read_chunk() == b"all"
            assert response.ended
        finally:
            await response.aclose()


async def test_a_body_cut_off_mid_way_is_an_upstream_error(client: UpstreamClient) -> None:
    server = Server()

    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()

    async with await server.start(dies):
        with pytest.raises(UpstreamError):
            await body_of(client, server.url)


async def test_a_body_delimited_by_the_close_is_complete(client: UpstreamClient) -> None:
    server = Server()

    async def old_style(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async with await server.start(old_style):
        assert await body_of(client, server.url) == b"all of it"


async def test_silence_past_the_deadline_is_a_timeout(client: UpstreamClient) -> None:
    server = Server()
    release = asyncio.Event()

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await release.wait()

    async with await server.start(stalls):
        response = await client.post(server.url, b"{}")
        loop = asyncio.get_running_loop()
        assert await response.read_chunk(loop.time() + 5) == b"abc"
        with pytest.raises(TimeoutError):
            await response.read_chunk(loop.time() + 0.05)
        await response.aclose()
        release.set()


async def test_no_headers_by_the_deadline_is_a_timeout_and_drops_the_connection(
    client: UpstreamClient,
) -> None:
    server = Server()
    release = asyncio.Event()
    gone = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        if await reader.read(1) == b"":  # the client closed: the worker sees it go away
            gone.set()
        await release.wait()

    async with await server.start(never_answers):
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await client.post(server.url, b"{}", deadline=loop.time() + 0.05)
        await asyncio.wait_for(gone.wait(), 5)
        release.set()
        assert repr(client) == "<UpstreamClient idle=0>"


async def test_nothing_listening_is_an_upstream_error(client: UpstreamClient) -> None:
    server = Server()
    async with await server.start(lambda r, w: asyncio.sleep(0)):
        url = server.url
    with pytest.raises(UpstreamError):
        await client.post(url, b"{}")
