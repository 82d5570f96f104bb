"""Run a ``*_once`` coroutine forever: log a bad tick and carry on, stop on an event.

Every background loop (dispatcher, reconciler, health checker) is one public
``*_once`` method plus ``run_periodically``; tests call the ``*_once`` method
directly and never wait for a timer.

Ticks fall on one grid per process: the loop clock's multiples of ``interval_s``, shifted
by this process's ``TICK_PHASE`` (random, so replicas on one host do not all hit Redis in the
same millisecond). Loops of 1 s and 5 s so tick in the same wakeup of the event loop as each
other and as uvicorn's once-a-second housekeeping (``gpufleet.server``): an idle process
pays for every wakeup, about 1 ms of CPU each on a shared cloud core, far more than the
tick's own work (``bench/idle_cpu.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

# Where in each second this process's ticks fall (seconds of the loop clock).
TICK_PHASE = random.random()


def until_next_tick(interval_s: float, now: float, phase: float = TICK_PHASE) -> float:
    """Seconds from ``now`` (loop clock) to the next tick of the grid ``phase + k *
    interval_s``: more than 0, at most ``interval_s``."""
    ticks = math.floor((now - phase) / interval_s) + 1
    return max(phase + ticks * interval_s - now, 1e-3)


async def run_periodically(
    name: str,
    tick: Callable[[], Awaitable[Any]],
    interval_s: float,
    stop: asyncio.Event,
    *,
    wake: asyncio.Event | None = None,
) -> None:
    """Call ``tick`` at once, then on every ``interval_s`` of the process's tick grid (or
    sooner when ``wake`` is set) until ``stop``. A tick that overruns skips the grid points
    it covered; two ticks are never more than ``interval_s`` plus the first's run apart.

    An exception in one tick is logged with its traceback and the loop goes on:
    one bad record must not stop the fleet from being managed.
    """
    logger.info("loop %s started (every %.1f s)", name, interval_s)
    loop = asyncio.get_running_loop()
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
            await asyncio.wait(waiters, timeout=until_next_tick(interval_s, loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
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
