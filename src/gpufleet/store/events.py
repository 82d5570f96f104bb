"""Fleet events (scale decisions and their outcomes, worker state changes) in a capped stream.

One Redis Stream, trimmed to about ``maxlen`` entries, so it never grows without
bound. ``recent()`` serves ``GET /api/v1/events``; ``follow()`` blocks on XREAD for
the SSE endpoint, so followers do not poll.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

import redis.asyncio as aioredis

from gpufleet.store.keys import Keys


class EventLog:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "gpufleet",
        maxlen: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.key = Keys(prefix).events()
        self.maxlen = maxlen
        self.clock = clock

    async def emit(self, kind: str, **fields: Any) -> str:
        """Append one event; values that are not strings are stored as JSON."""
        entry = {"kind": kind, "ts": f"{self.clock():.3f}"}
        for name, value in fields.items():
            if value is None:
                continue
            entry[name] = value if isinstance(value, str) else json.dumps(value)
        event_id = await self.redis.xadd(
            self.key, cast(Any, entry), maxlen=self.maxlen, approximate=True
        )
        return str(event_id)

    async def recent(self, limit: int = 100, *, pool: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        raw: Any = await self.redis.xrevrange(self.key, count=limit if pool is None else limit * 10)
        events = [_decode(event_id, data) for event_id, data in raw]
        if pool is not None:
            events = [e for e in events if e.get("pool") == pool][:limit]
        return events

    async def follow(
        self, last_id: str = "$", *, block_ms: int = 15_000
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """Yield events as they arrive; yields None after each idle ``block_ms`` (keep-alive)."""
        while True:
            answer: Any = await self.redis.xread({self.key: last_id}, block=block_ms, count=100)
            if not answer:
                yield None
                continue
            for _stream, entries in answer:
                for event_id, data in entries:
                    last_id = event_id
                    yield _decode(event_id, data)


def _decode(event_id: str, data: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": event_id}
    for name, value in data.items():
        if name == "ts":
            out[name] = float(value)
            continue
        try:
            out[name] = json.loads(value) if value[:1] in "[{0123456789-tfn\"" else value
        except ValueError:
            out[name] = value
    return out
