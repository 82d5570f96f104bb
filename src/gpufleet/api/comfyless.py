"""``GET /novita/status``: the fleet in ComfyLess's shape, so its scripts and dashboards work.

ComfyLess answered ``{"provider": "novita", "metrics": {"total_workers", "pending_workers",
"starting_workers", "running_workers", "idle_workers", "terminating_workers",
"failed_workers"}}``. gpufleet counts the workers of its Novita pools, mapped so:

==========================  ============================================
ComfyLess                   gpufleet worker state
==========================  ============================================
``pending_workers``         ``provisioning`` (instance asked for)
``starting_workers``        ``booting`` (instance up, engine not yet)
``running_workers``         ``ready`` with at least one busy slot
``idle_workers``            ``ready`` with every slot free
``terminating_workers``     ``draining`` and ``stopping``
``failed_workers``          ``failed``
``total_workers``           every worker but ``deleted`` ones
==========================  ============================================

as ``/api/v1/workers/metrics`` counts them (for the whole fleet). Parked workers
(``stopped``/``paused``: no GPU billed beyond their disk) count in the total only, as
ComfyLess had no such state. Admin keys only, like the other
fleet-internal views (``/api/v1/workers`` shows workers by alias to user keys; this view
has no per-worker detail, but it tells the fleet's size, which is the operator's business).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from gpufleet.api.deps import get_registry, get_settings
from gpufleet.domain import ProviderKind, Worker, WorkerState
from gpufleet.store.workers import WorkerRegistry

router = APIRouter(tags=["comfyless"])

METRICS = (
    "total_workers",
    "pending_workers",
    "starting_workers",
    "running_workers",
    "idle_workers",
    "terminating_workers",
    "failed_workers",
)
BY_STATE = {
    WorkerState.provisioning: "pending_workers",
    WorkerState.booting: "starting_workers",
    WorkerState.draining: "terminating_workers",
    WorkerState.stopping: "terminating_workers",
    WorkerState.failed: "failed_workers",
}


def comfyless_bucket(worker: Worker) -> str | None:
    """The ComfyLess counter a worker adds to (None: it is in none)."""
    if worker.state is WorkerState.ready:
        return "running_workers" if worker.busy_slots > 0 else "idle_workers"
    return BY_STATE.get(worker.state)


@router.get("/novita/status", summary="ComfyLess-compatible fleet status (Novita pools)")
async def novita_status(
    request: Request, registry: WorkerRegistry = Depends(get_registry)
) -> dict[str, Any]:
    settings = get_settings(request)
    novita = {p.name for p in settings.pools if p.provider is ProviderKind.novita}
    metrics = dict.fromkeys(METRICS, 0)
    for worker in await registry.list_workers():
        if worker.pool not in novita or worker.state is WorkerState.deleted:
            continue
        metrics["total_workers"] += 1
        bucket = comfyless_bucket(worker)
        if bucket is not None:
            metrics[bucket] += 1
    return {"provider": "novita", "metrics": metrics}
