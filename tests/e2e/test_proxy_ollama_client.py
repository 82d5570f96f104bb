"""The real ``ollama`` Python client (sync and async) against gpufleet's proxy.

Only the base URL (and an API key header) changes: the client believes it talks to
Ollama. The sync client runs in a thread because the servers share this event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import ollama
import pytest
from prometheus_client import REGISTRY, generate_latest

from tests.e2e.test_proxy_waiting import (  # noqa: F401  (fixtures)
    FakeOllama,
    Fleet,
    eventually,
    fleet,
    proxy_settings,
)

pytestmark = pytest.mark.timeout(60)
AUTH = {"Authorization": "Bearer sk-alice"}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def warm(fleet: Fleet) -> Fleet:  # noqa: F811
    await fleet.add_worker("w1", slots=2, loaded=("llama3.2",), present=("nomic-embed-text",))
    return fleet


async def test_async_chat_stream_and_not(warm: Fleet) -> None:
    async with ollama.AsyncClient(host=warm.url, headers=AUTH) as client:
        whole = await client.chat(model="llama3.2", messages=MESSAGES)
        stream = await client.chat(model="llama3.2", messages=MESSAGES, stream=True)
        parts = [p async for p in stream]
    assert whole.message.content == "w1-tok0 w1-tok1 w1-tok2 "
    assert whole.eval_count == 3
    assert [p.message.content for p in parts] == ["w1-tok0 ", "w1-tok1 ", "w1-tok2 ", ""]
    assert parts[-1].done is True


async def test_async_generate_embed_list_ps_show(warm: Fleet) -> None:
    async with ollama.AsyncClient(host=warm.url, headers=AUTH) as client:
        generated = await client.generate(model="llama3.2", prompt="hi")
        stream = await client.generate("llama3.2", "hi", stream=True)
        streamed = [p.response async for p in stream]
        embedded = await client.embed(model="llama3.2", input="hello")
        listed = await client.list()
        running = await client.ps()
        shown = await client.show("llama3.2")
    assert generated.response == "w1-tok0 w1-tok1 w1-tok2 "
    assert "".join(streamed) == generated.response
    assert embedded.embeddings == [[0.1, 0.2, 0.3]]
    names = {m.model for m in listed.models}
    assert {"llama3.2:latest", "qwen2.5:7b", "llama3.3:70b", "nomic-embed-text:latest"} <= names
    assert [m.model for m in running.models] == ["llama3.2:latest"]
    assert shown.modelfile == "FROM llama3.2"


async def test_sync_client_chat_generate_embed_list_ps_show(warm: Fleet) -> None:
    def use_sync_client() -> dict[str, Any]:
        with ollama.Client(host=warm.url, headers=AUTH) as client:
            return {
                "chat": client.chat(model="llama3.2", messages=MESSAGES).message.content,
                "stream": [
                    p.message.content
                    for p in client.chat(model="llama3.2", messages=MESSAGES, stream=True)
                ],
                "generate": client.generate(model="llama3.2", prompt="x").response,
                "embed": client.embed(model="llama3.2", input=["a"]).embeddings,
                "list": {m.model for m in client.list().models},
                "ps": [m.model for m in client.ps().models],
                "show": client.show("llama3.2").modelfile,
            }

    got = await asyncio.to_thread(use_sync_client)
    assert got["chat"] == "w1-tok0 w1-tok1 w1-tok2 "
    assert "".join(got["stream"]) == got["chat"]
    assert got["generate"] == got["chat"]
    assert got["embed"] == [[0.1, 0.2, 0.3]]
    assert "llama3.3:70b" in got["list"]
    assert got["ps"] == ["llama3.2:latest"]
    assert got["show"] == "FROM llama3.2"


async def test_mid_stream_error_raises_response_error(fleet: Fleet) -> None:  # noqa: F811
    await fleet.add_worker(
        "w1", loaded=("llama3.2",), upstream=FakeOllama(name="w1", tokens=4, die_after=1)
    )
    seen = []
    async with ollama.AsyncClient(host=fleet.url, headers=AUTH) as client:
        stream = await client.chat(model="llama3.2", messages=MESSAGES, stream=True)
        with pytest.raises(ollama.ResponseError, match="worker failed"):
            await drain(stream, seen)
    assert seen == ["w1-tok0 "]


async def drain(stream: Any, seen: list[str]) -> None:
    async for part in stream:
        seen.append(part.message.content)


async def test_errors_are_ollama_shaped(fleet: Fleet) -> None:  # noqa: F811
    async with ollama.AsyncClient(host=fleet.url, headers=AUTH) as client:
        with pytest.raises(ollama.ResponseError) as missing:
            await client.chat(model="no-such-model", messages=MESSAGES)
        with pytest.raises(ollama.ResponseError) as pull:
            await client.pull("llama3.2")
    assert missing.value.status_code == 404
    assert "not found" in missing.value.error
    assert pull.value.status_code == 403
    assert "configured per pool" in pull.value.error


async def test_liveness_and_version_like_ollama(fleet: Fleet) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=fleet.url) as client:
        root = await client.get("/")
        head = await client.head("/")
        version = await client.get("/api/version")
    assert root.text == "Ollama is running"
    assert head.status_code == 200
    assert version.json()["version"].count(".") == 2


async def test_browsers_asking_for_html_are_sent_to_the_status_page(fleet: Fleet) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=fleet.url) as client:
        page = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 307
    assert page.headers["location"] == "/ui"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_proxy_metrics_count_outcomes_latency_and_tokens(warm: Fleet) -> None:
    model = "llama3.2:latest"  # labels carry the normalized name
    ok = ("gpufleet_proxy_requests_total", {"model": model, "outcome": "ok"})
    missing = ("gpufleet_proxy_requests_total", {"model": "other", "outcome": "model_not_served"})
    ttfb = ("gpufleet_proxy_time_to_first_byte_seconds_count", {"model": model})
    tokens_out = ("gpufleet_proxy_tokens_total", {"model": model, "direction": "out"})
    keys = (ok, missing, ttfb, tokens_out)
    before = {key[0] + str(key[1]): sample(key[0], **key[1]) for key in keys}
    async with ollama.AsyncClient(host=warm.url, headers=AUTH) as client:
        await client.chat(model="llama3.2", messages=MESSAGES)
        with pytest.raises(ollama.ResponseError):
            await client.chat(model="no-such-model", messages=MESSAGES)

    def delta(key: tuple[str, dict[str, str]]) -> float:
        return sample(key[0], **key[1]) - before[key[0] + str(key[1])]

    async def counted() -> bool:
        return delta(ok) == 1

    # The server counts the outcome after the client already has the whole (sized) body.
    assert await eventually(counted)
    assert delta(missing) == 1  # an unknown model never becomes a label of its own
    assert delta(ttfb) == 1
    assert delta(tokens_out) == 3
    text = generate_latest(REGISTRY).decode()
    assert 'gpufleet_proxy_requests_total{model="llama3.2:latest",outcome="ok"}' in text
    assert "no-such-model" not in text
