"""One reconnecting pub/sub subscription: the reconciler's wake, the dispatcher's wake and
cancel, and the queue's task-event fan-out all listen through it.

``Subscriber(redis, channels, on_message)`` holds one pub/sub connection in a background task
(``start()``; starting again while it runs does nothing). Every message on its channels goes
to ``on_message(channel, data)`` (both decoded to ``str``), synchronously, in the order Redis
sent them; a callback that raises is logged and the subscription carries on. ``listening()``
waits until Redis has confirmed every channel (tests and callers that must not miss a
message published after it returns), and ``on_listening`` is called at each (re)subscription,
so a caller can re-read what it may have missed meanwhile.

When the connection is lost it reconnects after a backoff that doubles from ``backoff_min_s``
to ``backoff_max_s`` (reset once subscribed again). ``aclose()`` asks the loop to stop and
wakes its read with a message on the subscription's own stop channel (``<first
channel>:stop:<random>``, subscribed with the others, never delivered); only if that cannot
be sent does the read notice by itself, within ``poll_s``, and after ``grace_s`` it is
cancelled as the last resort: cancelling a read in flight can hang (redis-py 8.1). A quiet
subscription so wakes once per ``poll_s`` (60 s), not twice a second: an idle server pays
for every wakeup (bench/idle_cpu.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

POLL_S = 60.0  # how often a quiet subscription looks by itself whether it was asked to stop
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
CLOSE_GRACE_S = 5.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Subscriber:
    """A reconnecting subscription to ``channels`` delivering messages to ``on_message``."""

    def __init__(
        self,
        redis: aioredis.Redis,
        channels: Sequence[str],
        on_message: Callable[[str, str], None],
        *,
        name: str,
        on_listening: Callable[[], None] | None = None,
        poll_s: float = POLL_S,
        backoff_min_s: float = BACKOFF_MIN_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        if not channels:
            raise ValueError("a Subscriber needs at least one channel")
        self.redis = redis
        self.channels = tuple(channels)
        # aclose() publishes here to wake the read; one per Subscriber, so nobody else hears it
        self.stop_channel = f"{self.channels[0]}:stop:{secrets.token_hex(8)}"
        self.on_message = on_message
        self.on_listening = on_listening
        self.name = name
        self.poll_s = poll_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Subscriber {self.name} {' '.join(self.channels)} ready={self.is_listening}>"

    @property
    def is_listening(self) -> bool:
        return self._ready.is_set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the subscription in the background (nothing if it already runs)."""
        if not self.running:
            self._stopping.clear()
            self._ready.clear()
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def listening(self, timeout_s: float | None = 5.0) -> None:
        """Start if need be, and wait until Redis confirmed every channel."""
        self.start()
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def aclose(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop listening: the read is woken through the stop channel (else it sees the
        request within ``poll_s``); cancelled after ``grace_s`` as the last resort. The
        connection goes back to the pool."""
        task, self._task = self._task, None
        self._stopping.set()
        self._ready.clear()
        if task is None:
            return
        if not task.done():
            try:
                await asyncio.wait_for(self.redis.publish(self.stop_channel, "stop"), grace_s)
            except Exception as exc:  # Redis gone: the read fails or times out by itself
                logger.debug("%s: could not wake the subscription (%s)", self.name, exc)
        _, pending = await asyncio.wait([task], timeout=grace_s)
        for late in pending:
            late.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        backoff_s = self.backoff_min_s
        while not self._stopping.is_set():
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(*self.channels, self.stop_channel)
                await self._confirmed(pubsub)
                if self._stopping.is_set():
                    return
                self._ready.set()
                backoff_s = self.backoff_min_s
                if self.on_listening is not None:
                    self._call(self.on_listening)
                while not self._stopping.is_set():
                    message = await pubsub.get_message(timeout=self.poll_s)
                    if message is not None:
                        self._deliver(message)
            except Exception as exc:  # a lost connection, or Redis refusing: reconnect
                self._ready.clear()
                if self._stopping.is_set():
                    return
                logger.warning("%s: subscription lost (%s); reconnecting in %.1f s",
                               self.name, exc, backoff_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff_s)
            backoff_s = min(self.backoff_max_s, backoff_s * 2)
        self._ready.clear()

    async def _confirmed(self, pubsub: Any) -> None:
        """Read until Redis confirmed every channel (messages meanwhile are delivered)."""
        pending = {*self.channels, self.stop_channel}
        while pending and not self._stopping.is_set():
            message = await pubsub.get_message(timeout=self.poll_s)
            if message is None:
                continue
            if message.get("type") == "subscribe":
                pending.discard(_text(message["channel"]))
            else:
                self._deliver(message)

    def _deliver(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        channel, data = _text(message["channel"]), _text(message["data"])
        if channel == self.stop_channel:
            return
        self._call(lambda: self.on_message(channel, data))

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            logger.exception("%s: callback failed", self.name)
