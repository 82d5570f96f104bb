"""The provider interface: one small ABC every cloud client implements, and what it returns.

A provider turns a cloud's API into normalized ``Instance`` values and typed errors
(``gpufleet.errors``). It keeps no state the reconciler depends on: every method is a
fresh look at the cloud, and every mutating call is safe to repeat (delete of a gone
instance is success, create looks its name up before it posts). Consumers: the
reconciler (``scaling/``), the manual REST routes (``api/providers.py``) and the CLI.

Also here, shared by the HTTP clients: ``ApiClient`` (one INFO line per call, timeouts,
``check_response`` mapping of HTTP answers to the error tree) and ``retrying`` (tenacity:
429 with ``Retry-After``, 5xx and connection errors; exponential backoff with jitter).
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import httpx
import tenacity

from gpufleet import errors
from gpufleet.metrics import PROVIDER_CALL_SECONDS, PROVIDER_CALLS
from gpufleet.settings import PoolSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


class InstanceState(StrEnum):
    """A provider status, normalized. Unknown provider statuses read as ``pending``."""

    pending = "pending"
    booting = "booting"
    running = "running"
    stopping = "stopping"
    stopped = "stopped"
    paused = "paused"
    deleted = "deleted"
    failed = "failed"


# States that hold (or will soon hold) a GPU and bill for it.
ACTIVE_INSTANCE_STATES = frozenset(
    {InstanceState.pending, InstanceState.booting, InstanceState.running, InstanceState.stopping}
)


class Capability(StrEnum):
    list = "list"
    get = "get"
    create = "create"
    start = "start"
    stop = "stop"
    delete = "delete"
    pause = "pause"
    resume = "resume"
    products = "products"


ACTIONS = frozenset(
    {Capability.start, Capability.stop, Capability.delete, Capability.pause, Capability.resume}
)


class Unsupported(errors.ProviderError):
    """The provider has no such operation (a SURF create, a static stop)."""

    code = "unsupported"


@dataclass(frozen=True, slots=True)
class Instance:
    """One machine at a provider, normalized. Times are epoch seconds, prices USD per hour."""

    id: str
    name: str
    state: InstanceState
    provider: str
    provider_status: str = ""
    base_url: str | None = None
    endpoints: Mapping[int, str] = field(default_factory=dict)
    gpu_name: str = ""
    price_per_hour: float | None = None
    created_at: float | None = None
    last_error: str = ""
    # The secret its worker gate wants (Novita: from the instance's envs); never shown.
    worker_token: str = field(default="", repr=False, compare=False)

    def __repr__(self) -> str:
        return f"<Instance {self.provider}/{self.id} {self.name} {self.state}>"


@dataclass(frozen=True, slots=True)
class Product:
    """A GPU product offered by a provider; prices in USD per GPU-hour."""

    id: str
    name: str
    price_per_hour: float
    spot_price_per_hour: float | None = None
    available: bool = True
    inventory_state: str = ""
    regions: tuple[str, ...] = ()
    cpu_per_gpu: int = 0
    memory_per_gpu_gb: int = 0


@dataclass(frozen=True, slots=True)
class AccountBalance:
    """A cloud account's money, USD. ``available_usd`` is what new instances may spend."""

    provider: str
    available_usd: float
    cash_usd: float | None = None
    credit_limit_usd: float | None = None
    pending_charges_usd: float | None = None
    outstanding_invoices_usd: float | None = None


class Provider(ABC):
    """One cloud (or a fixed URL list). Methods a provider lacks raise ``Unsupported``."""

    name: str = ""
    capabilities: frozenset[Capability] = frozenset()

    def __init__(self, pools: builtins.list[PoolSpec] | tuple[PoolSpec, ...] = ()) -> None:
        self.pools = tuple(pools)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {sorted(self.capabilities)}>"

    @abstractmethod
    async def list(self, pool: PoolSpec | None = None) -> builtins.list[Instance]:
        """gpufleet's own live instances (of ``pool``, or of every pool); deleted ones left out."""

    @abstractmethod
    async def get(self, instance_id: str) -> Instance:
        """One instance; ``NotFound`` if the provider does not know it (any more)."""

    async def find_by_name(self, name: str) -> Instance | None:
        """The live instance with exactly this name, if any (what a create retry checks)."""
        for inst in await self.list():
            if inst.name == name:
                return inst
        return None

    async def create(self, pool: PoolSpec, name: str) -> Instance:
        raise self._unsupported("create")

    async def start(self, instance_id: str) -> Instance | None:
        raise self._unsupported("start")

    async def stop(self, instance_id: str) -> Instance | None:
        raise self._unsupported("stop")

    async def delete(self, instance_id: str) -> None:
        raise self._unsupported("delete")

    async def pause(self, instance_id: str) -> Instance | None:
        raise self._unsupported("pause")

    async def resume(self, instance_id: str) -> Instance | None:
        raise self._unsupported("resume")

    async def products(self) -> builtins.list[Product]:
        raise self._unsupported("products")

    async def balance(self) -> AccountBalance:
        """The account's balance; ``Unsupported`` where the provider does not report one."""
        raise self._unsupported("balance")

    async def aclose(self) -> None:
        return None

    def _unsupported(self, operation: str) -> Unsupported:
        return Unsupported(f"{self.name} has no {operation}", provider=self.name)

    def pool_for_name(self, instance_name: str, prefix: str = "") -> PoolSpec | None:
        """The configured pool an instance name belongs to (longest matching pool name)."""
        best: PoolSpec | None = None
        for pool in self.pools:
            stem = prefix + pool.name
            if (instance_name == stem or instance_name.startswith(stem + "-")) and (
                best is None or len(pool.name) > len(best.name)
            ):
                best = pool
        return best


# -- HTTP plumbing shared by the clients ------------------------------------------------------

ErrorParser = Callable[[httpx.Response, Any], "tuple[str, str]"]


def _truncate(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (only the delta-seconds form; dates are ignored)."""
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def check_response(
    response: httpx.Response,
    *,
    provider: str,
    parse_error: ErrorParser,
    classify: Callable[[int, str, str], type[errors.ProviderError] | None] | None = None,
) -> Any:
    """The JSON body of a 2xx answer, or the typed error for anything else.

    ``parse_error(response, body)`` returns the provider's ``(reason, message)``;
    ``classify(status, reason, message)`` may pick a class before the status rules
    (Novita's business errors are all HTTP 400 and differ only in ``reason``).
    """
    body: Any = None
    try:
        body = response.json() if response.content else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    status = response.status_code
    if 200 <= status < 300:
        if body is None:
            raise errors.ProviderBadResponse(
                f"{provider}: non-JSON answer: {_truncate(response.text)}",
                provider=provider,
                status=status,
            )
        return body
    if body is None:
        reason, message = "", _truncate(response.text)
    else:
        reason, message = parse_error(response, body)
        message = _truncate(message)
    cls = classify(status, reason, message) if classify else None
    if cls is None:
        cls = _class_for_status(status)
    text = f"{provider}: {message or reason or status}" + (f" ({reason})" if reason else "")
    if cls is errors.RateLimited:
        raise errors.RateLimited(
            text, retry_after=retry_after_s(response), provider=provider, status=status
        )
    raise cls(text, provider=provider, status=status, reason=reason)


def _class_for_status(status: int) -> type[errors.ProviderError]:
    if status in (401, 403):
        return errors.AuthFailed
    if status == 404:
        return errors.NotFound
    if status == 409:
        return errors.InvalidState
    if status == 429:
        return errors.RateLimited
    if status >= 500:
        return errors.ProviderUnavailable
    return errors.ProviderError


class ApiClient:
    """An ``httpx.AsyncClient`` with a timeout on every call and one INFO line per call."""

    def __init__(
        self,
        provider: str,
        base_url: str,
        *,
        headers: Mapping[str, str],
        timeout_s: float,
        parse_error: ErrorParser,
        classify: Callable[[int, str, str], type[errors.ProviderError] | None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.provider = provider
        self.timeout_s = timeout_s
        self._parse_error = parse_error
        self._classify = classify
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=dict(headers),
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        started = time.perf_counter()
        outcome = "ok"
        status: int | str = "-"
        try:
            # asyncio.timeout as well as httpx's: an in-process (ASGI) transport has no timeouts.
            async with asyncio.timeout(self.timeout_s):
                response = await self._http.request(
                    method, path, params=params, json=json_body, headers=headers
                )
            status = response.status_code
            return check_response(
                response,
                provider=self.provider,
                parse_error=self._parse_error,
                classify=self._classify,
            )
        except (TimeoutError, httpx.TimeoutException) as exc:
            outcome = "ProviderUnavailable"
            raise errors.ProviderUnavailable(
                f"{self.provider}: {method} {path} timed out after {self.timeout_s:g} s",
                provider=self.provider,
            ) from exc
        except httpx.TransportError as exc:
            outcome = "ProviderUnavailable"
            raise errors.ProviderUnavailable(
                f"{self.provider}: {method} {path}: {type(exc).__name__}",
                provider=self.provider,
            ) from exc
        except errors.ProviderError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            elapsed = time.perf_counter() - started
            logger.info(
                "%s %s %s -> %s (%.0f ms)", self.provider, method, path, status, elapsed * 1000
            )
            PROVIDER_CALLS.labels(self.provider, operation, outcome).inc()
            PROVIDER_CALL_SECONDS.labels(self.provider, operation).observe(elapsed)

    async def aclose(self) -> None:
        await self._http.aclose()


# -- retries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure (429, 5xx, timeout, connection).

    Four attempts over about 0.5 + 1 + 2 s (plus jitter) ride out a gateway blip without
    holding a reconcile tick for long; a ``Retry-After`` longer than ``max_retry_after_s``
    is not waited for here (the next tick tries again). ``sleep`` is injectable for tests.
    """

    attempts: int = 4
    initial_s: float = 0.5
    max_wait_s: float = 10.0
    jitter_s: float = 0.5
    max_retry_after_s: float = 30.0
    sleep: Sleep = asyncio.sleep


TRANSIENT = (errors.RateLimited, errors.ProviderUnavailable)


def _wait(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    backoff = tenacity.wait_exponential(
        multiplier=policy.initial_s, max=policy.max_wait_s
    ) + tenacity.wait_random(0, policy.jitter_s)

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, errors.RateLimited) and exc.retry_after is not None:
            return min(exc.retry_after, policy.max_retry_after_s)
        return float(backoff(state))

    return wait


def _retryable(policy: RetryPolicy) -> Callable[[BaseException], bool]:
    def check(exc: BaseException) -> bool:
        if isinstance(exc, errors.RateLimited) and exc.retry_after is not None:
            return exc.retry_after <= policy.max_retry_after_s
        return isinstance(exc, TRANSIENT)

    return check


async def retrying(policy: RetryPolicy, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, retried on transient provider errors; the last error is re-raised."""
    async for attempt in tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=_wait(policy),
        retry=tenacity.retry_if_exception(_retryable(policy)),
        sleep=policy.sleep,
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity re-raises the last error")
