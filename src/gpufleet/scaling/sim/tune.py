"""The settings that would have scored best: a small grid of the knobs an operator sets
(``idle_timeout_s``, ``target_wait_s``, ``min_workers``) replayed over the same trace, the
lowest score ($ + waiting valued at ``wait_cost_per_hour``) next to the configured one, as
TOML to paste into the pool's ``[[pools]]`` entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from gpufleet.domain import ProviderKind
from gpufleet.scaling.sim.baselines import Gpufleet
from gpufleet.scaling.sim.engine import Job, SimConfig, SimResult
from gpufleet.scaling.sim.pools import PoolReplay
from gpufleet.scaling.sim.report import Replay, replay_all, score
from gpufleet.scaling.snapshot import PoolView
from gpufleet.settings import AUTO_IDLE_CEILING_S

IDLE_GRID: tuple[float | Literal["auto"], ...] = ("auto", 30.0, 60.0, 120.0, 300.0, 600.0)
TARGET_WAIT_GRID: tuple[float, ...] = (15.0, 30.0, 60.0, 120.0)
MIN_WORKERS_GRID: tuple[int, ...] = (0, 1)
# "auto" searches the whole grid when it is cheap (jobs x grid points at most this many job
# replays), else axis by axis (see ``suggest``).
FULL_GRID_BUDGET = 200_000


Idle = float | Literal["auto"]
Knobs = tuple[Idle, float, int]  # idle_timeout_s, target_wait_s, min_workers


def configured_knobs(view: PoolView) -> Knobs:
    idle: Idle = "auto" if view.idle_timeout_auto else view.idle_timeout_s
    return (idle, view.target_wait_s, view.min_workers)


def with_knobs(config: SimConfig, knobs: Knobs) -> SimConfig:
    idle, target, floor = knobs
    pool = replace(
        config.pool,
        idle_timeout_s=AUTO_IDLE_CEILING_S if idle == "auto" else float(idle),
        idle_timeout_auto=idle == "auto",
        target_wait_s=target,
        min_workers=floor,
    )
    return replace(config, pool=pool)


def _label(knobs: Knobs) -> str:
    idle, target, floor = knobs
    shown = "auto" if idle == "auto" else f"{idle:g}s"
    return f"gpufleet idle={shown} target_wait={target:g}s min_workers={floor}"


def grid(view: PoolView) -> list[Knobs]:
    floors = [m for m in MIN_WORKERS_GRID if m <= view.max_workers]
    return [(i, t, m) for i in IDLE_GRID for t in TARGET_WAIT_GRID for m in floors]


@dataclass
class Search:
    """The grid points replayed so far for each pool, and their results."""

    pools: Mapping[str, PoolReplay]
    job_sets: list[list[Job]]
    seen: dict[tuple[str, Knobs], SimResult] = field(default_factory=dict)

    def run(self, points: Sequence[tuple[str, Knobs]], label: str) -> None:
        todo = list(dict.fromkeys(p for p in points if p not in self.seen))
        index = {name: i for i, name in enumerate(self.pools)}
        tasks = [
            Replay(index[name], with_knobs(self.pools[name].config, k), Gpufleet(_label(k)))
            for name, k in todo
        ]
        for point, result in zip(todo, replay_all(self.job_sets, tasks, label), strict=True):
            self.seen[point] = result

    def best(self, name: str) -> Knobs:
        """The lowest score among the points replayed for ``name``; a tie keeps the earlier
        (the configured point is seeded first)."""
        view = self.pools[name].view
        mine = [(k, r) for (n, k), r in self.seen.items() if n == name]
        return min(mine, key=lambda kr: round(score(kr[1], view), 6))[0]


def suggest(
    pools: Mapping[str, PoolReplay],
    configured: Mapping[str, SimResult],
    how: Literal["auto", "full", "axes"] = "auto",
) -> dict[str, dict[str, Any]]:
    """Per tunable pool, the grid point with the lowest score next to the configured one.

    ``full`` replays every point of the grid (6 idle timeouts x 4 wait targets x 2 floors);
    ``axes`` starts from the configured settings and replays one axis at a time, keeping the
    best value of each, until a pass changes nothing (a dozen replays instead of 48, the
    same answer when the knobs' effects are roughly independent); ``auto`` picks ``full``
    when jobs x 48 <= ``FULL_GRID_BUDGET``."""
    tunable = {n: p for n, p in pools.items() if p.spec.provider is not ProviderKind.static}
    if not tunable:
        return {}
    search = Search(tunable, [p.jobs for p in tunable.values()])
    for name, pool in tunable.items():
        search.seen[(name, configured_knobs(pool.view))] = configured[name]
    size = sum(len(p.jobs) * len(grid(p.view)) for p in tunable.values())
    method = how if how != "auto" else ("full" if size <= FULL_GRID_BUDGET else "axes")
    if method == "full":
        search.run([(n, k) for n, p in tunable.items() for k in grid(p.view)], "grid")
    else:
        current = {n: configured_knobs(p.view) for n, p in tunable.items()}
        for _ in range(3):
            before = dict(current)
            for axis, values in enumerate((IDLE_GRID, TARGET_WAIT_GRID, MIN_WORKERS_GRID)):
                points = []
                for n, p in tunable.items():
                    for v in values:
                        knobs = list(current[n])
                        knobs[axis] = v
                        if knobs[2] <= p.view.max_workers:  # type: ignore[operator]
                            points.append((n, (knobs[0], knobs[1], knobs[2])))
                search.run(points, f"settings, axis {axis + 1}/3")  # type: ignore[arg-type]
                current = {n: search.best(n) for n in tunable}
            if current == before:
                break
    out = {}
    for name, pool in tunable.items():
        mine = configured_knobs(pool.view)
        best = search.best(name)
        out[name] = _suggestion(pool, mine, configured[name], best, search.seen[(name, best)])
        out[name]["search"] = method
        out[name]["replayed"] = sum(1 for n, _ in search.seen if n == name)
    return out


def _knob_dict(knobs: Knobs) -> dict[str, Any]:
    idle, target, floor = knobs
    return {"idle_timeout_s": idle, "target_wait_s": target, "min_workers": floor}


def _measures(result: SimResult, view: PoolView) -> dict[str, float]:
    return {
        "score_usd": score(result, view),
        "cost_usd": result.cost_usd,
        "p95_s": result.wait_pct(95),
    }


def _suggestion(
    pool: PoolReplay, mine: Knobs, mine_r: SimResult, best: Knobs, best_r: SimResult
) -> dict[str, Any]:
    was, now = _measures(mine_r, pool.view), _measures(best_r, pool.view)
    return {
        "pool": pool.spec.name,
        "configured": {**_knob_dict(mine), **was},
        "suggested": {**_knob_dict(best), **now},
        "delta": {k: now[k] - was[k] for k in now},
        "changed": best != mine,
        "toml": toml_snippet(pool.spec.name, mine, best),
    }


def _toml_value(v: Any) -> str:
    if v == "auto":
        return '"auto"'
    return f"{v:g}" if isinstance(v, float) else str(v)


def toml_snippet(name: str, mine: Knobs, best: Knobs) -> str:
    """The lines to set in the pool's ``[[pools]]`` entry, each saying what it was."""
    lines = [f'# in the [[pools]] entry with name = "{name}":']
    for key, old, new in zip(_knob_dict(mine), mine, best, strict=True):
        note = "unchanged" if old == new else f"was {_toml_value(old)}"
        lines.append(f"{key} = {_toml_value(new)}  # {note}")
    return "\n".join(lines)


def suggestion_text(s: Mapping[str, Any]) -> str:
    c, b, d = s["configured"], s["suggested"], s["delta"]
    how = f"{s['replayed']} settings replayed, " + (
        "the whole grid" if s["search"] == "full" else "searched axis by axis"
    )
    if not s["changed"]:
        head = (
            f"Pool {s['pool']}: the configured settings score best ({how}): "
            f"${c['score_usd']:.2f}, cost ${c['cost_usd']:.2f}, p95 {c['p95_s']:.0f}s."
        )
    else:
        head = (
            f"Pool {s['pool']}: score ${c['score_usd']:.2f} -> ${b['score_usd']:.2f} "
            f"({d['score_usd']:+.2f}); cost ${c['cost_usd']:.2f} -> ${b['cost_usd']:.2f} "
            f"({d['cost_usd']:+.2f}); p95 {c['p95_s']:.0f}s -> {b['p95_s']:.0f}s "
            f"({d['p95_s']:+.0f}s) ({how})."
        )
    return f"{head}\n\n```toml\n{s['toml']}\n```\n"
