"""The secret between gpufleet and its workers: who holds it, and how a call carries it.

A worker's engine port is reachable from the internet on most clouds (a Novita HTTP
port is a public URL). So every worker gpufleet creates gets a secret of its own,
injected at create time (the Novita ``envs`` variable ``GPUFLEET_WORKER_TOKEN``), and
the worker image runs ``gpufleet worker-gate`` in front of its engine: a small reverse
proxy that answers 401 to any call without that secret (``gpufleet.worker_gate``).
Static and SURF pools may set a fixed ``token`` per pool in config.

gpufleet sends the secret on every call to a worker — health probes, engine runs,
model pulls, the ComfyUI websocket, proxied inference — as the header
``X-Gpufleet-Worker-Token``. The registry keeps each worker's secret in its Redis
record (never in the API's answers, never in a log line) and, whenever it loads a
worker, notes which ``base_url`` needs which secret in a ``WorkerTokens`` map.
``WorkerAuth`` (an ``httpx.Auth`` on the engines' shared client) adds the header to
any request under a known ``base_url``, so an engine call cannot forget it, and a
secret is never sent to a URL that is not that worker's.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Generator, Iterable
from urllib.parse import urlsplit

import httpx

TOKEN_HEADER = "X-Gpufleet-Worker-Token"
TOKEN_ENV = "GPUFLEET_WORKER_TOKEN"


def new_token() -> str:
    """A fresh per-worker secret (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def presented_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The secret a request carries: ``X-Gpufleet-Worker-Token``, else a Bearer token."""
    bearer = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"x-gpufleet-worker-token":
            return value.decode("latin-1").strip()
        if lowered == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                bearer = rest.strip()
    return bearer


def token_ok(headers: Iterable[tuple[bytes, bytes]], token: str) -> bool:
    """True if the request carries ``token`` (constant-time compare)."""
    given = presented_token(headers)
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


class WorkerTokens:
    """``base_url`` → secret of the worker there, for this process.

    Several workers may share an origin (the demo serves every simulated Novita worker
    under ``/w/<id>`` of one port), so a URL matches the longest known ``base_url`` it
    starts with, path segment by segment.
    """

    def __init__(self) -> None:
        self._by_origin: dict[str, dict[str, str]] = {}

    def __repr__(self) -> str:  # never the secrets themselves
        return f"<WorkerTokens {sum(len(v) for v in self._by_origin.values())} urls>"

    def set(self, base_url: str, token: str) -> None:
        """Remember ``token`` for ``base_url`` (an empty token forgets it)."""
        if not base_url:
            return
        base = base_url.rstrip("/")
        paths = self._by_origin.setdefault(_origin(base), {})
        path = urlsplit(base).path
        if token:
            paths[path] = token
        else:
            paths.pop(path, None)

    def token_for(self, url: str | httpx.URL) -> str | None:
        """The secret to send with a request to ``url``, if it is under a worker's URL."""
        text = str(url)
        paths = self._by_origin.get(_origin(text))
        if not paths:
            return None
        path = urlsplit(text).path
        best: str | None = None
        best_len = -1
        for base, token in paths.items():
            if (path == base or path.startswith(base + "/") or base == "") and len(base) > best_len:
                best, best_len = token, len(base)
        return best

    def headers_for(self, url: str | httpx.URL) -> dict[str, str]:
        token = self.token_for(url)
        return {TOKEN_HEADER: token} if token else {}


class WorkerAuth(httpx.Auth):
    """Adds a worker's secret to each request under that worker's ``base_url``."""

    requires_request_body = False
    requires_response_body = False

    def __init__(self, tokens: WorkerTokens) -> None:
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"<WorkerAuth {self.tokens!r}>"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.tokens.token_for(request.url)
        if token and TOKEN_HEADER not in request.headers:
            request.headers[TOKEN_HEADER] = token
        yield request
