"""``read_body``: the proxy's bounded body read (size, time, disconnect), without a server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gpufleet.proxy.endpoint import BodyTimeout, ClientGone, read_body


def receiving(*messages: dict[str, Any]) -> Any:
    """An ASGI ``receive`` that hands out ``messages``, then never returns."""
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("not reached")

    return receive


async def test_a_body_in_parts_is_joined() -> None:
    receive = receiving(
        {"type": "http.request", "body": b'{"a"', "more_body": True},
        {"type": "http.request", "body": b": 1}"},
    )
    assert await read_body(receive, 100, timeout_s=5) == b'{"a": 1}'


async def test_over_the_limit_is_none_even_before_reading() -> None:
    assert await read_body(receiving(), 10, declared="11") is None
    receive = receiving({"type": "http.request", "body": b"x" * 11, "more_body": True})
    assert await read_body(receive, 10, timeout_s=5) is None


async def test_a_body_that_stops_short_times_out_and_the_task_goes_on() -> None:
    receive = receiving({"type": "http.request", "body": b"{", "more_body": True})
    with pytest.raises(BodyTimeout, match="within 0.05 s"):
        await read_body(receive, 100, timeout_s=0.05)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # not left half-cancelled
    await asyncio.sleep(0)  # and a later await is not cancelled


async def test_a_cancel_from_outside_is_a_cancel_not_a_timeout() -> None:
    reader = asyncio.create_task(read_body(receiving(), 100, timeout_s=30))
    await asyncio.sleep(0.01)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_a_disconnect_is_client_gone() -> None:
    with pytest.raises(ClientGone):
        await read_body(receiving({"type": "http.disconnect"}), 100, timeout_s=5)
