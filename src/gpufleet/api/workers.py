"""``/api/v1/workers``: the fleet as the registry sees it, and draining a worker by hand.

Admin keys see every field. User keys see a worker's pool, state, slots, models and
times, but never where it lives or what it costs: ``base_url``, ``instance_id``,
``last_error`` (which may quote the URL), ``price_per_hour`` and ``cost_usd`` are left
out, and ``id`` is an opaque alias (a Novita worker's id *is* its instance id).
Draining is admin only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from gpufleet.api.auth import Principal, authenticate, require_admin
from gpufleet.api.deps import get_events, get_registry
from gpufleet.domain import Worker, WorkerState, public_worker_id
from gpufleet.errors import Conflict, NotFound
from gpufleet.store.events import EventLog
from gpufleet.store.workers import WorkerRegistry

router = APIRouter(prefix="/api/v1/workers", tags=["workers"])


# Fields of ``WorkerOut`` only admin keys get.
ADMIN_ONLY_FIELDS = frozenset(
    {"instance_id", "base_url", "last_error", "price_per_hour", "cost_usd"}
)


class WorkerOut(BaseModel):
    id: str
    pool: str
    provider: str
    state: WorkerState
    instance_id: str | None = None
    base_url: str | None = None
    slots: int
    busy_slots: int
    free_slots: int
    models_present: list[str]
    models_loaded: list[str]
    created_at: float
    state_since: float
    ready_since: float | None
    last_busy_at: float | None
    uptime_s: float | None
    health_failures: int
    price_per_hour: float | None = None
    cost_usd: float | None = None
    last_error: str | None = None

    def shown_to(self, principal: Principal) -> dict[str, Any]:
        """The fields ``principal`` may see (admin: all; users: no location, no cost)."""
        if principal.is_admin:
            return self.model_dump(mode="json")
        data = self.model_dump(mode="json", exclude=set(ADMIN_ONLY_FIELDS))
        data["id"] = public_worker_id(self.id)
        return data

    @classmethod
    def of(cls, w: Worker, now: float) -> WorkerOut:
        return cls(
            id=w.id,
            pool=w.pool,
            provider=w.provider,
            state=w.state,
            instance_id=w.instance_id,
            base_url=w.base_url,
            slots=w.slots,
            busy_slots=w.busy_slots,
            free_slots=w.free_slots,
            models_present=list(w.models_present),
            models_loaded=list(w.models_loaded),
            created_at=w.created_at,
            state_since=w.state_since,
            ready_since=w.ready_since,
            last_busy_at=w.last_busy_at,
            uptime_s=(now - w.ready_since)
            if w.ready_since and w.state in (WorkerState.ready, WorkerState.draining)
            else None,
            health_failures=w.health_failures,
            price_per_hour=w.price_per_hour,
            cost_usd=w.cost_usd,
            last_error=w.last_error,
        )


class WorkerMetrics(BaseModel):
    total_workers: int
    pending_workers: int
    starting_workers: int
    running_workers: int
    idle_workers: int
    terminating_workers: int
    failed_workers: int
    by_state: dict[str, int]
    by_pool: dict[str, dict[str, int]]


@router.get("", summary="List workers", response_model=list[WorkerOut])
async def list_workers(
    pool: str | None = None,
    state: WorkerState | None = None,
    registry: WorkerRegistry = Depends(get_registry),
    principal: Principal = Depends(authenticate),
) -> Any:
    now = registry.clock()
    return JSONResponse(
        [
            WorkerOut.of(w, now).shown_to(principal)
            for w in await registry.list_workers(pool)
            if state is None or w.state is state
        ]
    )


@router.get("/metrics", summary="Worker counts by state", response_model=WorkerMetrics)
async def worker_metrics(registry: WorkerRegistry = Depends(get_registry)) -> WorkerMetrics:
    workers = await registry.list_workers()
    by_state: dict[str, int] = {s.value: 0 for s in WorkerState}
    by_pool: dict[str, dict[str, int]] = {}
    for w in workers:
        by_state[w.state.value] += 1
        pool = by_pool.setdefault(w.pool, {})
        pool[w.state.value] = pool.get(w.state.value, 0) + 1
    live = [w for w in workers if w.state is not WorkerState.deleted]
    ready = [w for w in workers if w.state is WorkerState.ready]
    return WorkerMetrics(
        total_workers=len(live),
        pending_workers=by_state["provisioning"],
        starting_workers=by_state["booting"],
        running_workers=len([w for w in ready if w.busy_slots > 0]),
        idle_workers=len([w for w in ready if w.busy_slots == 0]),
        terminating_workers=by_state["draining"] + by_state["stopping"],
        failed_workers=by_state["failed"],
        by_state=by_state,
        by_pool=by_pool,
    )


@router.get("/{worker_id}", summary="One worker", response_model=WorkerOut)
async def get_worker(
    worker_id: str,
    registry: WorkerRegistry = Depends(get_registry),
    principal: Principal = Depends(authenticate),
) -> Any:
    if principal.is_admin:
        worker = await registry.find(worker_id)
    else:  # users know workers by their alias only
        worker = next(
            (w for w in await registry.list_workers() if public_worker_id(w.id) == worker_id),
            None,
        )
    if worker is None:
        raise NotFound(f"worker {worker_id!r} not found")
    return JSONResponse(WorkerOut.of(worker, registry.clock()).shown_to(principal))


@router.post(
    "/{worker_id}/drain",
    summary="Finish current tasks, take no new ones (admin)",
    response_model=WorkerOut,
    dependencies=[Depends(require_admin)],
)
async def drain_worker(
    worker_id: str,
    registry: WorkerRegistry = Depends(get_registry),
    events: EventLog = Depends(get_events),
) -> Any:
    worker = await registry.find(worker_id)
    if worker is None:
        raise NotFound(f"worker {worker_id!r} not found")
    if worker.state is not WorkerState.draining:
        if not await registry.transition(worker_id, WorkerState.draining, "drained by operator"):
            raise Conflict(f"worker {worker_id!r} is {worker.state}; only a ready worker drains")
        await events.emit(
            "worker",
            worker=worker_id,
            pool=worker.pool,
            state="draining",
            reason="drained by operator",
        )
    return WorkerOut.of(await registry.get(worker_id), registry.clock())
