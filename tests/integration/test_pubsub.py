"""``store/pubsub.Subscriber`` against a real Redis: delivery, readiness, reconnect, close."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from gpufleet.store.pubsub import Subscriber


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(0.01)


async def test_delivers_every_message_of_its_channels_in_order(redis: aioredis.Redis) -> None:
    got: list[tuple[str, str]] = []
    sub = Subscriber(redis, ["t:a", "t:b"], lambda c, d: got.append((c, d)), name="test")
    await sub.listening()
    assert sub.is_listening
    await redis.publish("t:a", "one")
    await redis.publish("t:other", "not ours")
    await redis.publish("t:b", "two")
    await redis.publish("t:a", "three")
    await _until(lambda: len(got) == 3)
    assert got == [("t:a", "one"), ("t:b", "two"), ("t:a", "three")]
    await sub.aclose()
    assert not sub.is_listening
    assert not sub.running
    await redis.publish("t:a", "after close")
    await asyncio.sleep(0.1)
    assert len(got) == 3


async def test_a_failing_callback_does_not_end_the_subscription(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[str] = []

    def on_message(_channel: str, data: str) -> None:
        if data == "bad":
            raise RuntimeError("boom")
        got.append(data)

    sub = Subscriber(redis, ["t:a"], on_message, name="test")
    await sub.listening()
    await redis.publish("t:a", "bad")
    await redis.publish("t:a", "good")
    await _until(lambda: got == ["good"])
    assert "callback failed" in caplog.text
    await sub.aclose()


async def test_reconnects_after_the_connection_is_killed(redis: aioredis.Redis) -> None:
    got: list[str] = []
    subscribed = 0

    def on_listening() -> None:
        nonlocal subscribed
        subscribed += 1

    sub = Subscriber(
        redis, ["t:a"], lambda _c, d: got.append(d), name="test", on_listening=on_listening,
        backoff_min_s=0.05,
    )
    await sub.listening()
    assert subscribed == 1
    killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert int(killed) >= 1
    await _until(lambda: subscribed == 2)
    await sub.listening()
    await redis.publish("t:a", "after reconnect")
    await _until(lambda: got == ["after reconnect"])
    await sub.aclose()


async def test_start_twice_is_one_subscription_and_a_closed_one_restarts(
    redis: aioredis.Redis,
) -> None:
    got: list[str] = []
    sub = Subscriber(redis, ["t:a"], lambda _c, d: got.append(d), name="test")
    sub.start()
    sub.start()
    await sub.listening()
    assert await redis.pubsub_numsub("t:a") == [("t:a", 1)]
    await sub.aclose()
    await sub.listening()
    await redis.publish("t:a", "again")
    await _until(lambda: got == ["again"])
    await sub.aclose()


async def test_needs_a_channel(fake_redis: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="channel"):
        Subscriber(fake_redis, [], lambda _c, _d: None, name="test")


async def test_close_wakes_a_quiet_read_through_its_own_stop_channel(
    redis: aioredis.Redis,
) -> None:
    """A quiet subscription reads with a long timeout (it must not wake an idle server twice
    a second); closing wakes it with a message on its own channel, which is not delivered,
    long before the read's timeout or the cancel of last resort."""
    got: list[tuple[str, str]] = []
    sub = Subscriber(redis, ["t:a"], lambda c, d: got.append((c, d)), name="test", poll_s=60)
    await sub.listening()
    assert sub.stop_channel.startswith("t:a:stop:")
    assert await redis.pubsub_numsub(sub.stop_channel) == [(sub.stop_channel, 1)]
    task = sub._task
    assert task is not None
    await asyncio.wait_for(sub.aclose(grace_s=60), timeout=20)
    assert task.done()
    assert not task.cancelled()
    assert got == []
    assert await redis.pubsub_numsub("t:a") == [("t:a", 0)]
