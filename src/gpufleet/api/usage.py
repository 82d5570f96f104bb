"""``GET /api/v1/usage``: GPU seconds, dollars and tokens attributed to teams and keys.

Read from the per-day aggregates of ``gpufleet.store.usage``. An admin sees everything
and, per pool, the overhead (spend not attributed to anyone: idle and boot time); a
``team_admin`` key its team's usage; any other key its own usage only.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from gpufleet.api.auth import Principal, authenticate
from gpufleet.api.deps import get_usage
from gpufleet.errors import Forbidden
from gpufleet.store.usage import GROUPS, GroupBy, UsageStore, summarize

router = APIRouter(prefix="/api/v1/usage", tags=["usage"])


class UsageOut(BaseModel):
    start: str = Field(alias="from", description="First day (inclusive), YYYY-MM-DD.")
    end: str = Field(alias="to", description="Last day (inclusive).")
    timezone: str = Field(description="The calendar the days follow ([usage] timezone).")
    group_by: str
    rows: list[dict[str, Any]]
    total: dict[str, Any]
    overhead: list[dict[str, Any]] | None = Field(
        None, description="Admins only: per pool, spend, attributed and spend - attributed."
    )


def _scope(principal: Principal, team: str | None, key: str | None) -> tuple[list[str] | None,
                                                                                str | None]:
    """The teams and key a caller may ask about (a non-admin's filters are forced)."""
    if principal.is_admin:
        return ([team] if team is not None else None), key
    if principal.is_team_admin:
        if team not in (None, principal.team_name):
            raise Forbidden("a team_admin key sees its own team's usage only")
        return [principal.team_name or ""], key
    assert principal.key is not None
    if (team not in (None, principal.team_name or "")) or key not in (None, principal.key.id):
        raise Forbidden("this key sees its own usage only")
    return [principal.team_name or ""], principal.key.id


@router.get(
    "",
    response_model=UsageOut,
    response_model_by_alias=True,
    summary="Usage and cost per day, team, key, pool or model",
)
async def usage(
    request: Request,
    team: str | None = Query(
        None, max_length=63, description="Only this team ('' = keys in no team)."
    ),
    key: str | None = Query(None, max_length=64, description="Only this key id."),
    pool: str | None = Query(None, max_length=63),
    start: date | None = Query(None, alias="from", description="YYYY-MM-DD; default: the 1st."),
    end: date | None = Query(None, alias="to", description="YYYY-MM-DD; default: today."),
    group_by: GroupBy = Query("team", description=" | ".join(GROUPS)),
    principal: Principal = Depends(authenticate),
    store: UsageStore = Depends(get_usage),
) -> dict[str, Any]:
    teams, key = _scope(principal, team, key)
    today = datetime.fromtimestamp(store.clock(), store.periods.tz).date()
    last = end or today
    first = start or last.replace(day=1)
    retention = store.ttl_s // 86400
    if first > last or (last - first) > timedelta(days=retention):
        raise _bad_range(f"'from' must be on or before 'to', at most {retention} days apart")
    report = summarize(await store.read(first, last), group_by, teams=teams, key=key, pool=pool)
    return {
        "from": first.isoformat(),
        "to": last.isoformat(),
        "timezone": store.periods.tz.key,
        "group_by": group_by,
        "rows": [r.public() for r in report.rows],
        "total": report.total.public(),
        "overhead": [p.public() for p in report.overhead] if principal.is_admin else None,
    }


def _bad_range(message: str) -> Exception:
    from fastapi.exceptions import RequestValidationError

    return RequestValidationError(
        [{"loc": ("query", "from"), "msg": message, "type": "value_error"}]
    )
