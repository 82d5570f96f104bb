"""Trace-driven evaluation: replay a workload through ``policy.plan`` on a virtual clock.

- ``traces``: readers for the shared public traces, the seeded ``bursty`` generator, and a
  user's own trace (CSV or JSON lines, ``read_trace``);
- ``engine``: the virtual fleet (``Job``, ``SimConfig``, ``SimResult``, ``Simulator``,
  ``simulate``);
- ``baselines``: gpufleet as a replayable policy, the other scalers, the clairvoyant bound;
- ``report``: the shipped scenarios, the report's rows (``policies(pool)``), the score, the
  table and chart, ``main`` (``gpufleet simulate``);
- ``replay``: ``gpufleet simulate --trace FILE --config config.toml``: a user's traffic on
  the user's pools, with the settings that would have scored best.

Other harnesses call ``policies(pool)``, ``simulate(jobs, config, policy)``,
``clairvoyant(jobs, config)`` and ``report_table(scenario, results)`` from here.
"""

from gpufleet.scaling.sim.baselines import (
    AlwaysOn,
    ComfyLess,
    Gpufleet,
    KedaLike,
    RunPodLike,
    clairvoyant,
)
from gpufleet.scaling.sim.engine import (
    Job,
    SimConfig,
    SimPolicy,
    SimResult,
    Simulator,
    SimWorker,
    simulate,
)
from gpufleet.scaling.sim.pools import BOOT_DEFAULTS, BootTimes, boot_times_from_history
from gpufleet.scaling.sim.report import (
    Scenario,
    main,
    p95_target_s,
    policies,
    report_table,
    run_report,
    scenarios,
    score,
    table_rows,
    wait_cost_per_hour,
)
from gpufleet.scaling.sim.traces import (
    AZURE,
    DEFAULT_TRACE_DIR,
    GENTD26,
    LOAD_LATENCY,
    TraceError,
    TraceRow,
    TracesNotFound,
    bursty,
    read_azure,
    read_gentd26,
    read_load_latency_s,
    read_trace,
    traces_dir,
)

__all__ = [
    "AZURE",
    "BOOT_DEFAULTS",
    "BootTimes",
    "TraceError",
    "TraceRow",
    "boot_times_from_history",
    "read_trace",
    "table_rows",
    "DEFAULT_TRACE_DIR",
    "GENTD26",
    "LOAD_LATENCY",
    "AlwaysOn",
    "ComfyLess",
    "Gpufleet",
    "Job",
    "KedaLike",
    "RunPodLike",
    "Scenario",
    "SimConfig",
    "SimPolicy",
    "SimResult",
    "SimWorker",
    "Simulator",
    "TracesNotFound",
    "bursty",
    "clairvoyant",
    "main",
    "p95_target_s",
    "policies",
    "read_azure",
    "read_gentd26",
    "read_load_latency_s",
    "report_table",
    "run_report",
    "scenarios",
    "score",
    "simulate",
    "traces_dir",
    "wait_cost_per_hour",
]
