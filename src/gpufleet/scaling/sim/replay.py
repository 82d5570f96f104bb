"""``gpufleet simulate --trace FILE --config config.toml``: a user's traffic on the user's pools.

Each row of the trace (``traces.read_trace``) goes to one configured pool (``pools.route``);
each pool is replayed on its own through the report's rows (``report.policies``: gpufleet as
configured first, then the baselines its provider allows, then the clairvoyant bound), then
through the settings grid (``tune.suggest``) to name the settings with the lowest score.
May read files and print; must not touch Redis or a provider.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from gpufleet.domain import ProviderKind
from gpufleet.scaling.sim.baselines import clairvoyant
from gpufleet.scaling.sim.engine import SimResult
from gpufleet.scaling.sim.pools import (
    REPLAY_CREDENTIALS,
    PoolReplay,
    ReplayError,
    build_pools,
    read_history_dump,
    route,
    rows_for,
)
from gpufleet.scaling.sim.report import Replay, Scenario, replay_all, report_table, table_rows
from gpufleet.scaling.sim.tune import suggest, suggestion_text

# --- the whole run -----------------------------------------------------------------------------


def replay_pools(
    pools: Mapping[str, PoolReplay], grid_search: Literal["auto", "full", "axes"] = "auto"
) -> dict[str, Any]:
    """Replay every pool that has jobs through its rows, then the grid; the JSON document
    (``--json``), from which ``render`` prints the markdown."""
    busy = {n: p for n, p in pools.items() if p.jobs}
    job_sets = [p.jobs for p in busy.values()]
    tasks = [Replay(i, p.config, pol) for i, p in enumerate(busy.values()) for pol in rows_for(p)]
    done = iter(replay_all(job_sets, tasks, "replaying"))
    results: dict[str, list[SimResult]] = {}
    for name, p in busy.items():
        results[name] = [next(done) for _ in rows_for(p)]
        if p.spec.provider is not ProviderKind.static:
            results[name].append(clairvoyant(p.jobs, p.config))
    suggestions = suggest(busy, {n: r[0] for n, r in results.items()}, grid_search)
    doc: dict[str, Any] = {"pools": []}
    for name, p in busy.items():
        scenario = Scenario(name, p.jobs, p.config)
        span_h = (p.jobs[-1].arrival_s - p.jobs[0].arrival_s) / 3600.0
        doc["pools"].append(
            {
                "name": name,
                "provider": str(p.spec.provider),
                "engine": str(p.spec.engine),
                "jobs": len(p.jobs),
                "span_h": span_h,
                "boot_times": {
                    "create_s": p.boots.create_s,
                    "revive_s": p.boots.revive_s,
                    "source": p.boot_source,
                    "note": p.boots.note,
                },
                "rows": table_rows(scenario, results[name]),
                "table": report_table(scenario, results[name], targets=False),
                "suggestion": suggestions.get(name),
            }
        )
    doc["idle_pools"] = [n for n in pools if n not in busy]
    return doc


def render(doc: Mapping[str, Any], trace: str) -> str:
    """The markdown report of ``replay_pools``' document."""
    out = [f"# gpufleet simulate --trace {trace}", ""]
    for pool in doc["pools"]:
        boots = pool["boot_times"]
        out += [
            f"Pool {pool['name']} ({pool['provider']}, {pool['engine']}): {pool['jobs']} jobs; "
            f"boot times: {boots['note']} ({boots['source']}).",
            "",
            pool["table"],
        ]
        if pool["suggestion"] is not None:
            out.append(suggestion_text(pool["suggestion"]))
        else:
            out.append(
                f"Pool {pool['name']}: a static pool's capacity is its URLs; nothing to tune.\n"
            )
    if doc["idle_pools"]:
        out.append(f"No rows for pool(s) {', '.join(doc['idle_pools'])}: not replayed.\n")
    return "\n".join(out)


def json_document(doc: Mapping[str, Any], trace: str) -> str:
    """``--json``: the document without the markdown tables, as one JSON object."""
    pools = [{k: v for k, v in p.items() if k != "table"} for p in doc["pools"]]
    return json.dumps({"trace": trace, "pools": pools, "idle_pools": doc["idle_pools"]}, indent=2)


def run_trace(args: Any) -> int:
    """``main`` with ``--trace``: 0, or 2 with every problem on stderr."""
    import sys

    from gpufleet.errors import ConfigError
    from gpufleet.scaling.sim.traces import TraceError, read_trace
    from gpufleet.settings import load_settings

    try:
        rows = read_trace(args.trace)
        # A replay calls no provider: credentials the config would require are stood in for
        # (only where the config and environment give none; never used, never printed).
        settings = load_settings(args.config, defaults=REPLAY_CREDENTIALS)
        if not settings.pools:
            where = args.config or "the default config (GPUFLEET_CONFIG or ./config.toml)"
            raise ReplayError([f"no pools in {where}: pass --config with [[pools]]"])
        histories = read_history_dump(args.history) if args.history else None
        pools = build_pools(settings, histories)
        route(rows, pools, args.pool)
    except TraceError as exc:
        print(f"gpufleet simulate: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, ReplayError) as exc:
        print(f"gpufleet simulate: {args.trace}:\n{exc}", file=sys.stderr)
        return 2
    try:
        doc = replay_pools(pools, args.grid)
    except RuntimeError as exc:  # work still queued a week after the last arrival
        print(f"gpufleet simulate: {args.trace}: the replay cannot finish: {exc}", file=sys.stderr)
        return 2
    text = render(doc, str(args.trace))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text)
        (args.out / "report.json").write_text(json_document(doc, str(args.trace)) + "\n")
    print(json_document(doc, str(args.trace)) if args.json else text)
    return 0
