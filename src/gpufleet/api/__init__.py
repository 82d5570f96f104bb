"""gpufleet's REST API: one router per resource, assembled by ``build_router``.

Only the operations endpoints (``/health``, ``/ready``, ``/metrics``) are public;
every other router is mounted behind ``authenticate`` (admin routers check the
role themselves).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends


def build_router() -> APIRouter:
    from gpufleet.api import (
        comfyless,
        events,
        health,
        history,
        keys,
        pools,
        providers,
        tasks,
        teams,
        ui,
        usage,
        workers,
    )
    from gpufleet.api.auth import authenticate, require_admin

    router = APIRouter()
    router.include_router(health.router)
    router.include_router(ui.router)
    protected = APIRouter(dependencies=[Depends(authenticate)])
    protected.include_router(workers.router)
    protected.include_router(pools.router)
    protected.include_router(keys.router)
    protected.include_router(events.router)
    protected.include_router(history.router)  # admin only (the router checks)
    protected.include_router(tasks.router)
    protected.include_router(teams.router)  # admin only (the router checks)
    protected.include_router(usage.router)  # scoped to the caller (the route checks)
    # Creating or deleting cloud instances by hand spends money: admins only.
    protected.include_router(providers.router, dependencies=[Depends(require_admin)])
    # ComfyLess's GET /novita/status (issue 17): the fleet's size, admins only.
    protected.include_router(comfyless.router, dependencies=[Depends(require_admin)])
    router.include_router(protected)
    return router
