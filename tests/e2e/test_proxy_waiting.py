"""The proxy's slots, waiting queue, retries, disconnects and scale-from-zero, end to end.

gpufleet's proxy router runs under uvicorn on a loopback port (streaming and
disconnects need a real socket) in front of small Ollama-speaking upstreams, also
under uvicorn, registered as ``ready`` workers in a real Redis. The harness here
(``FakeOllama``, ``Fleet``, the ``fleet`` fixture) is imported by the other proxy e2e
files. No test sleeps to wait for something: upstreams block on events the test
releases, and "eventually" checks poll a condition a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Request
from starlette.types import Receive, Scope, Send

from gpufleet.api.errors import install_error_handlers
from gpufleet.domain import WorkerState
from gpufleet.errors import Unauthenticated
from gpufleet.proxy import ProxyService, ProxySettings, build_proxy_router
from gpufleet.proxy.waiting import waiting_key, wake_channel
from gpufleet.settings import load_settings
from gpufleet.store.workers import WorkerRegistry
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)

# -- an Ollama-speaking upstream -------------------------------------------------------------


@dataclass
class FakeOllama:
    """Answers /api/chat, /api/generate, /api/embed(dings), /api/show and /v1/* like Ollama.

    Knobs: ``tokens`` per answer; ``hold`` (when set to an Event, streaming answers
    wait for it after the first token); ``fail_status`` (answer every inference with
    this status before any byte); ``die_after`` (drop the connection after that many
    stream lines). Records: concurrent/max in-flight inference calls, bodies seen,
    disconnects noticed.
    """

    name: str = "w"
    tokens: int = 3
    hold: asyncio.Event | None = None
    fail_status: int | None = None
    die_after: int | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    calls: int = 0
    disconnects: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw) if raw else {}
        path = scope["path"]
        if path == "/api/show":
            await _json(
                send,
                200,
                {"modelfile": f"FROM {body.get('model')}", "details": {}, "model_info": {}},
            )
            return
        self.calls += 1
        self.bodies.append(body)
        if self.fail_status is not None:
            await _json(send, self.fail_status, {"error": f"{self.name} is broken"})
            return
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.started.set()
        try:
            await self._answer(path, body, receive, send)
        finally:
            self.in_flight -= 1

    async def _answer(self, path: str, body: dict[str, Any], receive: Receive, send: Send) -> None:
        model = body.get("model", "")
        if path in ("/api/embed", "/v1/embeddings", "/api/embeddings"):
            vector = [0.1, 0.2, 0.3]
            if path == "/api/embed":
                payload: dict[str, Any] = {
                    "model": model,
                    "embeddings": [vector],
                    "prompt_eval_count": 2,
                }
            elif path == "/api/embeddings":
                payload = {"embedding": vector}
            else:
                payload = {
                    "object": "list",
                    "model": model,
                    "data": [{"object": "embedding", "embedding": vector, "index": 0}],
                    "usage": {"prompt_tokens": 2, "total_tokens": 2},
                }
            await _json(send, 200, payload)
            return
        stream = body.get("stream", not path.startswith("/v1/"))
        words = [f"{self.name}-tok{i} " for i in range(self.tokens)]
        if not stream:
            await self._hold(receive)
            await _json(send, 200, _final(path, model, "".join(words)))
            return
        sse = path.startswith("/v1/")
        ctype = b"text/event-stream" if sse else b"application/x-ndjson"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]}
        )
        for i, word in enumerate(words):
            if self.die_after is not None and i >= self.die_after:
                raise RuntimeError("upstream dies mid-stream")
            await send(
                {"type": "http.response.body", "body": _line(path, model, word), "more_body": True}
            )
            if i == 0:
                await self._hold(receive)
        end = _line(path, model, None) + (b"data: [DONE]\n\n" if sse else b"")
        await send({"type": "http.response.body", "body": end, "more_body": False})

    async def _hold(self, receive: Receive) -> None:
        if self.hold is None:
            return
        waiter = asyncio.ensure_future(self.hold.wait())
        gone = asyncio.ensure_future(receive())
        done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        gone.cancel()
        if gone in done:
            self.disconnects += 1
            raise asyncio.CancelledError


def _final(path: str, model: str, text: str) -> dict[str, Any]:
    stats = {"prompt_eval_count": 5, "eval_count": 3}
    if path == "/api/chat":
        return {
            "model": model,
            "created_at": "2024-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": "stop",
            **stats,
        }
    if path == "/api/generate":
        return {
            "model": model,
            "created_at": "2024-01-01T00:00:00Z",
            "response": text,
            "done": True,
            "done_reason": "stop",
            **stats,
        }
    if path == "/v1/completions":
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def _line(path: str, model: str, word: str | None) -> bytes:
    if path.startswith("/v1/"):
        delta = {"role": "assistant", "content": word} if word is not None else {}
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": None if word is not None else "stop"}
            ],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"
    if word is None:
        final = _final(path, model, "")
        return json.dumps(final).encode() + b"\n"
    key = "message" if path == "/api/chat" else "response"
    value: Any = {"role": "assistant", "content": word} if key == "message" else word
    return (
        json.dumps(
            {"model": model, "created_at": "2024-01-01T00:00:00Z", key: value, "done": False}
        ).encode()
        + b"\n"
    )


async def _json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- running ASGI apps on loopback -------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in this event loop; yield its URL."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def eventually(check: Callable[[], Awaitable[bool]], tries: int = 300) -> bool:
    """True once ``check()`` is true; polls every 10 ms at most ``tries`` times."""
    for _ in range(tries):
        if await check():
            return True
        await asyncio.sleep(0.01)
    return False


KEYS = {"sk-alice": "alice", "sk-bob": "bob"}


@dataclass(frozen=True)
class Caller:
    owner: str | None


async def bearer_auth(request: Request) -> Caller:
    """A stand-in for gpufleet.api.auth.authenticate: Bearer key -> owner."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or key not in KEYS:
        raise Unauthenticated("missing or unknown API key")
    return Caller(KEYS[key])


@dataclass
class Fleet:
    url: str
    registry: WorkerRegistry
    redis: aioredis.Redis
    service: ProxyService
    stack: contextlib.AsyncExitStack
    upstreams: dict[str, FakeOllama] = field(default_factory=dict)

    async def add_worker(
        self,
        worker_id: str,
        *,
        pool: str = "llm",
        slots: int = 2,
        loaded: tuple[str, ...] = (),
        present: tuple[str, ...] = (),
        state: WorkerState = WorkerState.ready,
        upstream: FakeOllama | None = None,
    ) -> FakeOllama:
        upstream = upstream or FakeOllama(name=worker_id)
        url = await self.stack.enter_async_context(serve(upstream))
        await self.registry.register(
            pool=pool,
            provider="simulated",
            slots=slots,
            state=state,
            worker_id=worker_id,
            base_url=url,
            engine="ollama",
            models_loaded=loaded,
            models_present=present,
        )
        self.upstreams[worker_id] = upstream
        return upstream

    def client(self, key: str = "sk-alice", **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {key}"}, **kw
        )


POOLS = [
    {
        "name": "llm",
        "provider": "simulated",
        "engine": "ollama",
        "slots": 2,
        "max_workers": 2,
        "models": ["llama3.2", "qwen2.5:7b"],
        "idle_timeout_s": 600,
    },
    {
        "name": "big",
        "provider": "simulated",
        "engine": "ollama",
        "slots": 1,
        "max_workers": 1,
        "models": ["llama3.3:70b"],
        "idle_timeout_s": 300,
    },
]


@pytest.fixture
def proxy_settings() -> ProxySettings:
    return ProxySettings()


@pytest.fixture
async def fleet(
    redis_url: str, redis: aioredis.Redis, proxy_settings: ProxySettings
) -> AsyncIterator[Fleet]:
    settings = load_settings(env_file=None, redis={"url": redis_url}, pools=POOLS)
    registry = WorkerRegistry(redis, prefix="gpufleet")
    service = ProxyService(settings, registry, redis, proxy_settings=proxy_settings)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_proxy_router(bearer_auth))
    app.state.proxy = service  # these requests carry no API key: no Services needed
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(service.aclose)
        url = await stack.enter_async_context(serve(app))
        yield Fleet(url, registry, redis, service, stack)


async def chat(client: httpx.AsyncClient, model: str = "llama3.2", **body: Any) -> httpx.Response:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return await client.post("/api/chat", json={**payload, **body})


# -- slots -----------------------------------------------------------------------------------


async def test_three_times_slots_concurrent_clients_all_served_within_the_cap(
    fleet: Fleet,
) -> None:
    hold = asyncio.Event()
    upstream = await fleet.add_worker(
        "w1", slots=2, loaded=("llama3.2",), upstream=FakeOllama(name="w1", hold=hold)
    )
    async with fleet.client() as client:
        requests = [asyncio.create_task(chat(client)) for _ in range(6)]
        assert await eventually(lambda: _eq(upstream.in_flight, 2))
        assert await eventually(lambda: _zcard(fleet, "llm", 4))
        hold.set()
        responses = await asyncio.gather(*requests)
    assert [r.status_code for r in responses] == [200] * 6
    assert upstream.calls == 6
    assert upstream.max_in_flight == 2
    # The last slot is handed back in the batched release right after the worker's answer
    # ended, which can land a moment after the client has read its body.
    assert await eventually(lambda: _busy(fleet, "w1", 0), tries=50)
    assert await fleet.redis.zcard(waiting_key("gpufleet", "llm")) == 0
    waited = [r for r in responses if "x-gpufleet-queue-wait" in r.headers]
    assert len(waited) == 4
    assert not any("x-gpufleet-cold-start" in r.headers for r in responses)


async def test_queued_tasks_and_proxy_share_the_same_slots(fleet: Fleet) -> None:
    upstream = await fleet.add_worker("w1", slots=1, loaded=("llama3.2",))
    token = await fleet.registry.acquire_slot("w1")  # the dispatcher holds the only slot
    assert token is not None
    async with fleet.client() as client:
        request = asyncio.create_task(chat(client))
        assert await eventually(lambda: _zcard(fleet, "llm", 1))
        assert upstream.calls == 0
        await fleet.registry.release_slot("w1", token)
        response = await request
    assert response.status_code == 200
    assert upstream.calls == 1


@pytest.mark.parametrize("proxy_settings", [ProxySettings(max_wait_s=0.2)])
async def test_past_max_wait_503_with_retry_after(fleet: Fleet) -> None:
    await fleet.add_worker("w1", slots=1, loaded=("llama3.2",))
    token = await fleet.registry.acquire_slot("w1")
    assert token is not None
    async with fleet.client() as client:
        response = await chat(client)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert "error" in response.json()
    assert isinstance(response.json()["error"], str)
    assert await fleet.redis.zcard(waiting_key("gpufleet", "llm")) == 0


@pytest.mark.parametrize("proxy_settings", [ProxySettings(max_waiting=2, max_waiting_per_key=5)])
async def test_past_the_queue_bound_503_at_once(fleet: Fleet) -> None:
    await fleet.add_worker("w1", slots=1, loaded=("llama3.2",))
    token = await fleet.registry.acquire_slot("w1")
    assert token is not None
    async with fleet.client() as client:
        waiting = [asyncio.create_task(chat(client)) for _ in range(2)]
        assert await eventually(lambda: _zcard(fleet, "llm", 2))
        refused = await chat(client)
        assert refused.status_code == 503
        assert "maximum pending requests exceeded" in refused.json()["error"]
        assert "retry-after" in refused.headers
        await fleet.registry.release_slot("w1", token)
        assert [r.status_code for r in await asyncio.gather(*waiting)] == [200, 200]


@pytest.mark.parametrize("proxy_settings", [ProxySettings(max_waiting=10, max_waiting_per_key=1)])
async def test_one_key_cannot_fill_the_queue(fleet: Fleet) -> None:
    await fleet.add_worker("w1", slots=1, loaded=("llama3.2",))
    token = await fleet.registry.acquire_slot("w1")
    assert token is not None
    async with fleet.client("sk-alice") as alice, fleet.client("sk-bob") as bob:
        first = asyncio.create_task(chat(alice))
        assert await eventually(lambda: _zcard(fleet, "llm", 1))
        assert (await chat(alice)).status_code == 429
        second = asyncio.create_task(chat(bob))
        assert await eventually(lambda: _zcard(fleet, "llm", 2))
        await fleet.registry.release_slot("w1", token)
        assert [r.status_code for r in await asyncio.gather(first, second)] == [200, 200]


# -- scale from zero -------------------------------------------------------------------------


async def test_scale_from_zero_holds_the_request_until_a_worker_is_ready(fleet: Fleet) -> None:
    pubsub = fleet.redis.pubsub()
    await pubsub.subscribe(wake_channel("gpufleet"))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    async with fleet.client() as client:
        request = asyncio.create_task(chat(client, model="llama3.3:70b"))
        assert await eventually(lambda: _zcard(fleet, "big", 1))
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None
        assert message["data"] == "big"
        deadline = (
            await fleet.redis.zrange(waiting_key("gpufleet", "big"), 0, -1, withscores=True)
        )[0][1]
        assert deadline > time.time()
        # the reconciler's part, by hand: a worker boots, then becomes ready
        await fleet.add_worker("big-1", pool="big", slots=1, state=WorkerState.booting)
        assert not request.done()
        assert await fleet.registry.transition("big-1", WorkerState.ready)
        response = await request
    await pubsub.aclose()
    assert response.status_code == 200
    assert response.json()["message"]["content"].startswith("big-1-tok0")
    assert float(response.headers["x-gpufleet-cold-start"]) >= 0
    assert response.headers["x-gpufleet-worker"] == "big-1"
    assert fleet.upstreams["big-1"].calls == 1
    assert await fleet.redis.zcard(waiting_key("gpufleet", "big")) == 0


async def test_unknown_model_is_404_but_a_parked_one_is_listed(fleet: Fleet) -> None:
    async with fleet.client() as client:
        missing = await chat(client, model="nope:1b")
        tags = (await client.get("/api/tags")).json()
    assert missing.status_code == 404
    assert "not found" in missing.json()["error"]
    assert "llama3.3:70b" in {m["name"] for m in tags["models"]}


# -- failures and disconnects ----------------------------------------------------------------


async def test_retry_on_another_worker_when_the_first_fails_before_a_byte(fleet: Fleet) -> None:
    broken = await fleet.add_worker(
        "a-broken",
        slots=2,
        loaded=("llama3.2",),
        upstream=FakeOllama(name="a-broken", fail_status=503),
    )
    good = await fleet.add_worker("b-good", slots=1, present=("llama3.2",))
    async with fleet.client() as client:
        response = await chat(client, stream=True)
    assert response.status_code == 200
    assert broken.calls == 1
    assert good.calls == 1
    assert response.headers["x-gpufleet-worker"] == "b-good"
    assert await fleet.registry.busy("a-broken") == 0


async def test_mid_stream_failure_ends_with_an_error_line(fleet: Fleet) -> None:
    await fleet.add_worker(
        "w1", loaded=("llama3.2",), upstream=FakeOllama(name="w1", tokens=5, die_after=2)
    )
    async with fleet.client() as client:
        response = await chat(client, stream=True)
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert response.status_code == 200
    assert [line["message"]["content"] for line in lines[:2]] == ["w1-tok0 ", "w1-tok1 "]
    assert "error" in lines[-1]
    assert await fleet.registry.busy("w1") == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_upstream_and_frees_the_slot(
    fleet: Fleet, stream: bool
) -> None:
    upstream = await fleet.add_worker(
        "w1", slots=1, loaded=("llama3.2",), upstream=FakeOllama(name="w1", hold=asyncio.Event())
    )
    async with fleet.client() as client:
        request = asyncio.create_task(chat(client, stream=stream))
        assert await eventually(lambda: _eq(upstream.in_flight, 1))
        assert await fleet.registry.busy("w1") == 1
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
    assert await eventually(lambda: _eq(upstream.disconnects, 1))
    assert await eventually(lambda: _busy(fleet, "w1", 0))


async def test_a_waiting_client_that_leaves_is_no_longer_demand(fleet: Fleet) -> None:
    async with fleet.client() as client:
        request = asyncio.create_task(chat(client, model="llama3.3:70b"))
        assert await eventually(lambda: _zcard(fleet, "big", 1))
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
    assert await eventually(lambda: _zcard(fleet, "big", 0))


# -- routing, keep_alive, auth, usage ------------------------------------------------------


async def test_routing_prefers_the_worker_with_the_model_loaded(fleet: Fleet) -> None:
    cold = await fleet.add_worker("a-cold", slots=4)
    warm = await fleet.add_worker("b-warm", slots=1, loaded=("llama3.2:latest",))
    async with fleet.client() as client:
        first = await chat(client)
        # the answer's slot is parked for this replica for [proxy] slot_park_s, then given back
        assert await eventually(lambda: _busy(fleet, "b-warm", 0))
        token = await fleet.registry.acquire_slot("b-warm")  # warm one now full
        second = await chat(client)
    assert token is not None
    assert first.headers["x-gpufleet-worker"] == "b-warm"
    assert second.headers["x-gpufleet-worker"] == "a-cold"
    assert (warm.calls, cold.calls) == (1, 1)


async def test_keep_alive_is_clamped_to_the_pool_idle_timeout(fleet: Fleet) -> None:
    upstream = await fleet.add_worker("w1", loaded=("llama3.2",))
    async with fleet.client() as client:
        await chat(client, keep_alive=0)
        await chat(client, keep_alive="-1")
        await chat(client, keep_alive="2h")
        await chat(client)
    assert [b["keep_alive"] for b in upstream.bodies] == [660, 86400, 7200, 660]


async def test_auth_and_usage_per_key_and_model(fleet: Fleet) -> None:
    await fleet.add_worker("w1", loaded=("llama3.2",))
    async with fleet.client("sk-bad") as bad:
        refused = await chat(bad)
    async with fleet.client("sk-bob") as bob:
        await chat(bob)
        await chat(bob, stream=True)
    usage: dict[str, float] = {}

    async def counted() -> bool:  # counted just after the last byte went out
        await fleet.service.usage.flush()
        usage.update(await fleet.service.usage.read("bob"))
        return usage.get("llama3.2:latest|requests") == 2

    assert await eventually(counted)
    assert refused.status_code == 401
    assert refused.json() == {"error": "missing or unknown API key"}
    assert usage["llama3.2:latest|requests"] == 2
    assert usage["llama3.2:latest|tokens_in"] == 10
    assert usage["llama3.2:latest|tokens_out"] == 6


async def _eq(value: int, expected: int) -> bool:
    return value == expected


async def _zcard(fleet: Fleet, pool: str, expected: int) -> bool:
    return int(await fleet.redis.zcard(waiting_key("gpufleet", pool))) == expected


async def _busy(fleet: Fleet, worker_id: str, expected: int) -> bool:
    return await fleet.registry.busy(worker_id) == expected
