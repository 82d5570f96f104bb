"""Run a ``*_once`` coroutine forever: log a bad tick and carry on, stop on an event.

Every background loop (dispatcher, reconciler, health checker) is one public
``*_once`` method plus ``run_periodically``; tests call the ``*_once`` method
directly and never wait for a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


async def run_periodically(
    name: str,
    tick: Callable[[], Awaitable[Any]],
    interval_s: float,
    stop: asyncio.Event,
    *,
    wake: asyncio.Event | None = None,
) -> None:
    """Call ``tick`` every ``interval_s`` (or sooner when ``wake`` is set) until ``stop``.

    An exception in one tick is logged with its traceback and the loop goes on:
    one bad record must not stop the fleet from being managed.
    """
    logger.info("loop %s started (every %.1f s)", name, interval_s)
    while not stop.is_set():
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("loop %s: tick failed; continuing", name)
        waiters = [asyncio.ensure_future(stop.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if wake is not None:
            wake.clear()
    logger.info("loop %s stopped", name)


def spawn_loop(
    name: str,
    tick: Callable[[], Awaitable[Any]],
    interval_s: float,
    stop: asyncio.Event,
    *,
    wake: asyncio.Event | None = None,
) -> asyncio.Task[None]:
    """Start ``run_periodically`` as a task that warns if it ever ends before ``stop``."""
    task = asyncio.create_task(run_periodically(name, tick, interval_s, stop, wake=wake), name=name)

    def _done(t: asyncio.Task[None]) -> None:
        if not stop.is_set() and not t.cancelled():
            logger.warning("loop %s exited unexpectedly: %r", name, t.exception())

    task.add_done_callback(_done)
    return task
