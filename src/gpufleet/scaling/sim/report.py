"""The report: scenarios, the rows (``policies``), the score, the table, the chart, ``main``.

``run_report`` / ``main(argv)`` are what ``gpufleet simulate`` calls. May read files and print;
must not touch Redis or a provider.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpufleet.scaling.keepalive import idle_timeout_from_cost
from gpufleet.scaling.sim.baselines import (
    AlwaysOn,
    ComfyLess,
    Gpufleet,
    KedaLike,
    RunPodLike,
    clairvoyant,
)
from gpufleet.scaling.sim.engine import Job, SimConfig, SimPolicy, SimResult, simulate
from gpufleet.scaling.sim.traces import (
    AZURE,
    GENTD26,
    LOAD_LATENCY,
    TracesNotFound,
    bursty,
    read_azure,
    read_gentd26,
    read_load_latency_s,
    traces_dir,
)
from gpufleet.scaling.snapshot import PoolView


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    jobs: list[Job]
    config: SimConfig


def _mean(r: tuple[float, float]) -> float:
    return (r[0] + r[1]) / 2.0


def _pool(name: str, engine: str, **knobs: float) -> PoolView:
    """A pool as a user who sets only name, engine, slots and max_workers gets it: the shipped
    defaults (``idle_timeout_s = "auto"``, ``target_wait_s``, wait valued at the GPU price)."""
    from gpufleet.domain import Engine, ProviderKind
    from gpufleet.settings import AUTO_IDLE_CEILING_S, PoolSpec

    create, revive = (120.0, 300.0), (45.0, 75.0)
    defaults = PoolSpec.model_fields
    base = PoolView(
        name,
        ProviderKind.novita,
        Engine(engine),
        create_boot_s=_mean(create),
        revive_boot_s=_mean(revive),
        # Assumed rates: a 24 GB GPU at $0.50/h; a stopped instance bills its 50 GB disk,
        # ~$0.005/h. Override with --price / --parked-price.
        price_per_hour=0.50,
        parked_cost_per_hour=0.005,
        idle_timeout_s=AUTO_IDLE_CEILING_S,
        idle_timeout_auto=defaults["idle_timeout_s"].default == "auto",
        target_wait_s=float(defaults["target_wait_s"].default),
        boot_timeout_s=float(defaults["boot_timeout_s"].default),
    )
    return replace(base, **knobs)  # type: ignore[arg-type]


def scenarios(
    directory: Path | None, which: Sequence[str] = ("gentd26", "azure", "bursty")
) -> list[Scenario]:
    """The shipped traces as they are, plus a seeded synthetic bursty one.

    ``directory`` None: resolved by ``traces_dir`` when a trace file is needed (a clear error
    if it is missing); a trace asked for whose file is missing is an error too.
    """
    out: list[Scenario] = []
    loads: tuple[float, ...] = ()
    if directory is None and {"gentd26", "azure"} & set(which):
        directory = traces_dir()
    if directory is not None:
        wanted = {"gentd26": GENTD26, "azure": AZURE}
        for name, file in wanted.items():
            if name in which and not (directory / file).exists():
                raise TracesNotFound(f"trace {name}: {directory / file} does not exist")
        if (directory / LOAD_LATENCY).exists():
            loads = tuple(read_load_latency_s(directory / LOAD_LATENCY))
    if directory is not None and "gentd26" in which:
        pool = _pool("comfyui", "comfyui", slots=1, max_workers=8)
        out.append(
            Scenario(
                "gentd26", read_gentd26(directory / GENTD26), SimConfig(pool, load_latency_s=loads)
            )
        )
    if directory is not None and "azure" in which:
        pool = _pool("ollama", "ollama", slots=4, max_workers=20)
        out.append(
            Scenario("azure", read_azure(directory / AZURE), SimConfig(pool, load_latency_s=loads))
        )
    if "bursty" in which:
        pool = _pool("burst", "comfyui", slots=1, max_workers=10)
        out.append(Scenario("bursty", bursty(seed=0), SimConfig(pool, load_latency_s=loads)))
    return out


def policies(pool: PoolView) -> list[SimPolicy]:
    """The rows of the report, in order: gpufleet as shipped (the pool as given: with the
    default config, idle_timeout_s = "auto"), then fixed-timeout variants, then baselines."""
    tuned = round(idle_timeout_from_cost(pool))
    default = "auto" if pool.idle_timeout_auto else f"{pool.idle_timeout_s:.0f}s"
    return [
        Gpufleet(f"gpufleet (default: idle={default})"),
        Gpufleet("gpufleet idle=600s (fixed)", 600.0),
        Gpufleet(f"gpufleet idle={tuned}s (break-even)", float(tuned)),
        AlwaysOn(),
        ComfyLess(),
        RunPodLike(),
        KedaLike(),
    ]


def wait_cost_per_hour(pool: PoolView) -> float:
    return pool.price_per_hour if pool.wait_cost_per_hour is None else pool.wait_cost_per_hour


def score(result: SimResult, pool: PoolView) -> float:
    """$ spent plus the users' waiting valued at the pool's ``wait_cost_per_hour``."""
    return result.cost_usd + sum(result.waits_s) / 3600.0 * wait_cost_per_hour(pool)


def p95_target_s(config: SimConfig) -> float:
    """The wait a policy must keep its p95 under: a mean create boot plus 10 s."""
    return _mean(config.create_boot_s) + 10.0


def _pareto(results: list[SimResult], p95_limit: float = math.inf) -> set[str]:
    """Names of the results that meet the p95 target and that no other such result beats on
    both cost and p95 wait (a cheap policy that lets work queue for hours is not a choice)."""
    meeting = [r for r in results if r.wait_pct(95) <= p95_limit]
    front = set()
    for r in meeting:
        beaten = any(
            o is not r
            and o.cost_usd <= r.cost_usd
            and o.wait_pct(95) <= r.wait_pct(95)
            and (o.cost_usd < r.cost_usd or o.wait_pct(95) < r.wait_pct(95))
            for o in meeting
        )
        if not beaten:
            front.add(r.policy)
    return front


def table_rows(scenario: Scenario, results: list[SimResult]) -> list[dict[str, Any]]:
    """The table's rows with every column, as numbers (``--json``; ``report_table`` prints
    them). ``x_clairvoyant`` is None without a clairvoyant row (a static pool has none)."""
    pool = scenario.config.pool
    bound = next((r for r in results if r.policy.startswith("e:")), None)
    limit = p95_target_s(scenario.config)
    front = _pareto([r for r in results if not r.policy.startswith("e:")], limit)
    rows = []
    for r in results:
        if r.policy.startswith("e:"):
            mark = "-"
        elif r.wait_pct(95) > limit:
            mark = "p95 missed"
        else:
            mark = "yes" if r.policy in front else "no"
        rows.append(
            {
                "policy": r.policy,
                "score_usd": score(r, pool),
                "cost_usd": r.cost_usd,
                "x_clairvoyant": r.cost_usd / bound.cost_usd if bound and bound.cost_usd else None,
                "gpu_hours": r.gpu_hours,
                "idle_gpu_hours": r.idle_gpu_hours,
                "p50_s": r.wait_pct(50),
                "p95_s": r.wait_pct(95),
                "p99_s": r.wait_pct(99),
                "boots": r.boots,
                "usd_per_succeeded": r.cost_usd / r.succeeded if r.succeeded else 0.0,
                "actions": r.actions,
                "pareto": mark,
                "jobs": r.finished,
            }
        )
    return rows


def report_table(scenario: Scenario, results: list[SimResult], targets: bool = True) -> str:
    """The markdown table; ``targets``: followed by the issue-15 targets for each gpufleet row
    (the shipped traces' scoreboard)."""
    pool = scenario.config.pool
    bound = next((r for r in results if r.policy.startswith("e:")), None)
    limit = p95_target_s(scenario.config)
    span_h = (scenario.jobs[-1].arrival_s - scenario.config.start_s) / 3600
    lines = [
        f"### {scenario.name}: {len(scenario.jobs)} jobs over "
        f"{span_h:.1f} h; pool {pool.engine}, {pool.slots} slot(s), "
        f"max_workers={pool.max_workers}, ${pool.price_per_hour:.2f}/h running, "
        f"${pool.parked_cost_per_hour:.3f}/h parked, waiting valued at "
        f"${wait_cost_per_hour(pool):.2f}/h, p95 target {limit:.0f}s",
        "",
        "| policy | score $ | $ | × clairvoyant | GPU-h | idle GPU-h | p50 s | p95 s | p99 s "
        "| boots | $/succeeded | actions | Pareto (p95 met) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table_rows(scenario, results):
        ratio = "-" if row["x_clairvoyant"] is None else f"{row['x_clairvoyant']:.2f}"
        lines.append(
            f"| {row['policy']} | {row['score_usd']:.2f} | {row['cost_usd']:.2f} | {ratio} | "
            f"{row['gpu_hours']:.1f} | {row['idle_gpu_hours']:.1f} | {row['p50_s']:.0f} | "
            f"{row['p95_s']:.0f} | {row['p99_s']:.0f} | {row['boots']} | "
            f"{row['usd_per_succeeded']:.4f} | {row['actions']} | {row['pareto']} |"
        )
    if targets and bound is not None and any(r.policy.startswith("c:") for r in results):
        lines += ["", _targets(scenario, results, bound)]
    lines.append("")
    return "\n".join(lines)


def _targets(scenario: Scenario, results: list[SimResult], bound: SimResult) -> str:
    pool, limit = scenario.config.pool, p95_target_s(scenario.config)
    baselines = [b for b in results if b.policy[:2] in ("a:", "b:", "c:", "d:")]
    runpod = next(r for r in results if r.policy.startswith("c:"))
    out = []
    for r in (r for r in results if r.policy.startswith("gpufleet")):
        ratio = r.cost_usd / bound.cost_usd
        mine = score(r, pool)
        beaten = [b.policy for b in baselines if score(b, pool) <= mine]
        vs_runpod = r.cost_usd <= runpod.cost_usd and r.wait_pct(95) <= runpod.wait_pct(95)
        pareto = r.policy in _pareto([r, *baselines], limit)
        out.append(
            f"- {r.policy}: score {mine:.2f} "
            f"({'lower than every baseline' if not beaten else 'not below ' + ', '.join(beaten)}"
            f"); cost {ratio:.2f}× clairvoyant (target ≤ 1.3: "
            f"{'met' if ratio <= 1.3 else 'missed'}); p95 {r.wait_pct(95):.0f}s vs target "
            f"{limit:.0f}s ({'met' if r.wait_pct(95) <= limit else 'missed'}); vs RunPod-like "
            f"5s: cost {r.cost_usd / runpod.cost_usd - 1:+.0%} at p95 {r.wait_pct(95):.0f}s vs "
            f"{runpod.wait_pct(95):.0f}s ({'met' if vs_runpod else 'missed'}); "
            f"Pareto front vs (a)-(d) among p95-meeting: {'yes' if pareto else 'no'}"
        )
    return "\n".join(out)


@dataclass(frozen=True, slots=True)
class Replay:
    """One replay to run: the index of its job list, the config, the policy."""

    jobs: int
    config: SimConfig
    policy: SimPolicy


_JOB_SETS: list[Sequence[Job]] = []  # a worker process's copy, sent once by the initializer


def _init_worker(job_sets: list[Sequence[Job]]) -> None:
    _JOB_SETS[:] = job_sets


def _replay(task: Replay) -> SimResult:
    return simulate(_JOB_SETS[task.jobs], task.config, task.policy)


def replay_all(
    job_sets: Sequence[Sequence[Job]],
    tasks: Sequence[Replay],
    label: str = "replaying",
    workers: int | None = None,
) -> list[SimResult]:
    """Run ``tasks`` (in parallel processes, ``workers`` = ``os.cpu_count()`` by default) and
    return their results in the order given. Each replay is deterministic (its own seeded
    RNG, its own fresh policy), so the results do not depend on how they were spread."""
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    results: list[SimResult | None] = [None] * len(tasks)
    with _progress(label, len(tasks)) as advance:
        if workers <= 1:
            _init_worker(list(job_sets))
            for i, task in enumerate(tasks):
                results[i] = _replay(task)
                advance()
        else:
            with ProcessPoolExecutor(
                workers, initializer=_init_worker, initargs=(list(job_sets),)
            ) as pool:
                futures = {pool.submit(_replay, task): i for i, task in enumerate(tasks)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    advance()
    return [r for r in results if r is not None]


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr when stderr is a terminal; nothing in a pipe."""
    if not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = (f"{label}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _chart(path: Path, runs: list[tuple[Scenario, list[SimResult]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[Scenario, list[SimResult], tuple[float, float]]] = []
    for scenario, results in runs:
        span_h = scenario.jobs[-1].arrival_s / 3600
        panels.append((scenario, results, (0.0, span_h + min(0.5, 0.1 * span_h))))
        if span_h > 72:  # a long trace gets a close-up of one busy stretch as well
            panels.append((scenario, results, (124.0, 130.0)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.0 * len(panels)), squeeze=False)
    for ax, (scenario, results, xlim) in zip(axes[:, 0], panels, strict=True):
        shown = [r for r in results if "default" in r.policy or r.policy.startswith("c:")]
        first = shown[0].series
        hours = [t / 3600 for t, _, _ in first]
        ax.step(
            hours,
            [d for _, d, _ in first],
            where="post",
            color="0.6",
            linewidth=0.6,
            label="demand (queued + running)",
        )
        for r in shown:
            ax.step(
                [t / 3600 for t, _, _ in r.series],
                [w for _, _, w in r.series],
                where="post",
                label=f"workers: {r.policy}",
                linewidth=0.8,
            )
        ax.set_xlim(*xlim)
        ax.set_title(f"{scenario.name}: demand vs workers (hours {xlim[0]:.0f}-{xlim[1]:.0f})")
        ax.set_xlabel("hours")
        ax.set_ylabel("tasks / workers")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_report(
    directory: Path | None = None,
    out_dir: Path | None = None,
    which: Sequence[str] = ("gentd26", "azure", "bursty"),
    chart: bool = True,
) -> str:
    """Run every policy on every scenario; return the markdown report (and write it + PNG).

    The replays run in parallel processes (``replay_all``); a progress bar shows on stderr
    when it is a terminal."""
    chosen = scenarios(traces_dir(directory) if directory else None, which)
    tasks = [
        Replay(i, s.config, pol) for i, s in enumerate(chosen) for pol in policies(s.config.pool)
    ]
    done = replay_all([s.jobs for s in chosen], tasks, label="replaying")
    runs: list[tuple[Scenario, list[SimResult]]] = []
    for i, scenario in enumerate(chosen):
        results = [r for task, r in zip(tasks, done, strict=True) if task.jobs == i]
        results.append(clairvoyant(scenario.jobs, scenario.config))
        runs.append((scenario, results))
    text = "\n".join(report_table(s, r) for s, r in runs)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text("# gpufleet simulate\n\n" + text)
        if chart and runs:
            _chart(out_dir / "demand_vs_workers.png", runs)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="gpufleet simulate",
        description="Replay demand through the scaling policy and other scalers. Without "
        "--trace: the shipped traces (GenTD26, Azure conv, bursty) on assumed pools. With "
        "--trace FILE: your trace on your config's pools, and the settings that would have "
        "scored best (format: docs/scaling.md).",
    )
    parser.add_argument("--traces", type=Path, help="trace directory (default: ../shared/traces)")
    parser.add_argument("--out", type=Path, help="write report.md (and the chart) here")
    parser.add_argument("--only", nargs="*", default=["gentd26", "azure", "bursty"])
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--trace", type=Path, help="your trace: CSV or JSON lines")
    parser.add_argument("--config", type=Path, help="config.toml whose pools replay --trace")
    parser.add_argument("--pool", help="pool for --trace rows that name none")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--history", type=Path, help="recorded history (JSON dump): boot times per pool"
    )
    parser.add_argument(
        "--grid",
        choices=("auto", "full", "axes"),
        default="auto",
        help="settings search for --trace: every grid point, or axis by axis",
    )
    args = parser.parse_args(argv)
    if args.trace is None:
        given = [f for f in ("config", "pool", "history") if getattr(args, f) is not None]
        if given or args.json:
            flags = ", ".join(f"--{f}" for f in [*given, *(["json"] if args.json else [])])
            parser.error(f"{flags} go with --trace FILE")
        try:
            print(run_report(args.traces, args.out, args.only, chart=not args.no_chart))
        except TracesNotFound as exc:
            print(f"gpufleet simulate: {exc}", file=sys.stderr)
            return 2
        return 0
    from gpufleet.scaling.sim.replay import run_trace  # replay builds on this module

    return run_trace(args)


if __name__ == "__main__":
    raise SystemExit(main())
