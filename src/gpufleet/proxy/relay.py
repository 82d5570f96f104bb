"""Relaying one proxied request to a worker, shared by the Ollama and OpenAI front doors.

``ProxyService`` is the proxy's per-app state (built by the lifespan, kept in
``app.state.proxy``): the upstream clients (``upstream.UpstreamClient`` for
the inference POSTs, an ``httpx.AsyncClient`` for the rest), the ``SlotBroker`` and
the usage meter. ``ProxyService.forward`` is a raw ASGI
handler so bytes pass through untouched:

- the slot is taken before the upstream call and released once the worker's answer
  ended, before the client's response is closed;
- the response starts only with the first upstream chunk, so a worker that fails
  before sending a byte (connect error, 5xx, timeout) is retried on another one;
- each upstream chunk is sent as it arrives (no re-framing, no buffering); after
  bytes went out, a failure ends the stream with one error line in the caller's
  framing (NDJSON ``{"error": …}`` or SSE ``data: {"error": {…}}``);
- no read deadline before the first byte except ``load_timeout_s`` (a model may be
  loading), then ``idle_gap_timeout_s`` between chunks;
- a task watches ``receive()`` once the answer has run ``WATCH_AFTER_S`` (0.1 s):
  when the client disconnects, the handler is cancelled, which closes the upstream
  connection (Ollama stops generating) and releases the slot at once.

It must not: parse or rebuild the upstream body (only its last bytes are read for
token counts), or make Redis calls per request beyond the slot acquire/release (usage and
pool history are counted in memory and written by periodic flushes).

Consumers: ``gpufleet.proxy.endpoint.ForwardEndpoint`` (hands it a ``Call``), the Ollama
and OpenAI routers (``get_service``, ``error_payload``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import redis.asyncio as aioredis
from starlette.types import Message, Receive, Scope, Send

from gpufleet.domain import public_worker_id
from gpufleet.metrics import (
    DEFERRED,
    PROXY_DURATION,
    PROXY_REQUESTS,
    PROXY_TOKENS,
    PROXY_TTFB,
    observe_cold_start,
)
from gpufleet.proxy.coarse_timer import coarse_timer
from gpufleet.proxy.config import ProxySettings
from gpufleet.proxy.keep_alive import upstream_body
from gpufleet.proxy.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from gpufleet.proxy.waiting import Lease, ModelNotServed, QueueFull, SlotBroker, WaitTimeout
from gpufleet.routing import gpu_unfit_message, normalize_model, pick_worker
from gpufleet.settings import Settings
from gpufleet.store.history import HistoryStore
from gpufleet.store.keys import Keys
from gpufleet.store.usage import UsageStore, attributed_usd
from gpufleet.store.workers import WorkerRegistry

logger = logging.getLogger(__name__)

Flavor = Literal["ollama", "openai"]

_PASS_HEADERS = (b"content-type", b"content-length")
_TOKENS = {
    "in": re.compile(rb'"(?:prompt_eval_count|prompt_tokens)"\s*:\s*(\d+)'),
    "out": re.compile(rb'"(?:eval_count|completion_tokens)"\s*:\s*(\d+)'),
}


# How long an answer runs before a task starts watching for its client's disconnect.
WATCH_AFTER_S = 0.1


class _Retryable(Exception):
    """The worker failed before a byte reached the client: another worker may serve it."""


class _Disconnected(Exception):
    pass



def make_http_client(settings: ProxySettings) -> httpx.AsyncClient:
    """The upstream client the lifespan should build (and close) for the proxy.

    Read timeouts are enforced per chunk by the relay (load vs idle gap), so httpx
    gets none; connection pool without a cap, since the slots are the real bound.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=settings.connect_timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
        trust_env=False,
    )



class UsageMeter:
    """Per-key, per-model counters (requests, tokens in/out, seconds), flushed to the
    HASH ``{prefix}:proxy:usage:{key}`` (fields ``<model>|requests`` …) at most every
    ``flush_interval_s``, so the hot path adds no Redis round trip."""

    def __init__(self, redis: aioredis.Redis, prefix: str, flush_interval_s: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.flush_interval_s = flush_interval_s
        self._pending: dict[tuple[str, str, str], float] = {}
        self._flushed_at = 0.0

    def count(self, key: str, model: str, tokens_in: int, tokens_out: int, seconds: float) -> None:
        for name, value in (
            ("requests", 1),
            ("tokens_in", tokens_in),
            ("tokens_out", tokens_out),
            ("seconds", seconds),
        ):
            slot = (key, model, name)
            self._pending[slot] = self._pending.get(slot, 0) + value

    def flush_due(self) -> bool:
        """Counters are pending and the last flush is ``flush_interval_s`` old."""
        return bool(self._pending) and (
            asyncio.get_running_loop().time() - self._flushed_at >= self.flush_interval_s
        )

    async def maybe_flush(self) -> None:
        if self.flush_due():
            self._flushed_at = asyncio.get_running_loop().time()
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (key, model, name), value in pending.items():
                    field = f"{model}|{name}"
                    target = Keys(self.prefix).proxy_usage(key)
                    if name == "seconds":
                        pipe.hincrbyfloat(target, field, value)
                    else:
                        pipe.hincrby(target, field, int(value))
                await pipe.execute()
        except Exception as exc:
            logger.warning("proxy usage: flush of %d counters failed (%s)", len(pending), exc)

    async def read(self, key: str) -> dict[str, float]:
        raw = await self.redis.hgetall(Keys(self.prefix).proxy_usage(key))
        return {str(k): float(v) for k, v in raw.items()}


@dataclass
class Call:
    """One proxied request, as the front doors hand it to ``forward``."""

    flavor: Flavor
    path: str
    model: str
    payload: dict[str, Any]
    body: bytes
    owner: str
    priority: int = 0
    set_keep_alive: bool = False
    admin: bool = True  # a user-role key sees workers by their alias only
    team: str = ""  # the key's team ("" for none): usage is attributed to it
    key_id: str = ""
    label: str = ""  # the metrics' model label (``ProxyService._model_label``), once known


def error_payload(flavor: Flavor, message: str, status: int = 500) -> dict[str, Any]:
    """An error in the caller's API shape: Ollama's or OpenAI's."""
    if flavor == "ollama":
        return {"error": message}
    kind = (
        "not_found_error"
        if status == 404
        else ("invalid_request_error" if status < 500 else "api_error")
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def error_bytes(flavor: Flavor, message: str, status: int = 500) -> bytes:
    return json.dumps(error_payload(flavor, message, status)).encode()


async def send_error(
    send: Send, flavor: Flavor, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    body = error_bytes(flavor, message, status)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _stream_error_line(flavor: Flavor, content_type: bytes, message: str) -> bytes:
    if b"event-stream" in content_type:
        return b"data: " + error_bytes("openai", message) + b"\n\n"
    return error_bytes(flavor, message) + b"\n"


def _line_break(sent: bytes, *, sse: bool) -> bytes:
    """What must go out before an error line so that it starts a line (NDJSON) or an
    event (SSE) of its own, after the last bytes ``sent``."""
    if not sent:
        return b""
    if sse:
        return b"" if sent.endswith(b"\n\n") else b"\n" if sent.endswith(b"\n") else b"\n\n"
    return b"" if sent.endswith(b"\n") else b"\n"


def _tokens(tail: bytes) -> tuple[int, int]:
    found = [m.findall(tail) for m in (_TOKENS["in"], _TOKENS["out"])]
    return (int(found[0][-1]) if found[0] else 0, int(found[1][-1]) if found[1] else 0)


class ProxyService:
    """The proxy's state for one app: upstream client, slot broker, usage meter."""

    def __init__(
        self,
        settings: Settings,
        registry: WorkerRegistry,
        redis: aioredis.Redis,
        http: httpx.AsyncClient | None = None,
        *,
        proxy_settings: ProxySettings | None = None,
        clock: Callable[[], float] = time.time,
        history: HistoryStore | None = None,
    ) -> None:
        self.settings = settings
        self.config = proxy_settings or getattr(settings, "proxy", None) or ProxySettings()
        self.registry = registry
        self._own_http = http is None
        self.http = http or make_http_client(self.config)
        # Inference POSTs go through the lean client; ``http`` serves the rest (/api/show).
        self.upstream = UpstreamClient(connect_timeout_s=self.config.connect_timeout_s)
        self.clock = clock
        self.pools = {p.name: p for p in settings.pools}
        # Pool history (arrivals, service times): buffered in memory, written by its own loop.
        self.history = history
        self.broker = SlotBroker(
            registry, redis, settings.pools, self.config, clock=clock, history=history
        )
        self.usage = UsageMeter(redis, registry.prefix, self.config.usage_flush_interval_s)
        # Slot time and dollars per owner (``gpufleet.store.usage``), set by the lifespan.
        self.attribution: UsageStore | None = None
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count()
        self.max_body_bytes = settings.server.max_proxy_body_bytes
        self.body_timeout_s = settings.server.body_timeout_s
        self.served_models = {normalize_model(m) for p in settings.pools for m in p.models}

    def __repr__(self) -> str:
        return f"<ProxyService {self.broker!r}>"

    async def aclose(self) -> None:
        await self.broker.aclose()
        await self.usage.flush()
        await self.upstream.aclose()
        if self._own_http:
            await self.http.aclose()

    # -- the relay -----------------------------------------------------------------------

    async def forward(self, call: Call, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve ``call`` on a worker; watch for the client leaving meanwhile."""
        main = asyncio.current_task()
        assert main is not None
        state = {"finished": False, "gone": False}

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not state["finished"]:
                        state["gone"] = True
                        main.cancel()
                    return

        watcher: asyncio.Task[None] | None = None

        def start_watching() -> None:
            nonlocal watcher
            watcher = loop.create_task(watch(), name="proxy-disconnect-watch")

        # Most answers are over before anyone could notice a disconnect: the watcher task
        # (two loop turns, ~0.1 ms of CPU per request at 100 req/s) starts only for an
        # answer still running after WATCH_AFTER_S, which bounds how late a client's
        # leaving is seen (the slot is freed within WATCH_AFTER_S, plus the coarse timer's
        # tick, plus a loop turn).
        loop = asyncio.get_running_loop()
        timers = coarse_timer(loop)
        timer = timers.call_later(WATCH_AFTER_S, start_watching)
        try:
            await self._serve(call, send, state)
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            main.uncancel()
            logger.info("proxy %s %s: client went away; upstream cancelled", call.path, call.model)
        finally:
            timers.cancel(timer)
            if watcher is not None:
                watcher.cancel()

    def _model_label(self, model: str) -> str:
        """A bounded label value: a model some pool is configured to serve, else "other"."""
        return model if model in self.served_models else "other"

    async def _serve(self, call: Call, send: Send, state: dict[str, bool]) -> None:
        started = asyncio.get_running_loop().time()
        call.label = self._model_label(call.model)
        outcome = "error"
        try:
            outcome = await self._serve_attempts(call, send, state, started)
        except asyncio.CancelledError:
            outcome = "client_gone"
            raise
        except _Disconnected:
            outcome = "worker_failed_mid_stream"
            raise
        finally:
            label = (call.label,)
            DEFERRED.inc(PROXY_REQUESTS, (call.label, outcome))
            DEFERRED.observe(PROXY_DURATION, label, asyncio.get_running_loop().time() - started)

    async def _serve_attempts(
        self, call: Call, send: Send, state: dict[str, bool], started: float
    ) -> str:
        """Serve ``call``; return the outcome label for the metrics."""
        # Unique across replicas (a random prefix per service) without a getrandom() call
        # per request; kept across the attempts, so a retry waits as the same request.
        request_id = f"{self._id_prefix}{next(self._ids):016x}"
        exclude: set[str] = set()
        for attempt in range(self.config.retries + 1):
            if exclude and not await self._others_ready(call.model, exclude):
                # Nobody else could take it now: try the failed worker again rather than
                # wait up to max_wait_s for another one, so the client hears the worker's
                # error promptly once the retries are spent.
                exclude.clear()
            try:
                lease = await self.broker.acquire(
                    call.model,
                    key=call.owner,
                    priority=call.priority,
                    exclude=exclude,
                    request_id=request_id,
                )
            except ModelNotServed:
                unfit = gpu_unfit_message(call.model, getattr(self.settings, "models", {}),
                                          self.pools.values())
                if unfit is not None:  # listed, but no pool has the GPU it requires: 422
                    await send_error(send, call.flavor, 422, unfit)
                    return "model_gpu_unfit"
                await send_error(send, call.flavor, 404, _not_found(call))
                return "model_not_served"
            except QueueFull as exc:
                status = 429 if exc.per_key else 503
                headers = {"Retry-After": str(exc.retry_after_s)}
                await send_error(send, call.flavor, status, str(exc), headers)
                return "key_queue_full" if exc.per_key else "queue_full"
            except WaitTimeout as exc:
                headers = {"Retry-After": str(exc.retry_after_s)}
                await send_error(send, call.flavor, 503, str(exc), headers)
                return "wait_timeout"
            if lease.cold_start:
                observe_cold_start(lease.worker.pool, lease.waited_s)
            last = attempt == self.config.retries
            try:
                tail = await self._relay(call, lease, send, state, last=last, started=started)
            except _Retryable as exc:
                logger.warning(
                    "proxy %s %s: worker %s failed before the first byte (%s); %s",
                    call.path,
                    call.model,
                    lease.worker.id,
                    exc,
                    "giving up" if last else "trying another worker",
                )
                exclude.add(lease.worker.id)
                if last:
                    # The worker's address is in the error: for admins only.
                    detail = str(exc) if call.admin else "it could not be reached or broke off"
                    await send_error(send, call.flavor, 502, f"worker failed: {detail}")
                    return "worker_failed"
                continue
            finally:
                await self.broker.release(lease)
            await self._answered(call, lease, tail, started)
            return "ok" if state.get("clean", True) else "worker_failed_mid_stream"
        return "worker_failed"  # not reached: the last attempt returns above

    async def _answered(self, call: Call, lease: Lease, tail: bytes, started: float) -> None:
        """Count an answered request: tokens, per-key usage, and its owner's attribution."""
        tokens_in, tokens_out = _tokens(tail)
        elapsed = asyncio.get_running_loop().time() - started
        self.usage.count(call.owner, call.model, tokens_in, tokens_out, elapsed)
        label = call.label or self._model_label(call.model)
        if tokens_in:
            DEFERRED.inc(PROXY_TOKENS, (label, "in"), tokens_in)
        if tokens_out:
            DEFERRED.inc(PROXY_TOKENS, (label, "out"), tokens_out)
        if self.usage.flush_due():  # asked here: most answers have nothing to write
            await self.usage.maybe_flush()
        if self.attribution is not None:
            await self._attribute(call, lease, tokens_in, tokens_out)

    async def _attribute(self, call: Call, lease: Lease, tokens_in: int, tokens_out: int) -> None:
        """The request's slot time at its pool's price, for its owner (after the answer)."""
        pool = self.pools.get(lease.worker.pool)
        if pool is None or self.attribution is None:
            return
        held_s = max(0.0, self.clock() - lease.held_since) if lease.held_since else 0.0
        record: dict[str, Any] = {
            "owner_team": call.team,
            "key": call.key_id,
            "pool": pool.name,
            "model": call.model,
            "kind": "requests",
            "gpu_s": held_s,
            "usd": attributed_usd(pool.price_per_hour or 0.0, held_s, pool.slots),
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
        }
        if self.attribution.record_later(**record):  # no budget can see it: the usual case
            return
        try:
            await self.attribution.record(**record)
        except Exception as exc:  # the answer is out: only the usage record is lost
            logger.warning("proxy %s: usage not recorded (%s)", call.model, exc)

    async def _others_ready(self, model: str, exclude: set[str]) -> bool:
        """True if a ready worker not in ``exclude`` serves ``model`` (busy or not)."""
        workers = await self.broker.workers()
        return any(w.id not in exclude for w in pick_worker(model, workers, self.pools))

    def _upstream_body(self, call: Call, lease: Lease) -> bytes:
        if not call.set_keep_alive:
            return call.body
        pool = self.pools.get(lease.worker.pool)
        if pool is None:
            return call.body
        return upstream_body(call.body, call.payload, pool, self.config)

    async def _relay(
        self,
        call: Call,
        lease: Lease,
        send: Send,
        state: dict[str, bool],
        *,
        last: bool,
        started: float,
    ) -> bytes:
        """Stream one upstream answer to the client; return its last bytes (for usage).

        Raises ``_Retryable`` only while nothing has been sent to the client.
        """
        loop = asyncio.get_running_loop()
        url = lease.worker.base_url.rstrip("/") + call.path
        body = self._upstream_body(call, lease)
        sent = False
        content_type = b"application/json"
        prev = tail = b""
        first_by = loop.time() + self.config.load_timeout_s
        try:
            response = await self.upstream.post(
                url, body, extra_head=_token_head(lease), deadline=first_by
            )
        except (UpstreamError, TimeoutError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        try:
            if response.status_code >= 500 and not last:
                raise _Retryable(f"HTTP {response.status_code}")
            headers = [(k, v) for k, v in response.headers if k.lower() in _PASS_HEADERS]
            content_type = response.header(b"content-type") or b""
            headers += _our_headers(lease, admin=call.admin)
            gap = self.config.idle_gap_timeout_s
            final = b""
            while True:
                # Before the first byte the model may be loading (load timeout); after it,
                # silence longer than the idle gap means the worker is stuck.
                chunk = await response.read_chunk(first_by if not sent else loop.time() + gap)
                if chunk is None:
                    break
                if not chunk:
                    continue
                if not sent:
                    label = call.label or self._model_label(call.model)
                    DEFERRED.observe(PROXY_TTFB, (label,), loop.time() - started)
                    await send(_start(response.status_code, headers))
                    sent = lease.answered = True
                prev, tail = tail, chunk
                if response.ended:  # the body's last piece: it ends the answer (one send)
                    final = chunk
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not sent:
                await send(_start(response.status_code, headers))
                sent = lease.answered = True
            # The worker is done: its release goes out at the end of this loop turn, so a
            # client's next request on this replica finds the slot (its acquire goes out
            # after the release). Nobody waits for Redis's answer.
            self.broker.release_now(lease)
            state["finished"] = True
            await send({"type": "http.response.body", "body": final, "more_body": False})
            return prev + tail
        except (UpstreamError, TimeoutError) as exc:
            if not sent:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
            await self._end_with_error(
                call, lease, response, content_type, send, state, exc, prev + tail
            )
            return prev + tail
        finally:
            await response.aclose()

    async def _end_with_error(
        self,
        call: Call,
        lease: Lease,
        response: UpstreamResponse,
        content_type: bytes,
        send: Send,
        state: dict[str, bool],
        exc: BaseException,
        sent: bytes = b"",
    ) -> None:
        reason = "worker stopped sending" if isinstance(exc, TimeoutError) else "worker failed"
        logger.warning(
            "proxy %s %s: %s mid-stream on %s (%s)",
            call.path,
            call.model,
            reason,
            lease.worker.id,
            type(exc).__name__,
        )
        if response.header(b"content-length") is not None:
            raise _Disconnected(reason) from exc  # a sized body cannot carry an error line
        state["finished"] = True
        state["clean"] = False
        line = _stream_error_line(call.flavor, content_type, f"{reason}: {type(exc).__name__}")
        # The worker may have died mid-line: the error must not be glued to a fragment.
        line = _line_break(sent, sse=b"event-stream" in content_type) + line
        await send({"type": "http.response.body", "body": line, "more_body": True})
        await self.broker.release(lease)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _start(status: int, headers: list[tuple[bytes, bytes]]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": headers}


def _token_head(lease: Lease) -> bytes:
    """The worker's secret as a header line for its gate (``gpufleet.worker_auth``)."""
    token = lease.worker.token
    if not token or any(c in token for c in "\r\n"):
        return b""
    return b"x-gpufleet-worker-token: " + token.encode("latin-1") + b"\r\n"


def _our_headers(lease: Lease, *, admin: bool = True) -> list[tuple[bytes, bytes]]:
    worker = lease.worker.id if admin else public_worker_id(lease.worker.id)
    headers = [(b"x-gpufleet-worker", worker.encode())]
    if lease.waited_s > 0:
        headers.append((b"x-gpufleet-queue-wait", f"{lease.waited_s:.3f}".encode()))
        if lease.cold_start:
            headers.append((b"x-gpufleet-cold-start", f"{lease.waited_s:.3f}".encode()))
    return headers


def _not_found(call: Call) -> str:
    if call.flavor == "ollama":
        return f"model '{call.model}' not found: no gpufleet pool serves it"
    return f"The model `{call.model}` does not exist: no gpufleet pool serves it"


def model_of(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    return normalize_model(model) if isinstance(model, str) else ""


def get_service(app: Any) -> ProxyService:
    """The app's ``ProxyService`` (``app.state.proxy``, built by the lifespan)."""
    service: ProxyService = app.state.proxy
    return service


