"""Many coarse deadlines on one event-loop timer: the proxy's per-request timeouts.

Every proxied request arms three deadlines (the body read, the wait for the worker's
headers, the start of the disconnect watch) and almost always cancels all three a
millisecond later. One uvloop ``call_later`` plus its ``cancel`` costs about 2 µs (and a
cancelled timer's closing handle an extra zero-timeout poll), ~5 % of a proxied request's
CPU (``bench/proxy_overhead.py``). Here arming is a dict insert, cancelling a dict delete,
and one loop timer, set for the earliest deadline, fires what is due and sets itself for
the next: a deadline fires up to ``TICK_S`` late, never early, and a run of requests that
each cancel their deadlines shares one loop wake-up per ``WATCH_AFTER_S`` or so. Use it
for timeouts of tenths of a second and more, where that slack does not matter.

Consumers: ``gpufleet.proxy.endpoint.read_body``, ``gpufleet.proxy.upstream``
(``_Connection.wait``), ``gpufleet.proxy.relay.ProxyService.forward``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections.abc import Callable

logger = logging.getLogger(__name__)

TICK_S = 0.02  # how late a deadline may fire

_Callback = Callable[[], object]


class CoarseTimer:
    """Deadlines in event-loop time on one loop timer, set for the earliest of them (a new
    deadline moves it only when it is due more than ``tick_s`` sooner)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = TICK_S) -> None:
        self.loop = loop
        self.tick_s = tick_s
        self._armed: dict[int, tuple[float, _Callback]] = {}
        self._ids = itertools.count(1)
        self._ticker: asyncio.TimerHandle | None = None
        self._ticker_at = 0.0

    def __repr__(self) -> str:
        return f"<CoarseTimer armed={len(self._armed)} tick={self.tick_s}s>"

    def __len__(self) -> int:
        return len(self._armed)

    def call_at(self, when: float, callback: _Callback) -> int:
        """Run ``callback()`` once the loop's time is past ``when`` (up to ``tick_s``
        later); returns a handle for ``cancel``."""
        handle = next(self._ids)
        self._armed[handle] = (when, callback)
        if self._ticker is None or when < self._ticker_at - self.tick_s:
            self._arm(when)
        return handle

    def call_later(self, delay_s: float, callback: _Callback) -> int:
        return self.call_at(self.loop.time() + delay_s, callback)

    def cancel(self, handle: int) -> None:
        """Forget ``handle`` (fired or cancelled already: nothing happens). The loop timer
        stays: most deadlines are cancelled at once, and the next one reuses it."""
        self._armed.pop(handle, None)

    def _arm(self, when: float) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self._ticker_at = when
        self._ticker = self.loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        now = self.loop.time()
        due = [h for h, (when, _) in self._armed.items() if when <= now]
        for handle in due:
            entry = self._armed.pop(handle, None)  # a callback may cancel another
            if entry is None:
                continue
            try:
                entry[1]()
            except Exception:  # one failing callback does not stop the others
                logger.exception("coarse timer: callback %r failed", entry[1])
        if self._armed and self._ticker is None:
            soonest = min(when for when, _ in self._armed.values())
            self._arm(max(soonest, now + self.tick_s))


_TIMERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CoarseTimer] = (
    weakref.WeakKeyDictionary()
)


# The last loop asked about and its timer: a served process has one loop, and this skips
# the weak dict's lookup three times per proxied request. (A timer refers to its loop, so
# this keeps nothing alive that ``_TIMERS`` does not.)
_last: CoarseTimer | None = None


def coarse_timer(loop: asyncio.AbstractEventLoop | None = None) -> CoarseTimer:
    """The running loop's (or ``loop``'s) shared ``CoarseTimer``."""
    global _last
    loop = loop or asyncio.get_running_loop()
    last = _last
    if last is not None and last.loop is loop:
        return last
    timer = _TIMERS.get(loop)
    if timer is None:
        timer = _TIMERS[loop] = CoarseTimer(loop)
    _last = timer
    return timer
