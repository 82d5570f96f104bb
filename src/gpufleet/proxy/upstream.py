"""The proxy's upstream HTTP/1.1 client: one POST to a worker, its body streamed back.

Why not httpx here: per proxied request httpx + httpcore cost ~0.6 ms of CPU with
one connection and ~1.1 ms with 64 (the pool checks every idle connection with a
``poll()`` on each request; see ``bench/proxy_overhead.py``), which was most of the
proxy's overhead. This client does one thing — ``POST`` a body, stream the answer —
on ``asyncio`` protocols with ``httptools`` (the C llhttp parser uvicorn already
uses server-side) and a LIFO stack of idle keep-alive connections per origin:
~0.1 ms per request at any concurrency. httpx stays for everything else the proxy
asks a worker (``/api/show``) and for engines and providers.

What it does not do: redirects, cookies, proxies from the environment, compression,
HTTP/2, ``Expect: 100-continue``. Errors are ``UpstreamError`` (connect, reset, a
malformed or truncated answer); ``TimeoutError`` past the caller's deadline (a bare
timer per wait, not ``asyncio.timeout``), and a cancelled or abandoned response closes
its connection, so the worker sees the
client go away.

Consumer: ``gpufleet.proxy.relay.ProxyService._relay``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
from typing import cast
from urllib.parse import urlsplit

import httptools

from gpufleet.proxy.coarse_timer import coarse_timer

# A connection idle longer than this is closed instead of reused: uvicorn drops idle
# keep-alive connections after 5 s, and a reuse racing that close would fail a request.
IDLE_REUSE_S = 4.0
# Stop reading from the worker while this much of its answer waits for the client.
_HIGH_WATER = 256 * 1024
_MAX_IDLE_PER_ORIGIN = 256


class UpstreamError(Exception):
    """The worker could not be reached, or its answer broke off or did not parse."""


_Origin = tuple[str, str, int]  # scheme, host, port


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; carries one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad HTTP answer from the worker: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.complete and not self._framed():
            self.complete = True  # a body delimited by the end of the connection
            self._wake()
        elif not self.complete:
            self._fail(UpstreamError(f"worker closed the connection ({exc or 'EOF'})"))

    # -- httptools callbacks -------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Asked now: llhttp forgets the message's keep-alive flags once it is over.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # -- for the response ----------------------------------------------------------------

    def _framed(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" in names or b"transfer-encoding" in names

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, deadline: float | None = None) -> None:
        """Until the parser has news; ``TimeoutError`` past ``deadline`` (loop time)."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        # A coarse timer (up to a tick late), not asyncio.timeout() nor a loop timer of its
        # own: this runs once per proxied request and once per chunk of every stream.
        timers = coarse_timer(loop)
        timer = (
            timers.call_at(deadline, functools.partial(_expire, waiter))
            if deadline is not None
            else None
        )
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timers.cancel(timer)
        if self.error is not None:
            raise self.error

    def take(self) -> bytes | None:
        if not self.chunks:
            return None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= _HIGH_WATER // 4 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and self.error is None
            and not self.chunks
            and self.keep_alive
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamResponse:
    """The status and headers of a worker's answer; its body via ``read_chunk``.

    ``aclose`` must be called (``ProxyService._relay`` does, in ``finally``): it puts a
    fully read connection back in the pool and closes any other.
    """

    def __init__(self, client: UpstreamClient, origin: _Origin, conn: _Connection) -> None:
        self._client = client
        self._origin = origin
        self._conn: _Connection | None = conn
        self.status_code = conn.parser.get_status_code()
        self.headers = conn.headers

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def ended(self) -> bool:
        """The whole body has arrived and been read: the next ``read_chunk`` is None."""
        conn = self._conn
        return conn is not None and conn.complete and not conn.chunks

    async def read_chunk(self, deadline: float | None = None) -> bytes | None:
        """The next piece of the body as it arrived, or None at its end. ``TimeoutError``
        if nothing came by ``deadline`` (event-loop time); ``UpstreamError`` if it broke."""
        conn = self._conn
        assert conn is not None, "response already closed"
        while True:
            chunk = conn.take()
            if chunk is not None:
                return chunk
            if conn.complete:
                return None
            await conn.wait(deadline)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._put_back(self._origin, conn)


@functools.lru_cache(maxsize=1024)  # one entry per worker URL and route
def _parsed(url: str) -> tuple[_Origin, bytes]:
    """``url``'s origin and the request head's first lines, up to the content length."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"cannot POST to {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]
    head = f"POST {target} HTTP/1.1\r\nhost: {host}\r\naccept: */*\r\n"
    return (parts.scheme, parts.hostname, port), head.encode("latin-1")


class UpstreamClient:
    """POST to workers over kept-alive HTTP/1.1 connections (LIFO per origin, no cap:
    a worker's slots are the real bound on concurrent requests)."""

    def __init__(self, *, connect_timeout_s: float = 10.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"<UpstreamClient idle={sum(len(v) for v in self._idle.values())}>"

    async def post(
        self,
        url: str,
        body: bytes,
        content_type: bytes = b"application/json",
        *,
        extra_head: bytes = b"",
        deadline: float | None = None,
    ) -> UpstreamResponse:
        """Send ``body``; return once the worker's status line and headers arrived.

        ``extra_head``: more header lines, each ending in CRLF (the worker's secret).
        ``deadline`` (event-loop time): ``TimeoutError`` if the headers have not come by
        then (the connection is closed); connecting has its own ``connect_timeout_s``."""
        origin, head_start = _parsed(url)
        head = head_start + f"content-length: {len(body)}\r\ncontent-type: ".encode()
        conn = await self._connection(origin)
        conn._reset()
        assert conn.transport is not None
        conn.transport.write(
            b"".join((head, content_type, b"\r\n", extra_head, b"\r\n", body))
        )
        try:
            while not conn.head_done:
                await conn.wait(deadline)
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(self, origin, conn)

    async def _connection(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and loop.time() - conn.idle_since < IDLE_REUSE_S:
                return conn
            conn.close()
        scheme, host, port = origin
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    _Connection,
                    host,
                    port,
                    ssl=self._ssl_context() if scheme == "https" else None,
                )
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc}") from exc
        except TimeoutError as exc:
            raise UpstreamError(f"connecting to {host}:{port} timed out") from exc
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _put_back(self, origin: _Origin, conn: _Connection) -> None:
        if not conn.reusable():
            conn.close()
            return
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= _MAX_IDLE_PER_ORIGIN:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
