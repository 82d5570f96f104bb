"""Hardening of the whole app (``create_app`` on a real Redis): body limits, addresses.

- ``[server] max_body_bytes`` bounds the REST API (ComfyUI graphs), ``max_proxy_body_bytes``
  the Ollama/OpenAI proxy; each answers 413 on its own, and a rejected request writes
  nothing to Redis and reaches no worker.
- No caller can make gpufleet contact an address it chose: the proxy sends a request
  only to a registered worker, whatever the Host header, forwarding headers or body
  fields name; a task payload full of URLs is stored and queued, never fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.types import Receive, Scope, Send

from gpufleet.app import create_app
from gpufleet.domain import WorkerState
from gpufleet.settings import load_settings
from tests.servers import serve

REST_LIMIT = 4096
PROXY_LIMIT = 8192
BODY_TIMEOUT_S = 2.0
POOLS = [
    {
        "name": "llm",
        "provider": "simulated",
        "engine": "ollama",
        "slots": 2,
        "max_workers": 1,
        "models": ["llama3.2"],
    },
    # Queued ComfyUI tasks need a pool that runs them (else 422); none of its workers exist.
    {"name": "comfy", "provider": "simulated", "engine": "comfyui", "max_workers": 0},
]


@dataclass
class Recorder:
    """A tiny Ollama stand-in that records the requests it gets."""

    name: str
    record_gets: bool = False
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        # A worker's GETs are gpufleet's health probes (/api/version); a decoy records all.
        if scope["method"] == "POST" or self.record_gets:
            self.seen.append({"path": scope["path"], "headers": headers, "body": body})
        if scope["path"] == "/api/show":
            answer: dict[str, Any] = {"modelfile": "", "details": {}, "served_by": self.name}
        elif scope["path"].startswith("/v1/"):
            answer = {"id": "x", "object": "chat.completion", "choices": [], "served_by": self.name}
        else:
            answer = {"model": "llama3.2", "done": True, "served_by": self.name,
                      "message": {"role": "assistant", "content": "hi"}}
        data = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


@dataclass
class Live:
    client: httpx.AsyncClient
    app: Any
    worker: Recorder
    decoy: Recorder
    decoy_url: str
    url: str = ""
    key: str = ""


@pytest.fixture
async def live(redis_url: str, redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Live]:
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        results={"dir": tmp_path / "results"},
        server={"max_body_bytes": REST_LIMIT, "max_proxy_body_bytes": PROXY_LIMIT,
                "body_timeout_s": BODY_TIMEOUT_S},
        pools=POOLS,
    )
    app = create_app(settings)
    worker, decoy = Recorder("worker"), Recorder("decoy", record_gets=True)
    async with contextlib.AsyncExitStack() as stack:
        worker_url = await stack.enter_async_context(serve(worker, name="worker"))
        decoy_url = await stack.enter_async_context(serve(decoy, name="decoy"))
        url = await stack.enter_async_context(serve(app, name="gpufleet"))
        components = app.state.services
        _, key = await components.apikeys.create("user", role="user")
        await components.registry.register(
            pool="llm", provider="simulated", slots=2, state=WorkerState.ready,
            worker_id="llm-w1", base_url=worker_url, engine="ollama",
            models_loaded=("llama3.2",), models_present=("llama3.2",),
        )
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, timeout=30,
                              headers={"Authorization": f"Bearer {key}"})
        )
        yield Live(client, app, worker, decoy, decoy_url, url, key)


# Written by the background loops on their own clock (leader lock, spend accounting).
BACKGROUND_KEYS = ("gpufleet:scaling:", "gpufleet:leader", "gpufleet:events")
# Worker fields the health checker and the spend accounting update.
BACKGROUND_FIELDS = re.compile(r"cost|spend|accounted|billed|health|probe|checked|models|version")


async def snapshot(redis: aioredis.Redis) -> dict[str, str]:
    """Every key a request could write, with its value (to prove nothing was written)."""
    out = {}
    async for name in redis.scan_iter("*"):
        if name.startswith(BACKGROUND_KEYS):
            continue
        kind = await redis.type(name)
        value: Any
        if kind == "string":
            value = await redis.get(name)
        elif kind == "hash":
            fields = await redis.hgetall(name)
            value = sorted((k, v) for k, v in fields.items() if not BACKGROUND_FIELDS.search(k))
        elif kind == "zset":
            value = await redis.zrange(name, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(await redis.smembers(name))
        elif kind == "list":
            value = await redis.lrange(name, 0, -1)
        else:
            value = await redis.xlen(name) if kind == "stream" else None
        out[name] = f"{kind}:{value}"
    return out


def chat_body(size: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "x" * size}],
        "stream": False,
        **extra,
    }


# -- body limits -------------------------------------------------------------------------


async def test_rest_and_proxy_body_limits_are_separate(live: Live, redis: aioredis.Redis) -> None:
    """A body between the two limits is too large for the REST API, fine for the proxy."""
    between = (REST_LIMIT + PROXY_LIMIT) // 2
    graph = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a" * between}}}
    before = await snapshot(redis)
    rest = await live.client.post("/api/v1/tasks", json={"payload": graph})
    assert rest.status_code == 413, rest.text
    assert rest.json()["error"]["code"] == "payload_too_large"
    assert await snapshot(redis) == before

    proxied = await live.client.post("/api/chat", json=chat_body(between))
    assert proxied.status_code == 200, proxied.text
    assert proxied.json()["served_by"] == "worker"


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/api/chat", "ollama"),
        ("/api/generate", "ollama"),
        ("/api/embed", "ollama"),
        ("/api/show", "ollama"),
        ("/v1/chat/completions", "openai"),
        ("/v1/embeddings", "openai"),
    ],
)
async def test_proxy_body_over_its_limit_is_413_and_touches_nothing(
    live: Live, redis: aioredis.Redis, path: str, shape: str
) -> None:
    before = await snapshot(redis)
    answer = await live.client.post(path, json=chat_body(PROXY_LIMIT + 1))
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert "too large" in (error if shape == "ollama" else error["message"])

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(PROXY_LIMIT // 1000 + 2):
            yield b" " * 1000
        yield json.dumps(chat_body()).encode()

    streamed = await live.client.post(path, content=chunks(),
                                      headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert live.worker.seen == []
    assert await snapshot(redis) == before


async def test_rest_body_over_its_limit_is_413_streamed_too(
    live: Live, redis: aioredis.Redis
) -> None:
    before = await snapshot(redis)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(REST_LIMIT // 1000 + 2):
            yield b" " * 1000
        yield json.dumps({"payload": {"1": {"class_type": "X", "inputs": {}}}}).encode()

    answer = await live.client.post("/api/v1/tasks", content=chunks(),
                                    headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert await snapshot(redis) == before


# -- no caller-chosen addresses ----------------------------------------------------------


def lures(target: str) -> dict[str, Any]:
    """Every field a caller might hope gpufleet reads as an address."""
    host = target.removeprefix("http://")
    return {
        "host": target, "url": target, "base_url": target, "endpoint": target,
        "worker": target, "upstream": target, "server": target,
        "options": {"host": target, "base_url": target},
        "images": [target + "/cat.png"],
        "headers": {"Host": host},
    }


def lure_headers(target: str) -> dict[str, str]:
    host = target.removeprefix("http://")
    return {
        "Host": host,
        "X-Forwarded-Host": host,
        "X-Forwarded-For": "127.0.0.1",
        "Forwarded": f"host={host};proto=http",
        "X-Original-URL": target + "/api/chat",
        "X-Gpufleet-Worker": "decoy",
    }


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions",
                                  "/api/show"])
async def test_the_proxy_only_contacts_registered_workers(live: Live, path: str) -> None:
    body = chat_body(**lures(live.decoy_url))
    answer = await live.client.post(path, json=body, headers=lure_headers(live.decoy_url))
    assert answer.status_code == 200, answer.text
    assert answer.json()["served_by"] == "worker"
    assert live.decoy.seen == []
    (request,) = live.worker.seen
    assert request["path"] == path
    assert request["headers"]["host"] != live.decoy_url.removeprefix("http://")
    # Caller headers are not passed upstream: no forwarding headers, no caller key.
    sent = {k.lower() for k in request["headers"]}
    assert not sent & {"x-forwarded-host", "forwarded", "x-original-url", "authorization"}


async def test_task_payload_urls_are_queued_never_fetched(live: Live) -> None:
    graph = {
        "1": {"class_type": "LoadImageFromUrl", "inputs": {"url": live.decoy_url + "/a.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                     "filename_prefix": live.decoy_url}},
    }
    answer = await live.client.post(
        "/api/v1/tasks", json={"payload": graph}, headers=lure_headers(live.decoy_url)
    )
    assert answer.status_code == 202, answer.text
    task = (await live.client.get(f"/api/v1/tasks/{answer.json()['id']}")).json()
    assert task["payload"] == graph  # kept as given, for the worker to interpret
    ollama = {"kind": "ollama", "payload": {"api": "chat", "body": chat_body(
        **lures(live.decoy_url))}}
    assert (await live.client.post("/api/v1/tasks", json=ollama)).status_code == 202
    assert live.decoy.seen == []


# -- ComfyUI graph shape, before anything is queued ----------------------------------------


@pytest.mark.parametrize(
    ("graph", "named"),
    [
        ({"7": {"class_type": "SaveImage"}}, "payload.7.inputs"),
        ({"7": {"inputs": {}}}, "payload.7.class_type"),
        ({"7": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}},
         "payload.7.inputs.images: links to node '8'"),
        ({}, "no nodes"),
        ({"7": "SaveImage"}, "payload.7: a node must be an object"),
    ],
)
async def test_bad_graph_is_422_naming_the_node_and_writes_nothing(
    live: Live, redis: aioredis.Redis, graph: dict[str, Any], named: str
) -> None:
    before = await snapshot(redis)
    answer = await live.client.post("/api/v1/tasks", json={"payload": graph})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "validation_error"
    assert named in error["message"]
    assert await snapshot(redis) == before
    not_a_graph = await live.client.post("/api/v1/tasks", json={"payload": ["7"]})
    assert not_a_graph.status_code == 422


# -- max_concurrent across two replicas on one Redis ---------------------------------------


@dataclass
class Held:
    """An Ollama stand-in that holds every chat until released."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["method"] == "POST":
            self.arrived += 1
            await self.release.wait()
        data = json.dumps({"model": "llama3.2", "done": True, "version": "0.12.0"}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


async def test_max_concurrent_is_exact_across_two_replicas(
    redis_url: str, redis: aioredis.Redis, tmp_path: Path
) -> None:
    def replica() -> Any:
        return create_app(load_settings(env_file=None, redis={"url": redis_url},
                                        results={"dir": tmp_path / "r"}, pools=POOLS))

    held = Held()
    async with contextlib.AsyncExitStack() as stack:
        worker_url = await stack.enter_async_context(serve(held, name="held"))
        apps = [replica(), replica()]
        urls = [await stack.enter_async_context(serve(a, name=f"r{i}"))
                for i, a in enumerate(apps)]
        components = apps[0].state.services
        _, key = await components.apikeys.create("c", max_concurrent=2)
        await components.registry.register(
            pool="llm", provider="simulated", slots=8, state=WorkerState.ready,
            worker_id="llm-w1", base_url=worker_url, engine="ollama",
            models_loaded=("llama3.2",), models_present=("llama3.2",),
        )
        headers = {"Authorization": f"Bearer {key}"}
        clients = [await stack.enter_async_context(
            httpx.AsyncClient(base_url=u, timeout=30, headers=headers)) for u in urls]
        first = [asyncio.create_task(c.post("/api/chat", json=chat_body())) for c in clients]
        for _ in range(500):  # both replicas hold one request each at the worker
            if held.arrived == 2:
                break
            await asyncio.sleep(0.01)
        assert held.arrived == 2
        for client in clients:  # a third, on either replica, is over the limit
            over = await client.post("/api/chat", json=chat_body())
            assert over.status_code == 429, over.text
            assert over.headers["retry-after"] == "1"
        held.release.set()
        assert [(await t).status_code for t in first] == [200, 200]
        (stored,) = [k for k in await components.apikeys.list_keys() if k.name == "c"]
        places = f"gpufleet:concurrent:{stored.id}"
        for _ in range(500):  # given back just after the last byte went out
            if await redis.zcard(places) == 0:
                break
            await asyncio.sleep(0.01)
        assert await redis.zcard(places) == 0
        again = await clients[1].post("/api/chat", json=chat_body())
        assert again.status_code == 200


# -- the key before the body; a body-read timeout (issue 19 point 9) ---------------------


async def raw_post(url: str, path: str, *, declared: int, sent: bytes,
                   key: str | None = None) -> tuple[int, str]:
    """POST over a raw socket: headers declaring ``declared`` body bytes, then only ``sent``
    of them; return the status and body of whatever gpufleet answers (it must answer
    without the rest of the body)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: gpufleet\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: {declared}\r\n\r\n").encode()
    writer.write(head + sent)
    await writer.drain()
    try:
        status_line = await asyncio.wait_for(reader.readline(), timeout=30)
        headers: dict[str, str] = {}
        while (line := await asyncio.wait_for(reader.readline(), timeout=30)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), timeout=30)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return int(status_line.split()[1]), body.decode()


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/api/show",
                                  "/api/v1/tasks"])
async def test_anonymous_large_upload_is_401_before_any_body_byte_is_read(
    live: Live, path: str
) -> None:
    """40 anonymous 15 MiB uploads one byte short used to sit in memory with no timeout."""
    status, body = await raw_post(live.url, path, declared=15 * 1024 * 1024, sent=b"{")
    assert status == 401, body
    status, body = await raw_post(live.url, path, declared=1000, sent=b"")
    assert status == 401, body
    assert live.worker.seen == []


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/api/show",
                                  "/api/v1/tasks"])
async def test_a_body_that_never_completes_is_408(
    live: Live, redis: aioredis.Redis, path: str
) -> None:
    before = await snapshot(redis)
    status, body = await raw_post(live.url, path, declared=3000, sent=b'{"model": "ll',
                                  key=live.key)
    assert status == 408, body
    assert "not complete within 2 s" in body
    # Declared over the limit: 413 at once, with a key too, before reading.
    status, body = await raw_post(live.url, path, declared=15 * 1024 * 1024, sent=b"{",
                                  key=live.key)
    assert status == 413, body
    assert live.worker.seen == []
    assert await snapshot(redis) == before


# -- the key's max_priority holds for the proxy too (issue 19 point 10) -------------------


async def test_proxy_refuses_a_priority_above_the_keys_limit_like_rest(live: Live) -> None:
    store = live.app.state.services.apikeys
    _, key = await store.create("capped", role="user", max_priority=3)
    auth = {"Authorization": f"Bearer {key}"}
    for path, shape in (("/api/chat", "ollama"), ("/v1/chat/completions", "openai")):
        refused = await live.client.post(
            path, json=chat_body(), headers={**auth, "X-Gpufleet-Priority": "10"}
        )
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert "above this key's limit 3" in (error if shape == "ollama" else error["message"])
        for headers in ({"X-Gpufleet-Priority": "3"}, {"X-Gpufleet-Priority": "-5"}, {}):
            ok = await live.client.post(path, json=chat_body(), headers={**auth, **headers})
            assert ok.status_code == 200, (path, headers, ok.text)
    rest = await live.client.post("/api/v1/tasks", headers=auth, json={
        "kind": "ollama", "priority": 9,
        "payload": {"api": "chat", "body": chat_body()}})
    assert rest.status_code == 403
    assert len(live.worker.seen) == 6  # only the allowed calls reached the worker


# -- absurd keep_alive values are clamped, not a 500 (issue 19 point 11) -----------------


@pytest.mark.parametrize(
    "value", ["1" + "0" * 400, "-" + "9" * 400, "1e400", '"' + "9" * 400 + 'h"']
)
async def test_a_huge_keep_alive_is_clamped_not_a_500(live: Live, value: str) -> None:
    raw = b'{"model": "llama3.2", "stream": false, "keep_alive": %s}' % value.encode()
    answer = await live.client.post("/api/chat", content=raw,
                                    headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    (seen,) = live.worker.seen
    sent = json.loads(seen["body"])["keep_alive"]
    assert sent == int(live.app.state.services.settings.proxy.keep_alive_max_s)


async def test_proxy_answers_name_workers_by_alias_for_user_keys(live: Live) -> None:
    """Issue 19 point 6: X-Gpufleet-Worker gives user keys the alias /api/v1/workers shows."""
    answer = await live.client.post("/api/chat", json=chat_body())  # a user-role key
    assert answer.status_code == 200
    alias = answer.headers["x-gpufleet-worker"]
    assert alias != "llm-w1"
    assert alias.startswith("w-")
    listed = (await live.client.get("/api/v1/workers")).json()
    assert [w["id"] for w in listed] == [alias]
    store = live.app.state.services.apikeys
    _, admin = await store.create("ops", role="admin")
    seen = await live.client.post("/api/chat", json=chat_body(),
                                  headers={"Authorization": f"Bearer {admin}"})
    assert seen.headers["x-gpufleet-worker"] == "llm-w1"
