"""Issue 10, fault test 6: bad input to the REST API and the proxy never makes a 5xx.

The whole app (``create_app``, real Redis, one simulated Ollama worker in a static pool)
runs under uvicorn on loopback in a thread; hypothesis (bounded examples, derandomized)
sends malformed JSON, raw bytes, wrong types, unicode, negative and huge numbers, NaN and
Infinity, deep nesting, missing fields and bodies over the size limits to
``POST /api/v1/tasks`` and to the proxy's raw routes (``/api/chat``, ``/api/generate``,
``/api/embed``, ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``), which
schemathesis does not see. Checked for every answer:

- never a 5xx from gpufleet (a 502/503/504 would be a worker or capacity answer; none is
  expected here since the worker is up);
- errors in the route's shape: gpufleet ``{"error": {"code", "message"}}``, Ollama
  ``{"error": "..."}``, OpenAI ``{"error": {"message", "type", ...}}``;
- a request gpufleet refused (4xx, no worker named in ``X-Gpufleet-Worker``) wrote nothing
  to Redis: the keys under the app's prefix are compared before and after, leaving out
  what background loops write (events, leader lock, health fields of worker records).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gpufleet.app import create_app
from gpufleet.engines.simulated import OllamaConfig, SimulatedOllama
from gpufleet.settings import load_settings
from gpufleet.store.connection import EmbeddedRedis
from tests.servers import serve_in_thread

pytestmark = pytest.mark.timeout(120)

PREFIX = "badin"
REST_LIMIT, PROXY_LIMIT = 16_384, 32_768
OLLAMA_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/show")
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Written by background loops on their own clock, and worker fields the health checker sets.
# (Pool history: samples of earlier forwarded requests land with the next flush, <= 1 s later.)
BACKGROUND_KEYS = (f"{PREFIX}:events", f"{PREFIX}:leader", f"{PREFIX}:scaling:",
                   f"{PREFIX}:history:")
BACKGROUND_FIELDS = ("health", "models", "version", "cost", "checked", "state_since")


@dataclass
class Live:
    http: httpx.Client
    redis: redis.Redis
    worker: SimulatedOllama


@pytest.fixture(scope="module")
def live(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    worker = SimulatedOllama(OllamaConfig(models=("llama3.2", "nomic-embed-text")))
    store = redis.Redis.from_url(redis_server.url, decode_responses=True)
    for key in store.scan_iter(f"{PREFIX}:*"):
        store.delete(key)
    with serve_in_thread(worker) as worker_url:
        app = create_app(load_settings(
            env_file=None,
            redis={"url": redis_server.url, "key_prefix": PREFIX},
            results={"dir": tmp_path_factory.mktemp("results")},
            server={"max_body_bytes": REST_LIMIT, "max_proxy_body_bytes": PROXY_LIMIT},
            workers={"health_interval_s": 0.2, "pull_models_on_ready": False},
            proxy={"max_wait_s": 1.0},
            # Each answered request's usage written as it ends, not by the flush loop up to
            # 5 s later (which could land while a bad request is being checked): a bad
            # request that recorded usage shows at once.
            usage={"flush_interval_s": 0},
            pools=[{"name": "llm", "provider": "static", "engine": "ollama", "slots": 8,
                    "models": ["llama3.2", "nomic-embed-text"], "urls": [worker_url]}],
        ))
        with serve_in_thread(app) as url:
            key = _admin_key(redis_server.url)
            with httpx.Client(base_url=url, timeout=30,
                              headers={"Authorization": f"Bearer {key}"}) as http:
                for _ in range(500):  # the worker is ready
                    if http.get("/api/v1/workers").json()[0]["state"] == "ready":
                        break
                    time.sleep(0.02)
                yield Live(http, store, worker)
    for key in store.scan_iter(f"{PREFIX}:*"):
        store.delete(key)
    store.close()


def _admin_key(url: str) -> str:
    import asyncio

    import redis.asyncio as aioredis

    from gpufleet.store.apikeys import ApiKeyStore

    async def make() -> str:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            store = await ApiKeyStore.open(client, None, prefix=PREFIX)
            return (await store.create("fuzz-admin", role="admin"))[1]
        finally:
            await client.aclose()

    return asyncio.run(make())


def snapshot(store: redis.Redis) -> dict[str, str]:
    out = {}
    for name in store.scan_iter(f"{PREFIX}:*"):
        if name.startswith(BACKGROUND_KEYS):
            continue
        kind = store.type(name)
        value: Any
        if kind == "hash":
            value = sorted((k, v) for k, v in store.hgetall(name).items()
                           if not any(b in k for b in BACKGROUND_FIELDS))
        elif kind == "string":
            value = store.get(name)
        elif kind == "zset":
            value = store.zrange(name, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(store.smembers(name))
        elif kind == "list":
            value = store.lrange(name, 0, -1)
        else:
            value = store.xlen(name) if kind == "stream" else kind
        out[name] = f"{kind}:{value}"
    return out


# Longer than ``[proxy] slot_park_s`` (0.05 s): a forwarded answer's slot stays parked
# (held) that long, then it is given back.
STILL_FOR_S = 0.1


def settled(store: redis.Redis) -> dict[str, str]:
    """A snapshot that no longer moves (work a forwarded request left behind has ended):
    the same for ``STILL_FOR_S``."""
    before, still_since = snapshot(store), time.monotonic()
    for _ in range(250):
        time.sleep(0.02)
        now = snapshot(store)
        if now != before:
            before, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= STILL_FOR_S:
            return now
    return before


# -- strategies -------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12,
)
weird_numbers = st.sampled_from([-1, 0, -(2**63), 2**64, 1e308, -1e-308, float("nan"),
                                 float("inf"), float("-inf"), "12", "-5", "1e400"])


def deep(n: int, opener: str = "[", closer: str = "]") -> bytes:
    return (opener * n + closer * n).encode()


def raw_bodies(limit: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=120),
        st.text(max_size=80).map(str.encode),
        st.sampled_from([b"", b"{", b"null", b"[]", b'"x"', b"{}", b'{"model": }', b"\xff\xfe",
                         b'{"model": "llama3.2"', b"NaN", b"\x00" * 10]),
        st.integers(50, 100_000).map(deep),
        st.integers(50, 5_000).map(lambda n: b'{"model": "llama3.2", "messages": '
                                   + deep(n) + b"}"),
        st.integers(50, 5_000).map(lambda n: b'{"payload": ' + deep(n, '{"a":', "}")
                                   .replace(b"}", b"") + b"1" + b"}" * (n + 1)),
        st.just(b'{"x": "' + b"a" * (limit + 1) + b'"}'),
    )


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


task_bodies = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["comfyui", "ollama", "OLLAMA", "x", ""]) | json_values,
    "payload": json_values | st.dictionaries(st.text(max_size=5), st.fixed_dictionaries(
        {"class_type": st.text(max_size=10) | json_values, "inputs": json_values}), max_size=3)
    | st.fixed_dictionaries({"api": st.sampled_from(["chat", "generate", "embed", "x"])
                             | json_values, "body": json_values}),
    "priority": weird_numbers | json_values,
    "timeout_s": weird_numbers | json_values,
    "max_attempts": weird_numbers | json_values,
    "pool": st.text(max_size=70) | json_values,
    "model": st.text(max_size=220) | json_values,
    "workflow_id": st.text(max_size=300) | json_values,
}).map(dumps)

proxy_bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["llama3.2", "nomic-embed-text", "nope", "", "LLAMA3.2:latest",
                              "llama3.2:" + "x" * 300]) | json_values,
    "messages": json_values | st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "x"]) | json_values,
         "content": st.text(max_size=40) | json_values}), max_size=3),
    "prompt": json_values,
    "input": json_values,
    "stream": json_values,
    "keep_alive": st.sampled_from(["nan", "NaN", "inf", "-inf", "5m", "1e400", "-1", "1h30m",
                                   "", "10x"]) | weird_numbers | json_values,
    "options": json_values,
    "max_tokens": weird_numbers | json_values,
}).map(dumps)


# -- checks -----------------------------------------------------------------------------------


def check(live: Live, path: str, body: bytes, *, rest: bool = False) -> httpx.Response:
    before = settled(live.redis)
    response = live.http.post(path, content=body, headers={"content-type": "application/json"})
    status = response.status_code
    assert status < 500 or status in (502, 503, 504) and not rest, (status, response.text)
    assert status not in (502, 504), (path, body[:200], response.text)  # the worker is up
    forwarded = "x-gpufleet-worker" in response.headers
    if status >= 400:
        error = response.json()["error"]
        if rest:
            assert isinstance(error["code"], str), error
            assert isinstance(error["message"], str), error
        elif path.startswith("/v1/"):
            assert isinstance(error["message"], str), error
            assert "type" in error, error
        else:
            assert isinstance(error, str), (path, response.text)
    if status >= 400 and not forwarded:
        assert settled(live.redis) == before, (path, body[:200], status, response.text)
    return response


def refused(response: httpx.Response) -> bool:
    """An answer whose error shape and untouched Redis ``check`` verified."""
    return response.status_code >= 400 and "x-gpufleet-worker" not in response.headers


def test_rest_tasks_bad_input(live: Live) -> None:
    refusals = 0

    @FUZZ
    @given(body=task_bodies | raw_bodies(REST_LIMIT))
    def fuzz(body: bytes) -> None:
        nonlocal refusals
        if refused(check(live, "/api/v1/tasks", body, rest=True)):
            refusals += 1
            event("refused")

    fuzz()
    assert refusals > 0, "no generated body was refused: the error checks never ran"


def test_proxy_bad_input(live: Live) -> None:
    refusals = 0

    @FUZZ
    @given(path=st.sampled_from(OLLAMA_PATHS + OPENAI_PATHS),
           body=proxy_bodies | raw_bodies(PROXY_LIMIT))
    def fuzz(path: str, body: bytes) -> None:
        nonlocal refusals
        if refused(check(live, path, body)):
            refusals += 1
            event(f"refused on {path}")

    fuzz()
    assert refusals > 0, "no generated request was refused: the error checks never ran"


@pytest.mark.parametrize("keep_alive", ["nan", "NaN", "inf", "-inf", "1e400"])
def test_unreadable_keep_alive_is_served_not_a_500(live: Live, keep_alive: str) -> None:
    """``keep_alive`` as a string float NaN/Infinity: gpufleet clamps it, never crashes."""
    body = {"model": "llama3.2", "stream": False, "keep_alive": keep_alive,
            "messages": [{"role": "user", "content": "hi"}]}
    response = check(live, "/api/chat", dumps(body))
    assert response.status_code == 200, response.text
    sent = live.worker.recorder.bodies[-1]["keep_alive"]
    assert isinstance(sent, int)
    assert sent > 0


@pytest.mark.parametrize("path", [*OLLAMA_PATHS, *OPENAI_PATHS])
def test_json_nested_too_deep_is_a_400(live: Live, path: str) -> None:
    """Python's JSON parser raises RecursionError (not ValueError) past ~1,000 levels."""
    response = check(live, path, b'{"model": "llama3.2", "messages": ' + deep(5000) + b"}")
    assert response.status_code == 400, response.text
