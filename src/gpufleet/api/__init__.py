"""gpufleet's REST API: one router per resource, assembled by ``build_router``."""

from __future__ import annotations

from fastapi import APIRouter


def build_router() -> APIRouter:
    from gpufleet.api import health, workers

    router = APIRouter()
    router.include_router(health.router)
    router.include_router(workers.router)
    return router
