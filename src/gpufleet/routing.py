"""Which worker should serve a request for a model — a pure function of plain values.

``pick_worker`` orders the candidates; the proxy (``gpufleet.proxy.waiting``) walks
that list and takes the first slot the registry gives it, so the order *is* the
routing policy:

1. only ``ready`` workers of pools that serve the model (a pool with an empty
   ``models`` list serves any model of its engine);
2. workers with a free slot before full ones (a full worker's count may be stale,
   so it stays in the list, last);
3. model loaded (``/api/ps``) before model present (``/api/tags``) before neither;
4. most free slots first; the worker id breaks ties, so the order is stable.

Hence: if some worker has the model loaded and a free slot, the first candidate is
such a worker — the request never goes elsewhere.

No I/O, no clock, no randomness, no logging: the unit tests (tables and hypothesis
properties in ``tests/unit/test_routing.py``) call it with plain values.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

from gpufleet.domain import Worker, WorkerState
from gpufleet.gpus import GpuRequirement, no_fit_message
from gpufleet.settings import PoolSpec

LOADED, PRESENT, ABSENT = 0, 1, 2


@functools.lru_cache(maxsize=4096)  # every proxied request normalizes each pool's models
def normalize_model(name: str) -> str:
    """Ollama's canonical name: ``llama3.2`` and ``llama3.2:latest`` are one model."""
    name = name.strip()
    if not name:
        return name
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def _has(models: Iterable[str], model: str) -> bool:
    return any(normalize_model(m) == model for m in models)


def pool_serves(pool: PoolSpec, model: str, *, gpu: bool = True) -> bool:
    """True if ``pool`` is configured to serve ``model`` (empty ``models``: any model) and,
    with ``gpu``, its GPUs fit the model's requirement (``[models]``; ``gpufleet.gpus``)."""
    wanted = normalize_model(model)
    if gpu and wanted in pool.unfit_models:
        return False
    return not pool.models or _has(pool.models, wanted)


def gpu_unfit_message(
    model: str, requirements: Mapping[str, GpuRequirement], pools: Iterable[PoolSpec],
    engine: str = "ollama",
) -> str | None:
    """Why no pool serves ``model`` when the reason is its GPU requirement (``[models]``):
    some pool lists the model but none has the GPU. None when that is not the reason."""
    wanted = normalize_model(model)
    need = requirements.get(wanted)
    listing = [p for p in pools if p.engine == engine and pool_serves(p, wanted, gpu=False)]
    if need is None or not listing or any(wanted not in p.unfit_models for p in listing):
        return None
    offers = {p.name: p.known_offer for p in listing}
    return f"model {wanted!r}: " + no_fit_message(need, offers, offers)


def pools_serving(model: str, pools: Iterable[PoolSpec], engine: str = "ollama") -> list[PoolSpec]:
    """The configured pools of ``engine`` that serve ``model``, in configuration order."""
    return [p for p in pools if p.engine == engine and pool_serves(p, model)]


def model_tier(worker: Worker, model: str) -> int:
    """``LOADED`` (0), ``PRESENT`` (1) or ``ABSENT`` (2) for an already-normalized ``model``."""
    if _has(worker.models_loaded, model):
        return LOADED
    if _has(worker.models_present, model):
        return PRESENT
    return ABSENT


def pick_worker(
    model: str,
    workers: Sequence[Worker],
    pools: Mapping[str, PoolSpec] | Sequence[PoolSpec],
    *,
    engine: str = "ollama",
    exclude: Iterable[str] = (),
) -> list[Worker]:
    """Ready workers that may serve ``model``, best first (see the module docstring).

    ``pools`` maps pool name to spec (or is a list of specs); ``exclude`` holds worker
    ids not to use (e.g. one that just failed before sending a byte).
    """
    by_name = pools if isinstance(pools, Mapping) else {p.name: p for p in pools}
    wanted = normalize_model(model)
    skip = set(exclude)
    candidates = []
    for worker in workers:
        if worker.state is not WorkerState.ready or worker.id in skip:
            continue
        pool = by_name.get(worker.pool)
        if pool is None or pool.engine != engine or not pool_serves(pool, wanted):
            continue
        candidates.append(worker)
    candidates.sort(key=lambda w: (w.free_slots == 0, model_tier(w, wanted), -w.free_slots, w.id))
    return candidates
