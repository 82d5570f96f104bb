"""The body gpufleet forwards: keep_alive set by policy, the client's bytes otherwise kept."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from gpufleet.proxy.keep_alive import clamp_keep_alive
from gpufleet.proxy.relay import Call, ProxyService
from gpufleet.settings import PoolSpec, ProxySettings

POOL = PoolSpec(name="llm", provider="simulated", engine="ollama", models=["llama3.2"],
                idle_timeout_s=600)
CONFIG = ProxySettings()


def upstream_body(body: bytes) -> bytes:
    service: Any = SimpleNamespace(pools={"llm": POOL}, config=CONFIG)
    call = Call(flavor="ollama", path="/api/chat", model="llama3.2:latest",
                payload=json.loads(body), body=body, owner="k", set_keep_alive=True)
    lease: Any = SimpleNamespace(worker=SimpleNamespace(pool="llm"))
    return ProxyService._upstream_body(service, call, lease)


def test_keep_alive_is_spliced_into_the_clients_bytes() -> None:
    body = b' { "model" : "llama3.2",  "messages": [{"content": "h\\u00e9 \xc3\xa9"}] }'
    sent = upstream_body(body)
    floor = clamp_keep_alive(None, POOL, CONFIG)
    assert sent == b' {"keep_alive":%d, "model" : "llama3.2",  "messages": [{"content": "h\\u00e9 \xc3\xa9"}] }' % floor  # noqa: E501
    assert json.loads(sent) == {**json.loads(body), "keep_alive": floor}


def test_an_acceptable_keep_alive_leaves_the_body_untouched() -> None:
    floor = clamp_keep_alive(None, POOL, CONFIG)
    body = b'{"model":"llama3.2","keep_alive":%d}' % floor
    assert upstream_body(body) is body


@pytest.mark.parametrize("value", ['"5m"', "1", "-1", "1e12"])
def test_other_keep_alives_are_clamped(value: str) -> None:
    body = b'{"model":"llama3.2","keep_alive":%s}' % value.encode()
    sent = json.loads(upstream_body(body))
    assert sent["keep_alive"] == clamp_keep_alive(json.loads(value), POOL, CONFIG)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_bodies_not_in_plain_utf8_are_re_encoded(encoding: str) -> None:
    body = '{"model":"llama3.2"}'.encode(encoding)
    sent = upstream_body(body)
    assert json.loads(sent) == {"model": "llama3.2", "keep_alive": clamp_keep_alive(None, POOL, CONFIG)}  # noqa: E501


@pytest.mark.parametrize("value", [10**400, -(10**400), float("inf"), float("-inf")])
def test_keep_alives_too_large_for_a_float_are_clamped_to_the_cap(value: Any) -> None:
    assert clamp_keep_alive(value, POOL, CONFIG) == int(CONFIG.keep_alive_max_s)
