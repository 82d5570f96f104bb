"""The real ``openai`` SDK against gpufleet's proxy (``base_url=<gpufleet>/v1``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.e2e.test_proxy_waiting import (  # noqa: F401  (fixtures)
    FakeOllama,
    Fleet,
    fleet,
    proxy_settings,
)

pytestmark = pytest.mark.timeout(60)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[openai.AsyncOpenAI]:  # noqa: F811
    await fleet.add_worker("w1", slots=2, loaded=("llama3.2",))
    async with sdk(fleet) as client:
        yield client


def sdk(fleet: Fleet, key: str = "sk-alice") -> openai.AsyncOpenAI:  # noqa: F811
    return openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key=key, max_retries=0)


async def test_chat_non_stream(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="llama3.2", messages=MESSAGES)
    assert completion.choices[0].message.content == "w1-tok0 w1-tok1 w1-tok2 "
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


async def test_chat_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="llama3.2", messages=MESSAGES, stream=True)
    deltas = [chunk.choices[0].delta.content async for chunk in stream]
    assert deltas == ["w1-tok0 ", "w1-tok1 ", "w1-tok2 ", None]


async def test_embeddings(client: openai.AsyncOpenAI) -> None:
    result = await client.embeddings.create(model="llama3.2", input="hello")
    assert result.data[0].embedding == [0.1, 0.2, 0.3]


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    listed = [m.id async for m in client.models.list()]
    one = await client.models.retrieve("llama3.3:70b")
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("no-such-model")
    assert {"llama3.2:latest", "qwen2.5:7b", "llama3.3:70b"} <= set(listed)
    assert one.id == "llama3.3:70b"
    assert missing.value.status_code == 404


async def test_errors_are_openai_shaped(fleet: Fleet) -> None:  # noqa: F811
    async with sdk(fleet, "sk-bad") as bad_key, sdk(fleet) as good:
        with pytest.raises(openai.AuthenticationError) as denied:
            await bad_key.chat.completions.create(model="llama3.2", messages=MESSAGES)
        with pytest.raises(openai.NotFoundError) as unknown:
            await good.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert denied.value.status_code == 401
    assert unknown.value.body["type"] == "not_found_error"  # type: ignore[index]


async def test_mid_stream_error_raises(fleet: Fleet) -> None:  # noqa: F811
    await fleet.add_worker(
        "w1", loaded=("llama3.2",), upstream=FakeOllama(name="w1", tokens=4, die_after=2)
    )
    seen = []
    async with sdk(fleet) as client:
        stream = await client.chat.completions.create(
            model="llama3.2", messages=MESSAGES, stream=True
        )
        with pytest.raises(openai.APIError, match="worker failed"):
            await drain(stream, seen)
    assert seen == ["w1-tok0 ", "w1-tok1 "]


async def drain(stream: Any, seen: list[str | None]) -> None:
    async for chunk in stream:
        seen.append(chunk.choices[0].delta.content)
