"""A lean, pipelined RESP2 client for the proxy's per-request Redis calls (slot scripts).

Why not redis-py here: each pipelined ``EVALSHA`` through redis-py costs ~85 µs of client
CPU (pool checkout, pipeline object, a readiness poll of the socket, timeouts), and a
proxied request makes two (slot acquire and release); written straight to one socket it
costs ~11 µs (``bench/proxy_overhead.py``). This client does only that: one connection,
commands written in order, replies read in order (so any number of callers pipeline
without a pool), reconnecting on the next call after the connection broke.

It speaks to a plain ``redis://`` or ``unix://`` server (``AUTH`` and ``SELECT`` as the
URL says). ``for_client`` returns None for anything else (TLS, Sentinel, fakeredis), and
the caller keeps redis-py. Errors match redis-py's: ``ConnectionError`` when the server
cannot be reached or the connection drops (every command in flight fails with it),
``NoScriptError`` / ``ResponseError`` for error replies, returned in place of the value
by ``execute_many`` so one failed script does not hide the others' results.

Consumer: ``gpufleet.store.workers.SlotBatcher``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

Reply = int | bytes | str | list[Any] | None | Exception
Command = tuple[str | bytes | int | float, ...]


_REPLY_SKIP = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n"


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def _parse(buf: bytes, pos: int) -> tuple[Reply, int]:
    """One reply from ``buf`` at ``pos``: (value, position after it)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos : pos + 1], buf[pos + 1 : end]
    pos = end + 2
    if kind == b":":
        return int(line), pos
    if kind == b"+":
        return line.decode(), pos
    if kind == b"-":
        message = line.decode(errors="replace")
        if message.startswith("NOSCRIPT"):
            return NoScriptError(message), pos
        return ResponseError(message), pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return buf[pos : pos + size], pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not a RESP reply: {buf[pos - len(line) - 3 : pos]!r}")


def encode(*args: str | bytes | int | float) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            raw = arg
        elif isinstance(arg, str):
            raw = arg.encode()
        elif isinstance(arg, float):
            raw = repr(arg).encode()
        else:
            raw = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self.buf = b""
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        try:
            while pos < len(buf):
                value, pos = _parse(buf, pos)
                future = self.waiting.popleft()
                if not future.done():  # its caller may have been cancelled meanwhile
                    future.set_result(value)
        except _Incomplete:
            pass
        except (ValueError, IndexError) as exc:  # a reply we cannot read: start over
            self._fail(ConnectionError(f"bad reply from Redis: {exc}"))
            if self.transport is not None:
                self.transport.close()
            return
        self.buf = buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)


class RespClient:
    """One pipelined connection; see the module docstring."""

    def __init__(
        self,
        *,
        path: str | None = None,
        host: str = "localhost",
        port: int = 6379,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        connect_timeout_s: float | None = 5.0,
    ) -> None:
        self.path = path
        self.host = host
        self.port = port
        self._auth = [a for a in (username, password) if a]
        self.db = db
        self.connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._quiet: list[bytes] = []  # quiet commands of this turn (``send_quiet``)

    def __repr__(self) -> str:
        where = f"unix://{self.path}" if self.path else f"redis://{self.host}:{self.port}"
        return f"<RespClient {where}/{self.db}>"

    @classmethod
    def for_client(cls, redis: aioredis.Redis) -> RespClient | None:
        """A client to the same server as ``redis`` (a redis-py client built by
        ``store.connection.connect``), or None when it is not a plain TCP/unix one."""
        pool = getattr(redis, "connection_pool", None)
        kwargs: dict[str, Any] = getattr(pool, "connection_kwargs", None) or {}
        kind = getattr(pool, "connection_class", None)
        common: dict[str, Any] = {
            "username": kwargs.get("username"),
            "password": kwargs.get("password"),
            "db": int(kwargs.get("db") or 0),
            "connect_timeout_s": kwargs.get("socket_connect_timeout") or 5.0,
        }
        if kind is UnixDomainSocketConnection and kwargs.get("path"):
            return cls(path=str(kwargs["path"]), **common)
        if kind is Connection and kwargs.get("host"):
            return cls(host=str(kwargs["host"]), port=int(kwargs.get("port") or 6379), **common)
        return None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path:
                    _, protocol = await loop.create_unix_connection(_Protocol, self.path)
                else:
                    _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"cannot connect to Redis ({self!r}): {exc}") from exc
        hello: list[Command] = []
        if self._auth:
            hello.append(("AUTH", *self._auth))
        if self.db:
            hello.append(("SELECT", self.db))
        if hello:
            for reply in await self._send(protocol, hello):
                if isinstance(reply, Exception):
                    assert protocol.transport is not None
                    protocol.transport.close()
                    raise ConnectionError(f"Redis refused the connection: {reply}")
        return protocol

    async def _ready(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            return protocol
        if self._connecting is not None:  # one connect serves every caller
            return await asyncio.shield(self._connecting)
        self._connecting = asyncio.get_running_loop().create_future()
        try:
            protocol = await self._connect()
        except BaseException as exc:
            self._connecting.set_exception(exc)
            self._connecting.exception()  # retrieved: no "never retrieved" warning
            raise
        else:
            self._protocol = protocol
            self._connecting.set_result(protocol)
            return protocol
        finally:
            self._connecting = None

    @staticmethod
    async def _send(protocol: _Protocol, commands: list[Command]) -> list[Reply]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        if protocol.lost or protocol.transport is None:
            raise ConnectionError("connection to Redis lost")
        protocol.waiting.extend(futures)
        protocol.transport.write(b"".join(encode(*command) for command in commands))
        if len(futures) == 1:  # the common case: no gather (a future and a callback less)
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    def send_quiet(self, command: Command) -> bool:
        """Send ``command`` at the end of this turn of the event loop, with every other quiet
        command of the turn in one write, asking Redis not to answer it (``CLIENT REPLY
        SKIP``): nothing wakes this process for it. Only for a command whose outcome nobody
        needs (an error is not seen either). A command sent later by this client reaches
        Redis after it. False, and nothing sent, when not connected."""
        protocol = self._protocol
        if protocol is None or protocol.lost or protocol.transport is None:
            return False
        if not self._quiet:
            asyncio.get_running_loop().call_soon(self._write_quiet)
        self._quiet.append(_REPLY_SKIP + encode(*command))
        return True

    def _write_quiet(self) -> None:
        quiet, self._quiet = self._quiet, []
        protocol = self._protocol
        if protocol is not None and not protocol.lost and protocol.transport is not None:
            protocol.transport.write(b"".join(quiet))

    async def execute_many(self, commands: list[Command]) -> list[Reply]:
        """The replies of ``commands``, sent in one write; an error reply is returned as
        its exception. Raises ``ConnectionError`` if the connection fails."""
        protocol = await self._ready()
        if self._quiet:  # what was sent quietly before goes first
            self._write_quiet()
        return await self._send(protocol, commands)

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            with contextlib.suppress(Exception):
                await asyncio.sleep(0)  # let connection_lost fail what is still in flight
