"""Server-sent event streams, at most ``[auth] max_streams_per_key`` open per key.

Each open stream holds a place in Redis (``store/streams.py``), so the cap is exact across
replicas. The place is taken before the answer starts (one more is 429 with the usual
error body), renewed while the stream is open, and given back when the answer ends for
any reason: the stream finished, the client went away, or the server is stopping. A
replica that dies frees its places when their lease runs out (``STREAM_LEASE_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from gpufleet.api.auth import Principal
from gpufleet.api.deps import get_settings, get_stream_places
from gpufleet.errors import LimitExceeded, StoreError
from gpufleet.store.streams import StreamPlaces

logger = logging.getLogger(__name__)

STREAM_LEASE_S = 60.0
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
# The bucket every caller shares when auth is off (or failed open).
ANONYMOUS = "anonymous"


class HeldStreamingResponse(StreamingResponse):
    """A streaming answer that holds a stream place until it ends, however it ends."""

    def __init__(
        self, content: AsyncIterator[bytes], *, places: StreamPlaces, bucket: str, token: str
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.places, self.bucket, self.token = places, bucket, token

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(STREAM_LEASE_S / 3)
            try:
                await self.places.renew(self.bucket, self.token, lease_s=STREAM_LEASE_S)
            except RedisError as exc:
                logger.debug("could not renew an event stream's place: %s", exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        renewer = asyncio.get_running_loop().create_task(self._renew())
        try:
            await super().__call__(scope, receive, send)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await asyncio.shield(self.places.release(self.bucket, self.token))
            except (RedisError, asyncio.CancelledError) as exc:
                # The lease runs out by itself within STREAM_LEASE_S.
                logger.debug("could not free an event stream's place: %r", exc)


async def event_stream(
    request: Request, principal: Principal, content: AsyncIterator[bytes]
) -> StreamingResponse:
    """``content`` as ``text/event-stream`` if the caller's key may open one more stream;
    ``LimitExceeded`` (429) if it holds ``[auth] max_streams_per_key`` already."""
    auth = get_settings(request).auth
    limit = auth.max_streams_per_key
    if not limit:
        return StreamingResponse(content, media_type="text/event-stream", headers=SSE_HEADERS)
    places = get_stream_places(request)
    bucket = principal.key.id if principal.key else ANONYMOUS  # per key, even in a team
    token = uuid.uuid4().hex
    try:
        taken = await places.take(bucket, token, limit=limit, lease_s=STREAM_LEASE_S)
    except RedisError as exc:
        if auth.fail_open:
            logger.warning("event streams: Redis unavailable, failing open (%s)",
                           type(exc).__name__)
            return StreamingResponse(content, media_type="text/event-stream", headers=SSE_HEADERS)
        raise StoreError("cannot count open event streams: Redis unavailable") from exc
    if not taken:
        raise LimitExceeded(
            f"this key has {limit} event streams open already ([auth] max_streams_per_key): "
            "close one first",
            retry_after=5,
        )
    return HeldStreamingResponse(content, places=places, bucket=bucket, token=token)
