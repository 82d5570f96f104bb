"""Trace readers: the shared public traces as they are, a seeded synthetic one, and a user's own.

The public traces come from ``--traces``, ``$GPUFLEET_TRACES_DIR`` or ``../shared/traces``
beside the repository (else a clear error); ``bursty`` makes synthetic on/off traffic. May read
files; must not touch Redis or a provider.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from gpufleet.scaling.sim.engine import Job

GENTD26 = "gentd26_image_requests.csv"
LOAD_LATENCY = "gentd26_model_load_latency.csv"
AZURE = "azure_llm_2023_conv.csv"

# --- trace readers ---------------------------------------------------------------------------


# Where the shared public traces live when no directory is given: ``../shared/traces`` beside
# the repository (the checkout's parent folder).
DEFAULT_TRACE_DIR = Path(__file__).resolve().parents[4].parent / "shared" / "traces"


class TracesNotFound(FileNotFoundError):
    """No trace directory: say where we looked and how to point at one."""


def traces_dir(path: str | Path | None = None) -> Path:
    """``path``, else ``$GPUFLEET_TRACES_DIR``, else ``../shared/traces`` beside the
    repository; a clear error when the chosen directory does not exist."""
    if path:
        chosen, how = Path(path), "--traces"
    elif os.environ.get("GPUFLEET_TRACES_DIR"):
        chosen, how = Path(os.environ["GPUFLEET_TRACES_DIR"]), "$GPUFLEET_TRACES_DIR"
    else:
        chosen, how = DEFAULT_TRACE_DIR, "the default (../shared/traces beside the repository)"
    if not chosen.is_dir():
        raise TracesNotFound(
            f"trace directory {chosen} (from {how}) does not exist: pass --traces DIR or set "
            "GPUFLEET_TRACES_DIR"
        )
    return chosen


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.strip()[:26]).timestamp()


def read_gentd26(path: Path, limit: int | None = None) -> list[Job]:
    """GenTD26 text-to-image requests: arrival, exec time, base model, SUCCEED or not."""
    jobs: list[Job] = []
    with path.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if limit is not None and i >= limit:
                break
            jobs.append(
                Job(
                    _epoch(row["gmt_create"]),
                    max(1.0, float(row["exec_time_seconds"] or 1.0)),
                    row["checkpoint_model_version_id"],
                    row["predict_status"] == "SUCCEED",
                )
            )
    return _rebase(jobs)


def read_load_latency_s(path: Path) -> list[float]:
    """GenTD26 base-model load latencies, in seconds (the file has milliseconds)."""
    with path.open(newline="") as f:
        return [float(row["value"]) / 1000.0 for row in csv.DictReader(f)]


def read_azure(
    path: Path, tokens_per_s: float = 30.0, prefill_tokens_per_s: float = 3000.0
) -> list[Job]:
    """Azure LLM conversation hour: service time = prefill + generation at the given rates."""
    jobs: list[Job] = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            service = (
                int(row["ContextTokens"]) / prefill_tokens_per_s
                + int(row["GeneratedTokens"]) / tokens_per_s
            )
            jobs.append(Job(_epoch(row["TIMESTAMP"]), max(0.1, service), "llm"))
    return _rebase(jobs)


def _rebase(jobs: list[Job]) -> list[Job]:
    jobs.sort(key=lambda j: j.arrival_s)
    t0 = jobs[0].arrival_s if jobs else 0.0
    return [replace(j, arrival_s=j.arrival_s - t0) for j in jobs]


def bursty(
    seed: int = 0,
    duration_s: float = 2 * 86400.0,
    bursts_per_day: float = 12.0,
    burst_size: tuple[int, int] = (1, 60),
    burst_spread_s: float = 300.0,
    service_s: tuple[float, float] = (10.0, 60.0),
    models: int = 3,
) -> list[Job]:
    """Synthetic on/off trace: Poisson bursts, each a cluster of jobs spread over a few minutes."""
    rng = random.Random(seed)
    jobs: list[Job] = []
    t = rng.expovariate(bursts_per_day / 86400.0)
    while t < duration_s:
        model = f"m{rng.randrange(models)}"
        for _ in range(rng.randint(*burst_size)):
            arrival = t + rng.uniform(0.0, burst_spread_s)
            jobs.append(Job(arrival, rng.uniform(*service_s), model))
        t += rng.expovariate(bursts_per_day / 86400.0)
    jobs.sort(key=lambda j: j.arrival_s)
    return jobs
