"""The submit check for GPU requirements: which pools a task may wait for, or 422.

A task's requirement is its own ``gpu_memory_gb`` / ``gpu`` / ``cuda`` together with its
model's from ``[models]`` in config (``gpufleet.gpus``). Of the pools that could take the task
otherwise (its engine, its pool if it names one, serving its model), only those whose GPUs
fit are kept; none: 422 naming the requirement and what each pool has, so no task waits
forever for a GPU that no pool has. The task router passes the answer to the queue, which
keeps the task for those pools only (its "fit set").
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from gpufleet.api.deps import get_gpus, get_settings
from gpufleet.gpus import fitting, no_fit_message
from gpufleet.providers.catalog import GpuCatalog
from gpufleet.routing import normalize_model, pool_serves
from gpufleet.tasks import TaskSubmit


def get_catalog(request: Request) -> GpuCatalog:
    """The app's ``GpuCatalog`` (built by the lifespan)."""
    return get_gpus(request)


async def gpu_fit(request: Request, spec: TaskSubmit) -> tuple[list[str], dict[str, Any] | None]:
    """``(fit set, requirement)`` for the queue: the fit set is empty when every pool that
    could take the task fits (nothing to narrow), the requirement None when there is none.
    Raises 422 when no pool fits."""
    settings = get_settings(request)
    need = spec.gpu_requirement
    if spec.model is not None:
        need = need.merged(settings.models.get(normalize_model(spec.model)))
    if need.empty or not settings.pools:
        return [], None
    names = [
        p.name
        for p in settings.pools
        if p.engine == spec.kind
        and spec.pool in (None, p.name)
        and (spec.model is None or pool_serves(p, spec.model, gpu=False))
    ]
    offers = await get_catalog(request).offers()
    fit = fitting(names, offers, need)
    if not fit:
        own = [f for f in ("gpu_memory_gb", "gpu", "cuda") if getattr(spec, f) is not None]
        loc = ("body", own[0] if own else "model")
        msg = no_fit_message(need, names, offers)
        raise RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"}])
    requires = need.model_dump(exclude_none=True)
    return (fit if len(fit) < len(names) else []), requires
