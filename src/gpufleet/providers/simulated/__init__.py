"""Simulated clouds: ASGI apps that answer like Novita's and SURF's APIs.

Same paths, field names, status sequences, error bodies, HTTP codes and pagination as the
real APIs (shared/reference/provider-apis.md §1, §2, §5), so the real ``NovitaProvider`` and
``SurfProvider`` talk to them unchanged, through ``httpx.ASGITransport`` in tests or a
loopback socket in ``gpufleet demo``::

    app = create_novita_app(SimNovitaConfig(pull_s=0), clock=clock)
    transport = httpx.ASGITransport(app=app)
    provider = NovitaProvider(settings, transport=transport)
    app.state.sim.instances            # the cloud's own view, for assertions

Status advances by the injected ``clock`` (no timers): a test moves a ``FakeClock`` forward
instead of sleeping. Failures are injected with ``sim.faults.append(Fault(...))``, or at
random with ``sim.chaos = Chaos(rate=0.2, seed=1)``.
Nothing under ``gpufleet/`` imports this package except the demo wiring.

Shared here: ``FakeClock``, ``Fault`` and ``SimCloud`` (request log, auth, rate budget,
faults), which both apps build on.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

Clock = Callable[[], float]
Handler = Callable[[Request, Any], Awaitable[Response]]

__all__ = [
    "Chaos",
    "FakeClock",
    "Fault",
    "SimCloud",
    "SimNovitaConfig",
    "SimProduct",
    "SimSurfConfig",
    "create_novita_app",
    "create_surf_app",
]


class FakeClock:
    """A clock tests move by hand; ``sleep`` advances it (for injected retry sleeps)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Fault:
    """One injected failure, consumed by the next ``times`` matching requests.

    ``status`` answers with that error instead of doing the work (429 carries
    ``Retry-After: retry_after_s``); ``status=0`` does the work. ``hang_s`` then holds the
    answer that long (real time) — with ``status=0`` that is a create the cloud accepted
    whose answer the client never sees. ``path`` matches the end of the request path.
    """

    status: int = 500
    path: str | None = None
    method: str | None = None
    times: int = 1
    retry_after_s: float | None = None
    hang_s: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or path.rstrip("/").endswith(self.path.rstrip("/"))
        )


@dataclass
class Chaos:
    """Random failures: each request (not consumed by a ``Fault``) fails with probability
    ``rate``, as one of ``kinds`` picked at random (seeded, so a run repeats):

    - ``"429"``: rate limited, ``Retry-After: retry_after_s``;
    - ``"500"``: an internal error;
    - ``"hang"``: no answer for ``hang_s`` (real time), then a 504 — a client with a shorter
      timeout sees a timeout, and the cloud did nothing;
    - ``"lost"``: the cloud does the work, then holds the answer ``hang_s``: a create or a
      stop that happened although the client saw a timeout.

    ``only`` limits it to paths ending so (e.g. ``("/gpu/instance/create",)``); ``counts``
    says how many of each were injected.
    """

    rate: float = 0.2
    seed: int = 0
    kinds: tuple[str, ...] = ("429", "500", "hang", "lost")
    retry_after_s: float = 1.0
    hang_s: float = 0.5
    only: tuple[str, ...] = ()
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def draw(self, method: str, path: str) -> Fault | None:
        if self.only and not any(path.rstrip("/").endswith(p.rstrip("/")) for p in self.only):
            return None
        if self._rng.random() >= self.rate:
            return None
        kind = self._rng.choice(self.kinds)
        self.counts[kind] += 1
        if kind == "429":
            return Fault(status=429, retry_after_s=self.retry_after_s)
        if kind == "hang":
            return Fault(status=504, hang_s=self.hang_s)
        if kind == "lost":
            return Fault(status=0, hang_s=self.hang_s)
        return Fault(status=500)


@dataclass
class LoggedRequest:
    at: float
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class SimCloud:
    """What both simulated clouds share: clock, request log, auth, rate budget, faults."""

    provider = ""

    def __init__(self, clock: Clock, requests_per_minute: int | None, retry_after_s: float):
        self.clock = clock
        self.requests_per_minute = requests_per_minute
        self.retry_after_s = retry_after_s
        self.faults: list[Fault] = []
        self.chaos: Chaos | None = None
        self.log: list[LoggedRequest] = []
        self._window: deque[float] = deque()

    def error(self, status: int, reason: str, message: str) -> JSONResponse:
        raise NotImplementedError

    def authorized(self, request: Request) -> bool:
        raise NotImplementedError

    def advance(self) -> None:
        """Move every resource's status up to ``clock()``."""

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.matches(method, path):
                fault.times -= 1
                if fault.times == 0:
                    self.faults.remove(fault)
                return fault
        return None

    def _over_budget(self, now: float) -> bool:
        if self.requests_per_minute is None:
            return False
        while self._window and self._window[0] <= now - 60.0:
            self._window.popleft()
        if len(self._window) >= self.requests_per_minute:
            return True
        self._window.append(now)
        return False

    def count(self, method: str, path_end: str) -> int:
        return sum(1 for r in self.log if r.method == method and r.path.endswith(path_end))

    async def handle(self, request: Request, handler: Handler) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return self.error(400, "VALIDATOR_PARAM", "body is not JSON")
        now = self.clock()
        method, path = request.method, request.url.path
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() != "authorization"}
        self.log.append(LoggedRequest(now, method, path, dict(request.query_params), body, headers))
        if not self.authorized(request):
            return self.error(401, "UNAUTHORIZED", "invalid or missing token")
        fault = self._take_fault(method, path)
        if fault is None and self.chaos is not None:
            fault = self.chaos.draw(method, path)
        if self._over_budget(now) or (fault is not None and fault.status == 429):
            retry_after = fault.retry_after_s if fault and fault.retry_after_s else None
            limited = self.error(429, "RATE_LIMIT_EXCEEDED", "too many requests")
            limited.headers["Retry-After"] = f"{retry_after or self.retry_after_s:g}"
            return limited
        if fault is not None and fault.status:
            if fault.hang_s:
                await asyncio.sleep(fault.hang_s)
            return self.error(fault.status, "UNKNOWN", "injected failure")
        self.advance()
        response = await handler(request, body)
        if fault is not None and fault.hang_s:
            await asyncio.sleep(fault.hang_s)
        return response


def bill_usd(price_per_hour: float, seconds: float) -> float:
    return price_per_hour * seconds / 3600.0


# Imported last: the apps build on the classes above.
from gpufleet.providers.simulated.novita_app import (  # noqa: E402
    SimNovitaConfig,
    SimProduct,
    create_novita_app,
)
from gpufleet.providers.simulated.surf_app import SimSurfConfig, create_surf_app  # noqa: E402
