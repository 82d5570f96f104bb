"""A user's pools for a replay: built from config.toml as the reconciler builds them, boot
times per provider (or from recorded history), and each trace row routed to its pool.

May read files; must not touch Redis or a provider.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpufleet.domain import Engine, ProviderKind
from gpufleet.scaling.history import Histogram, PoolHistory, assemble
from gpufleet.scaling.sim.baselines import Gpufleet
from gpufleet.scaling.sim.engine import Job, SimConfig, SimPolicy
from gpufleet.scaling.sim.report import policies
from gpufleet.scaling.sim.traces import TraceRow
from gpufleet.scaling.snapshot import GlobalBudget, PoolView
from gpufleet.settings import PoolSpec, Settings

# What a stopped Novita instance bills per GB of root disk and hour: the reconciler's
# ``NOVITA_DISK_USD_PER_GB_HOUR`` (scaling/accounting.py, re-exported by scaling/reconciler.py),
# not imported here because the accounting reaches Redis and the simulator needs none; a test
# keeps the two equal.
NOVITA_DISK_USD_PER_GB_HOUR = 0.0001


@dataclass(frozen=True, slots=True)
class BootTimes:
    """Boot durations drawn uniformly from a (low, high) range, in seconds; None: the pool
    never boots that way."""

    create_s: tuple[float, float] | None
    revive_s: tuple[float, float] | None
    note: str


# The documented defaults per provider (docs/scaling.md, "Replay your own traffic"), used when
# no recorded history (--history) says otherwise.
BOOT_DEFAULTS: Mapping[ProviderKind, BootTimes] = {
    ProviderKind.novita: BootTimes(
        (120.0, 300.0), (45.0, 75.0), "create (image pull included) 120-300 s, start 45-75 s"
    ),
    ProviderKind.simulated: BootTimes(
        (120.0, 300.0), (45.0, 75.0), "as Novita: create 120-300 s, start 45-75 s"
    ),
    ProviderKind.surf: BootTimes(
        None, (45.0, 75.0), "resume of a paused workspace 45-75 s; workspaces are never created"
    ),
    ProviderKind.static: BootTimes(None, None, "always on: no boots"),
}

REPLAY_CREDENTIALS = {
    "providers": {
        "novita": {"api_key": "unused-by-a-replay"},
        "surf": {"api_token": "unused-by-a-replay"},
    }
}


class ReplayError(ValueError):
    """The trace and the config do not fit together: one line per problem (exit 2)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:20]
        more = [f"  ... and {len(problems) - 20} more"] if len(problems) > 20 else []
        super().__init__("\n".join([*(f"  {p}" for p in shown), *more]))


# --- boot times from recorded history -------------------------------------------------------


def boot_times_from_history(
    history: PoolHistory, min_samples: float = 3.0
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """(create, revive) boot ranges from a pool's recorded boots: the 10th to the 90th
    percentile of each source's histogram; None for a source with fewer than ``min_samples``
    boots (the provider's default is used then)."""
    out: list[tuple[float, float] | None] = []
    for source in ("create", "revive"):
        h = history.boot_s.get(source)
        if h is None or h.total < min_samples:
            out.append(None)
        else:
            out.append((h.quantile(0.1), max(h.quantile(0.1), h.quantile(0.9))))
    return out[0], out[1]


def read_history_dump(path: Path) -> dict[str, PoolHistory]:
    """A JSON dump of recorded history: ``{"pools": {name: {metric: {bucket: weight}}}}``
    with the metric names of ``scaling.history.summarize`` (``boot:create``, ``boot:revive``,
    ``service``, ``gap:1``, ...). Only the boot times are used by the replay."""
    try:
        data = json.loads(path.read_text())
        pools = data["pools"]
        out = {}
        for name, metrics in pools.items():
            hists = {
                metric: Histogram.of({int(b): float(w) for b, w in counts.items()})
                for metric, counts in metrics.items()
            }
            out[str(name)] = assemble(hists)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReplayError([f"--history {path}: not a history dump ({exc})"]) from exc


# --- the user's pools -------------------------------------------------------------------------


@dataclass
class PoolReplay:
    """One configured pool, the rows routed to it, and everything its replays need."""

    spec: PoolSpec
    config: SimConfig
    boots: BootTimes
    boot_source: str
    jobs: list[Job] = field(default_factory=list)

    @property
    def view(self) -> PoolView:
        return self.config.pool


def pool_view(settings: Settings | None, pool: PoolSpec, boots: BootTimes) -> PoolView:
    """``PoolView.from_spec`` as the reconciler builds it (parked price, budgets, park
    timeout, step), with the boot means the policy expects."""
    create = boots.create_s or boots.revive_s or (0.0, 0.0)
    revive = boots.revive_s or create
    parked = (
        pool.rootfs_gb * NOVITA_DISK_USD_PER_GB_HOUR
        if pool.provider is ProviderKind.novita
        else 0.0
    )
    view = PoolView.from_spec(
        pool,
        parked_cost_per_hour=parked,
        max_step_per_tick=settings.scaling.max_step_per_tick if settings else 10,
        max_spend_per_hour=pool.max_spend_per_hour,
        max_spend_per_day=pool.max_spend_per_day,
        park_timeout_s=pool.park_timeout_s,
        create_boot_s=sum(create) / 2.0,
        revive_boot_s=sum(revive) / 2.0,
    )
    return view


def build_pools(
    settings: Settings, histories: Mapping[str, PoolHistory] | None = None
) -> dict[str, PoolReplay]:
    """Every configured pool, ready to replay; ``ReplayError`` for a pool that cannot be
    (no price for a rented GPU: the simulator does not ask the provider)."""
    problems, out = [], {}
    for spec in settings.pools:
        if spec.price_per_hour is None and spec.provider is not ProviderKind.static:
            problems.append(
                f"pool {spec.name}: price_per_hour is not set; live, gpufleet takes the "
                f"{spec.provider} price from the provider, which a replay does not ask: set "
                "price_per_hour in its [[pools]] entry"
            )
            continue
        boots, source = BOOT_DEFAULTS[spec.provider], f"defaults for {spec.provider}"
        recorded = (histories or {}).get(spec.name)
        if recorded is not None and spec.provider is not ProviderKind.static:
            create, revive = boot_times_from_history(recorded)
            if create or revive:
                boots = BootTimes(
                    create if create and boots.create_s else boots.create_s,
                    revive or boots.revive_s,
                    "from recorded history (10th-90th percentile)",
                )
                source = "recorded history"
        view = pool_view(settings, spec, boots)
        if spec.price_per_hour is None:  # static: the provider's price is 0 unless set
            view = replace(view, price_per_hour=0.0)
        create = boots.create_s or boots.revive_s or (0.0, 0.0)
        config = SimConfig(
            view,
            create_boot_s=create,
            revive_boot_s=boots.revive_s or create,
            initial_paused=spec.max_workers if spec.provider is ProviderKind.surf else 0,
            initial_ready=len(spec.urls) if spec.provider is ProviderKind.static else 0,
            budget=GlobalBudget(
                settings.scaling.max_spend_per_hour, settings.scaling.max_spend_per_day
            ),
        )
        out[spec.name] = PoolReplay(spec, config, boots, source)
    if problems:
        raise ReplayError(problems)
    return out


def _serves(spec: PoolSpec, row: TraceRow) -> bool:
    return (not row.kind or row.kind == spec.engine) and (
        not row.model or not spec.models or row.model in spec.models
    )


def route(
    rows: Sequence[TraceRow], pools: Mapping[str, PoolReplay], default_pool: str | None = None
) -> None:
    """Put each row's job into its pool: the pool the row names, else ``default_pool``
    (--pool), else the only pool that serves the row's kind (and model). ``ReplayError``
    lists every row that fits no pool, by line number. Arrivals are rebased to the UTC
    midnight before the first, so the replay keeps the time of day."""
    problems: list[str] = []
    if default_pool is not None and default_pool not in pools:
        problems.append(f"--pool {default_pool}: no such pool (configured: {_names(pools)})")
    kinds = {e.value for e in Engine}
    first = min(r.arrival_s for r in rows)
    t0 = math.floor(first / 86400.0) * 86400.0
    routed: list[tuple[PoolReplay, TraceRow]] = []
    for row in rows:
        if row.kind and row.kind not in kinds:
            problems.append(f"line {row.line}: kind {row.kind!r} is not one of {sorted(kinds)}")
            continue
        name = row.pool or default_pool
        if name:
            chosen = pools.get(name)
            if chosen is None:
                if row.pool:  # an unknown --pool is reported once, above
                    problems.append(
                        f"line {row.line}: pool {name!r} is not configured ({_names(pools)})"
                    )
                continue
            if not _serves(chosen.spec, row):
                problems.append(
                    f"line {row.line}: pool {name} ({chosen.spec.engine}, models "
                    f"{chosen.spec.models or 'any'}) does not serve kind {row.kind or '-'} "
                    f"model {row.model or '-'}"
                )
                continue
        else:
            fits = [p for p in pools.values() if _serves(p.spec, row)]
            if len(fits) != 1:
                what = f"kind {row.kind}" if row.kind else "no kind"
                why = "no pool serves it" if not fits else f"{len(fits)} pools could serve it"
                problems.append(
                    f"line {row.line}: {what}, model {row.model or '-'}: {why}; name the pool "
                    "in a pool column or pass --pool"
                )
                continue
            chosen = fits[0]
        routed.append((chosen, row))
    problems += _never_run(routed)
    if problems:
        raise ReplayError(problems)
    for pool, row in routed:
        pool.jobs.append(Job(row.arrival_s - t0, row.service_s, row.model))
    for pool in pools.values():
        pool.config = replace(pool.config, start_s=first - t0)


def _never_run(routed: list[tuple[PoolReplay, TraceRow]]) -> list[str]:
    """Rows routed to a pool that can never run them (a rented pool with max_workers = 0)."""
    problems = []
    for pool in {id(p): p for p, _ in routed}.values():
        if pool.spec.provider is not ProviderKind.static and pool.spec.max_workers < 1:
            lines = [r.line for p, r in routed if p is pool]
            problems.append(
                f"pool {pool.spec.name} has max_workers = 0: its rows (lines "
                f"{_lines(lines)}) would never run"
            )
    return problems


def _lines(lines: list[int]) -> str:
    return ", ".join(map(str, lines[:10])) + (
        f" and {len(lines) - 10} more" if len(lines) > 10 else ""
    )


def _names(pools: Mapping[str, Any]) -> str:
    return ", ".join(pools) or "none"


def rows_for(pool: PoolReplay) -> list[SimPolicy]:
    """The report's rows that make sense for the pool's provider: every baseline creates
    instances, so a SURF pool gets the gpufleet rows only and a static pool its one row."""
    rows = policies(pool.view)
    first = rows[0]
    assert isinstance(first, Gpufleet)
    rows[0] = Gpufleet(first.name.replace("(default:", "(as configured:"))
    if pool.spec.provider is ProviderKind.static:
        return rows[:1]
    if not pool.view.can_create:
        return [r for r in rows if isinstance(r, Gpufleet)]
    return rows
