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

from tests.e2e.test_proxy_waiting import (  # noqa: F401  (fixtures)
    FakeOllama,
    Fleet,
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
