"""``/api/v1/history``: the pools' recorded traffic as a trace ``gpufleet simulate`` replays.

Admin only (the router requires an admin key). ``GET /api/v1/history?pool=&since=7d`` answers
``text/csv`` in exactly the ``gpufleet simulate --trace`` format (header
``arrival,service_s,model,pool,kind``), one UTC day at a time as it is built. The rows are
*reconstructed* from the bounded history ``store/history.py`` keeps (``HistoryStore.export``):
arrivals at minute resolution, service times at the histogram's ~19 % bucket resolution; not
a raw log. ``gpufleet history export`` is the CLI over it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from gpufleet.api.auth import require_admin
from gpufleet.api.deps import get_services
from gpufleet.errors import NotFound, StoreError
from gpufleet.store.history import EXPORT_MAX_S, ExportRow, trace_csv

router = APIRouter(
    prefix="/api/v1/history", tags=["history"], dependencies=[Depends(require_admin)]
)

SINCE_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SINCE_PATTERN = r"^([0-9]+(?:\.[0-9]+)?)([smhd]?)$"
DEFAULT_SINCE = "7d"


class CsvResponse(StreamingResponse):
    media_type = "text/csv"


def parse_since(text: str) -> float:
    """A look-back: ``30m``, ``12h``, ``7d``, ``90s`` or plain seconds (``3600``), more than 0
    and at most the history's window (``EXPORT_MAX_S``, 7 days). Raises ValueError."""
    match = re.match(SINCE_PATTERN, text.strip())
    if not match:
        raise ValueError(
            f"{text!r} is not a duration: seconds, or a number with s, m, h or d (30m, 12h, 7d)"
        )
    seconds = float(match.group(1)) * SINCE_UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r} must be more than 0 seconds")
    if seconds > EXPORT_MAX_S:
        raise ValueError(
            f"{text!r} is longer than the history kept: at most {EXPORT_MAX_S / 86400:g}d "
            f"({EXPORT_MAX_S:.0f} s)"
        )
    return seconds


def _chunks(days: Iterator[list[ExportRow]]) -> Iterator[str]:
    yield trace_csv((), header=True)
    for rows in days:
        if rows:
            yield trace_csv(rows, header=False)


@router.get(
    "",
    summary="Recorded arrivals and service times as a trace for `gpufleet simulate --trace`",
    response_class=CsvResponse,
    responses={
        200: {
            "description": "CSV: arrival (epoch s), service_s, model, pool, kind; one row per "
            "arrival, sorted by arrival.",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        404: {"description": "No such pool."},
    },
)
async def export_history(
    request: Request,
    pool: str | None = Query(None, description="One pool (default: every configured pool)."),
    since: str = Query(
        DEFAULT_SINCE,
        description="How far back: seconds, or 30m, 12h, 7d; at most 7d (the history's window).",
        json_schema_extra={"pattern": SINCE_PATTERN},  # documented; checked by parse_since
    ),
) -> CsvResponse:
    """The trace the live history describes (admin): each minute's arrivals spread evenly
    inside it, service times from that day's service histogram. Reconstructed from the
    bounded history, not a raw log (docs/scaling.md, "Replay your own traffic")."""
    try:
        since_s = parse_since(since)
    except ValueError as exc:
        raise RequestValidationError(
            [{"loc": ("query", "since"), "msg": str(exc), "type": "value_error"}]
        ) from None
    services = get_services(request)
    if pool is not None and pool not in {p.name for p in services.settings.pools}:
        raise NotFound(f"pool {pool!r} not found")
    history = services.history
    try:
        days = await history.export_days(pool, since_s)
    except RedisError as exc:
        raise StoreError(f"cannot read pool history: {exc}") from exc
    name = f"gpufleet-history-{pool or 'all'}.csv"
    return CsvResponse(
        _chunks(days), headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )
