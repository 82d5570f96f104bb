"""The real ``ollama`` and ``openai`` client libraries against ``SimulatedOllama``.

The simulated worker runs under uvicorn on a loopback port (streaming needs a real
socket; ``ASGITransport`` buffers). If these clients are happy with it, the
Ollama-compatible proxy can use it as its backend, and so can the demo.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from gpufleet.engines.ollama import OllamaEngine
from gpufleet.engines.simulated import OllamaConfig, SimulatedOllama
from gpufleet.errors import EngineRejected
from tests.servers import serve, serve_in_thread

pytestmark = pytest.mark.timeout(60)

USER = [{"role": "user", "content": "hi there"}]
REPLY = "one two three four"


@pytest.fixture
def sim() -> SimulatedOllama:
    return SimulatedOllama(OllamaConfig(reply=REPLY, version="0.12.3"))


@pytest.fixture
async def url(sim: SimulatedOllama) -> AsyncIterator[str]:
    async with serve(sim) as base_url:
        yield base_url


@pytest.fixture
async def client(url: str) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=url) as c:
        yield c


@pytest.fixture
async def oai(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:
        yield c


async def test_root_and_version(url: str) -> None:
    async with httpx.AsyncClient() as http:
        root = await http.get(url)
        head = await http.head(url)
        version = await http.get(f"{url}/api/version")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert head.status_code == 200
    assert version.json() == {"version": "0.12.3"}


async def test_ollama_chat_streams_token_by_token(client: ollama.AsyncClient) -> None:
    parts = [p async for p in await client.chat(model="llama3.2", messages=USER, stream=True)]
    assert [p.message.content for p in parts] == ["one ", "two ", "three ", "four", ""]
    assert [p.done for p in parts] == [False] * 4 + [True]
    assert parts[-1].eval_count == 4


async def test_ollama_generate_and_chat_without_streaming(client: ollama.AsyncClient) -> None:
    chat = await client.chat(model="llama3.2", messages=USER)
    generated = await client.generate(model="llama3.2", prompt="hi", options={"num_predict": 2})
    assert chat.message.content == REPLY
    assert chat.done_reason == "stop"
    assert generated.response == "one two"


async def test_ollama_models_show_ps_and_keep_alive(client: ollama.AsyncClient) -> None:
    listed = await client.list()
    assert [m.model for m in listed.models] == ["llama3.2:latest", "nomic-embed-text:latest"]
    assert (await client.ps()).models == []
    await client.chat(model="llama3.2", messages=USER, keep_alive=-1)
    await client.generate(model="nomic-embed-text", prompt="x", keep_alive=0)
    loaded = (await client.ps()).models
    assert [m.model for m in loaded] == ["llama3.2:latest"]
    assert loaded[0].expires_at is not None
    assert loaded[0].expires_at.year > 2100  # kept forever
    shown = await client.show("llama3.2")
    assert shown.capabilities == ["completion"]


async def test_ollama_embeddings(client: ollama.AsyncClient) -> None:
    embedded = await client.embed(model="nomic-embed-text", input=["a", "b"])
    legacy = await client.embeddings(model="nomic-embed-text", prompt="a")
    assert len(embedded.embeddings) == 2
    assert len(embedded.embeddings[0]) == 8
    assert list(legacy.embedding) == list(embedded.embeddings[0])


async def test_ollama_pull_streams_progress_and_adds_the_model(
    client: ollama.AsyncClient, sim: SimulatedOllama
) -> None:
    statuses = [p.status async for p in await client.pull("qwen3:0.6b", stream=True)]
    assert statuses[0] == "pulling manifest"
    assert statuses[-1] == "success"
    assert "qwen3:0.6b" in [m.model for m in (await client.list()).models]


async def test_ollama_errors(client: ollama.AsyncClient, sim: SimulatedOllama) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        await client.chat(model="nope", messages=USER)
    assert (missing.value.status_code, missing.value.error) == (404, "model 'nope' not found")
    sim.config.error_after_tokens = 2
    seen: list[str] = []

    async def consume() -> None:
        async for part in await client.chat(model="llama3.2", messages=USER, stream=True):
            seen.append(part.message.content)

    with pytest.raises(ollama.ResponseError, match="mid-stream"):
        await consume()
    assert seen == ["one ", "two "]


async def test_openai_chat_stream_with_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="llama3.2", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    text = [c.choices[0].delta.content for c in chunks if c.choices]
    assert text == ["one ", "two ", "three ", "four", ""]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_openai_non_streaming_completions_and_embeddings(oai: openai.AsyncOpenAI) -> None:
    chat = await oai.chat.completions.create(model="llama3.2", messages=USER)
    completion = await oai.completions.create(model="llama3.2", prompt="hi")
    embedding = await oai.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert chat.choices[0].message.content == REPLY
    assert chat.usage is not None
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 4
    assert completion.choices[0].text == REPLY
    assert [d.index for d in embedding.data] == [0, 1]


async def test_openai_models_and_errors(oai: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in oai.models.list()]
    assert models == ["llama3.2:latest", "nomic-embed-text:latest"]
    assert (await oai.models.retrieve("llama3.2:latest")).owned_by == "library"
    with pytest.raises(openai.NotFoundError) as caught:
        await oai.chat.completions.create(model="nope", messages=USER)
    assert caught.value.body == {"message": "model 'nope' not found",
                                 "type": "not_found_error", "param": None, "code": None}


def test_sync_ollama_client_against_a_server_thread() -> None:
    worker = SimulatedOllama(OllamaConfig(reply=REPLY))
    with serve_in_thread(worker) as base_url, ollama.Client(host=base_url) as sync_client:
        reply = sync_client.chat(model="llama3.2", messages=USER)
    assert reply.message.content == REPLY
    assert worker.recorder.total == 1


async def test_ollama_engine_pull_and_keep_alive(url: str, sim: SimulatedOllama) -> None:
    events: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any]) -> None:
        events.append(event)

    async with httpx.AsyncClient() as http:
        engine = OllamaEngine(http, request_timeout_s=5.0)
        await engine.pull(url, "qwen3:0.6b", on_event)
        result = await engine.run(
            url, {"api": "generate", "body": {"model": "qwen3:0.6b", "prompt": "hi",
                                              "stream": True}},
            task_id="t", keep_alive_s=600.5,
        )
        inventory = await engine.inventory(url)
        sim.config.pullable = ()
        with pytest.raises(EngineRejected, match="does not exist"):
            await engine.pull(url, "missing:1b")
    assert [e["status"] for e in events][0] == "pulling manifest"
    assert events[-1]["status"] == "success"
    assert result["response"] == REPLY
    assert sim.recorder.bodies[-2]["keep_alive"] == 601  # whole seconds, rounded up
    assert sim.recorder.bodies[-2]["stream"] is False
    assert "qwen3:0.6b" in inventory.models_present
    assert inventory.models_loaded == ("qwen3:0.6b",)
