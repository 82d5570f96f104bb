"""``/api/v1/events``: scale decisions and worker changes, recent (JSON) or live (SSE)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from gpufleet.api.auth import Principal, authenticate, require_admin
from gpufleet.api.deps import get_events
from gpufleet.api.streams import event_stream
from gpufleet.store.events import EventLog

router = APIRouter(prefix="/api/v1/events", tags=["events"], dependencies=[Depends(require_admin)])


@router.get("", summary="Recent fleet events (newest first)")
async def recent_events(
    limit: int = Query(100, ge=1, le=1000),
    pool: str | None = None,
    events: EventLog = Depends(get_events),
) -> list[dict[str, Any]]:
    return await events.recent(limit, pool=pool)


@router.get(
    "/stream",
    summary="Live fleet events as server-sent events",
    responses={429: {"description": "The key holds [auth] max_streams_per_key streams."}},
)
async def stream_events(
    request: Request,
    principal: Principal = Depends(authenticate),
    last_event_id: str = Query("$", alias="after", description="Stream id to resume after."),
    events: EventLog = Depends(get_events),
) -> StreamingResponse:
    resume = request.headers.get("last-event-id") or last_event_id

    async def body() -> AsyncIterator[bytes]:
        yield b": connected\n\n"
        follower = events.follow(resume, block_ms=10_000)
        try:
            async for event in follower:
                if await request.is_disconnected():
                    break
                if event is None:
                    yield b": keep-alive\n\n"
                    continue
                frame = f"id: {event['id']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
                yield frame.encode()
        finally:
            await follower.aclose()

    return await event_stream(request, principal, body())
