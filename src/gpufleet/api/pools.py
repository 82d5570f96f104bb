"""``/api/v1/pools``: each pool's config, workers, demand, spend and backoff; knobs at run time.

User keys see what they need to use a pool (``USER_FIELDS``: name, engine, models and
counts); provider, prices, spend, burn rate, backoff reasons and the last scale
actions are for admin keys only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpufleet.api.auth import Principal, authenticate, require_admin
from gpufleet.api.deps import get_pool_state, get_services
from gpufleet.domain import LIVE_WORKER_STATES, WorkerState
from gpufleet.errors import Conflict, NotFound
from gpufleet.scaling.history import Histogram, PoolHistory
from gpufleet.settings import PoolSpec, Settings
from gpufleet.store.demand import DemandReader
from gpufleet.store.events import EventLog
from gpufleet.store.pools import AUTO_OVERRIDE, PoolStateStore
from gpufleet.store.workers import WorkerRegistry
from gpufleet.wiring import Services

router = APIRouter(prefix="/api/v1/pools", tags=["pools"])

# What a user-role key sees of a pool: what it serves and how busy it is, nothing more.
USER_FIELDS = (
    "name",
    "engine",
    "models",
    "slots",
    "min_workers",
    "max_workers",
    "workers_by_state",
    "slots_busy",
    "slots_free",
    "demand",
)


def shown_to(view: dict[str, Any], principal: Principal) -> dict[str, Any]:
    """``view`` as ``principal`` may see it (admin: all of it)."""
    if principal.is_admin:
        return view
    return {k: view[k] for k in USER_FIELDS if k in view}


class PoolPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_workers: int | None = Field(None, ge=0, le=10_000)
    max_workers: int | None = Field(None, ge=0, le=10_000)
    idle_timeout_s: float | Literal["auto"] | None = Field(
        None,
        description='Seconds (0 to 7 days), or "auto": learned from the pool\'s idle gaps.',
    )

    @field_validator("idle_timeout_s")
    @classmethod
    def _idle_range(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, int | float) and not 0 <= value <= 7 * 86400:
            raise ValueError('must be "auto" or between 0 and 604800 seconds')
        return value

    @model_validator(mode="after")
    def _something(self) -> PoolPatch:
        if not self.model_fields_set:
            raise ValueError("give at least one of min_workers, max_workers, idle_timeout_s")
        return self


class PoolScale(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = Field(ge=0, le=10_000, description="Keep at least this many workers ready.")
    duration_s: float = Field(3600, gt=0, le=7 * 86400, description="For this long.")


def _spec(settings: Settings, name: str) -> PoolSpec:
    try:
        return settings.pool(name)
    except KeyError:
        raise NotFound(f"pool {name!r} not found") from None


async def describe(
    spec: PoolSpec,
    *,
    store: PoolStateStore,
    registry: WorkerRegistry,
    events: EventLog,
    demand: DemandReader,
) -> dict[str, Any]:
    effective, runtime = await store.effective(spec)
    workers = await registry.list_workers(spec.name)
    by_state = Counter(w.state.value for w in workers)
    # What bills now: the same live workers the spend accounting and the burn-rate gauge count.
    running = [w for w in workers if w.state in LIVE_WORKER_STATES]
    recent = await events.recent(10, pool=spec.name)
    return {
        "name": spec.name,
        "provider": spec.provider.value,
        "engine": spec.engine.value,
        "slots": spec.slots,
        "models": spec.models,
        "min_workers": effective.min_workers,
        "max_workers": effective.max_workers,
        "idle_timeout_s": effective.idle_timeout_s,
        "boot_timeout_s": spec.boot_timeout_s,
        "price_per_hour": spec.price_per_hour,
        "overrides": runtime.overrides,
        "floor": {"workers": runtime.floor, "until": runtime.floor_until}
        if runtime.floor
        else None,
        "workers_by_state": dict(by_state),
        "slots_busy": sum(w.busy_slots for w in workers if w.state is WorkerState.ready),
        "slots_free": sum(w.free_slots for w in workers),
        "demand": await demand.pool_demand(spec.name),
        "spend_usd": round(runtime.spend_usd, 6),
        "spend_today_usd": round(runtime.spend_today_usd, 6),
        "burn_rate_per_hour": round(sum(w.price_per_hour for w in running), 6),
        "backoff": {
            "until": runtime.backoff_until,
            "reason": runtime.backoff_reason,
            "failures": runtime.failures,
        }
        if runtime.backoff_until
        else None,
        "last_actions": recent,
    }


async def _describe(services: Services, store: PoolStateStore, spec: PoolSpec) -> dict[str, Any]:
    return await describe(spec, store=store, registry=services.registry, events=services.events,
                          demand=services.demand)


@router.get("", summary="Every pool with workers, demand, spend and backoff")
async def list_pools(
    request: Request,
    store: PoolStateStore = Depends(get_pool_state),
    principal: Principal = Depends(authenticate),
) -> list[dict[str, Any]]:
    services = get_services(request)
    return [
        shown_to(await _describe(services, store, spec), principal)
        for spec in services.settings.pools
    ]


@router.get("/{name}", summary="One pool (for admins with what its history says)")
async def get_pool(
    name: str,
    request: Request,
    store: PoolStateStore = Depends(get_pool_state),
    principal: Principal = Depends(authenticate),
) -> dict[str, Any]:
    services = get_services(request)
    spec = _spec(services.settings, name)
    out = shown_to(await _describe(services, store, spec), principal)
    history = services.history
    if principal.is_admin:
        summary = (await history.summary([spec.name]))[spec.name]
        out["history"] = history_view(summary, await history.model_service(spec.name))
    return out


def _stats(h: Histogram) -> dict[str, float]:
    return {"samples": round(h.total, 3), "mean_s": round(h.mean(), 3),
            "p95_s": round(h.quantile(0.95), 3)}


def history_view(summary: PoolHistory, per_model: dict[str, PoolHistory]) -> dict[str, Any]:
    """What the scaler learned from the pool's past (``store.history``), in numbers: sample
    counts are decayed weights over the window (today 1, yesterday 0.5, ...)."""
    return {
        "arrivals": round(summary.arrivals, 3),
        "arrivals_per_min": round(summary.arrivals_per_s * 60, 3),
        "service": _stats(summary.service_s),
        "service_by_model": {m: _stats(h.service_s) for m, h in per_model.items()},
        "boot": {src: _stats(h) for src, h in sorted(summary.boot_s.items())},
        "idle_gaps": [
            {"level": level, **_stats(h)} for level, h in enumerate(summary.idle_gaps_s, 1)
        ],
    }


@router.patch(
    "/{name}",
    summary="Change min/max workers or idle timeout at run time",
    dependencies=[Depends(require_admin)],
)
async def patch_pool(
    name: str,
    body: PoolPatch,
    request: Request,
    store: PoolStateStore = Depends(get_pool_state),
) -> dict[str, Any]:
    services = get_services(request)
    spec = _spec(services.settings, name)
    effective, _ = await store.effective(spec)
    low = body.min_workers if body.min_workers is not None else effective.min_workers
    high = body.max_workers if body.max_workers is not None else effective.max_workers
    if low > high:
        raise Conflict(f"min_workers ({low}) would exceed max_workers ({high})")
    values = body.model_dump(exclude_unset=True)
    if values.get("idle_timeout_s") == "auto":
        values["idle_timeout_s"] = AUTO_OVERRIDE  # stored as a number, read back as "auto"
    await store.set_overrides(name, **values)
    await services.events.emit(
        "pool", pool=name, action="patch", reason=str(body.model_dump(exclude_unset=True))
    )
    services.scale_wake.set()
    return await _describe(services, store, spec)


@router.post(
    "/{name}/scale",
    summary="Keep at least N workers ready for a while (pre-warm)",
    dependencies=[Depends(require_admin)],
)
async def scale_pool(
    name: str,
    body: PoolScale,
    request: Request,
    store: PoolStateStore = Depends(get_pool_state),
) -> dict[str, Any]:
    services = get_services(request)
    spec = _spec(services.settings, name)
    until = await store.set_floor(name, body.workers, body.duration_s)
    await services.events.emit(
        "pool", pool=name, action="scale", reason=f"floor {body.workers} until {until:.0f}"
    )
    services.scale_wake.set()
    return await _describe(services, store, spec)
