"""Demand groups for tasks whose GPU requirement only some pools fit.

Such a task waits in its "fit set"'s queue (``store/lua``: the names of the pools that fit,
joined by ``+``, fixed at submit) and is counted among the unpooled tasks of its engine
too. ``with_fit_groups`` takes the demand the observe step built from the other counters,
moves these tasks out of the engine's group (``{engine}/*``) and adds one group per fit set
and model, naming only the pools of the set that serve the model. The policy then starts
the cheapest fitting pool per slot-hour, as for any group; a pool outside the set is never
scaled for the task, and the dispatcher's lease never hands it one (``lease.lua``).

Pure: plain values in, plain values out (no Redis, no clock).
"""

from __future__ import annotations

from collections.abc import Mapping

from gpufleet.routing import pool_serves
from gpufleet.scaling.snapshot import Demand
from gpufleet.settings import PoolSpec
from gpufleet.tasks import QueueStats

NO_MODEL = "*"


def fit_pools(fit: str) -> tuple[str, ...]:
    """``"a+b"`` -> ``("a", "b")``."""
    return tuple(n for n in fit.split("+") if n)


def with_fit_groups(
    demand: tuple[Demand, ...],
    specs: Mapping[str, PoolSpec],
    stats: QueueStats | None,
    now: float,
) -> tuple[Demand, ...]:
    """``demand`` with the fit-set tasks in groups of their own (see the module docstring)."""
    if stats is None or not (stats.queued_by_fit or stats.running_by_fit):
        return demand
    moved_queued: dict[str, int] = {}
    moved_running: dict[str, int] = {}
    groups: list[Demand] = []
    for fit in sorted(set(stats.queued_by_fit) | set(stats.running_by_fit)):
        pools = tuple(n for n in fit_pools(fit) if n in specs)
        if not pools:
            continue  # every pool of the set left the config: it fails at its queue age
        engine = specs[pools[0]].engine.value
        queued = stats.queued_by_fit.get(fit, 0)
        running = stats.running_by_fit.get(fit, 0)
        moved_queued[engine] = moved_queued.get(engine, 0) + queued
        moved_running[engine] = moved_running.get(engine, 0) + running
        oldest = stats.oldest_by_fit.get(fit)
        oldest_wait_s = max(0.0, now - oldest) if oldest else 0.0
        by_model = stats.runnable_fit_by_model.get(fit, {})
        for model, n in sorted(by_model.items()):
            serving = tuple(
                # The fit set already holds the GPU requirement (the model's too).
                p for p in pools if model == NO_MODEL or pool_serves(specs[p], model, gpu=False)
            )
            if serving:
                groups.append(
                    Demand(
                        key=f"{engine}/{model}@{fit}",
                        pools=serving,
                        queued=n,
                        oldest_wait_s=oldest_wait_s,
                    )
                )
        if running:
            groups.append(Demand(key=f"{engine}/running@{fit}", pools=pools, in_flight=running))
    out: list[Demand] = []
    for d in demand:
        engine, _, rest = d.key.partition("/")
        if rest == "*" and (engine in moved_queued or engine in moved_running):
            queued = max(0, d.queued - moved_queued.get(engine, 0))
            running = max(0, d.in_flight - moved_running.get(engine, 0))
            if queued or running or d.waiting:
                out.append(
                    Demand(
                        key=d.key,
                        pools=d.pools,
                        queued=queued,
                        waiting=d.waiting,
                        in_flight=running,
                        oldest_wait_s=d.oldest_wait_s,
                    )
                )
            continue
        out.append(d)
    return (*out, *groups)
