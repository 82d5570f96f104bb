"""Trace readers: the shared public traces as they are, a seeded synthetic one, and a user's own.

The public traces come from ``--traces``, ``$GPUFLEET_TRACES_DIR`` or ``../shared/traces``
beside the repository (else a clear error); ``bursty`` makes synthetic on/off traffic. May read
files; must not touch Redis or a provider.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime
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


# --- a user's own trace ----------------------------------------------------------------------

TRACE_COLUMNS = ("arrival", "service_s", "model", "pool", "kind")
REQUIRED_COLUMNS = ("arrival", "service_s")
MAX_ERRORS_SHOWN = 20


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One row of a user's trace: ``line`` is where it is in the file (1-based; a CSV's
    header is line 1), ``arrival_s`` epoch seconds."""

    line: int
    arrival_s: float
    service_s: float
    model: str = ""
    pool: str = ""
    kind: str = ""


class TraceError(ValueError):
    """A trace that cannot be replayed as written: one ``line N: problem`` per bad row."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path, self.problems = path, problems
        shown = problems[:MAX_ERRORS_SHOWN]
        more = len(problems) - len(shown)
        tail = [f"  ... and {more} more"] if more > 0 else []
        super().__init__(
            "\n".join([f"{path}: {len(problems)} problem(s):", *(f"  {p}" for p in shown), *tail])
        )


def parse_arrival(value: object) -> float:
    """Epoch seconds (a number, or a string of one), or an ISO 8601 time (a time without a
    zone is UTC). Raises ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"arrival {value!r} is not a time")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        if not text:
            raise ValueError("arrival is empty")
        try:
            seconds = float(text)
        except ValueError:
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(
                    f"arrival {text!r} is neither epoch seconds nor an ISO 8601 time"
                ) from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp()
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"arrival {value!r} is not a time (epoch seconds must be >= 0)")
    return seconds


def parse_service(value: object) -> float:
    """Seconds of work, a finite number >= 0 (a number, or a string of one)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"service_s {value!r} is not a number")
    try:
        seconds = float(value) if isinstance(value, int | float) else float(str(value).strip())
    except ValueError:
        raise ValueError(f"service_s {value!r} is not a number") from None
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"service_s {value!r} is not a finite number")
    if seconds < 0:
        raise ValueError(f"service_s {value!r} is negative")
    return seconds


def _row(line: int, fields: dict[str, object]) -> TraceRow:
    text = {}
    for name in ("model", "pool", "kind"):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} {value!r} is not a string")
        text[name] = (value or "").strip()
    return TraceRow(
        line, parse_arrival(fields.get("arrival")), parse_service(fields.get("service_s")), **text
    )


def _read_csv(path: Path) -> tuple[list[TraceRow], list[str]]:
    rows: list[TraceRow] = []
    problems: list[str] = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            found = ", ".join(header) or "nothing"
            return [], [f"line 1: header lacks column(s) {', '.join(missing)} (found: {found})"]
        reader.fieldnames = header
        for raw in reader:
            line = reader.line_num
            if None in raw:
                problems.append(f"line {line}: more fields than the header's {len(header)}")
                continue
            if any(v is None for v in raw.values()):
                problems.append(f"line {line}: fewer fields than the header's {len(header)}")
                continue
            try:
                rows.append(_row(line, dict(raw)))
            except ValueError as exc:
                problems.append(f"line {line}: {exc}")
    return rows, problems


def _read_jsonl(path: Path) -> tuple[list[TraceRow], list[str]]:
    rows: list[TraceRow] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"line {line}: not JSON ({exc.msg})")
                continue
            if not isinstance(data, dict):
                problems.append(f"line {line}: not a JSON object")
                continue
            missing = [c for c in REQUIRED_COLUMNS if c not in data]
            if missing:
                problems.append(f"line {line}: lacks field(s) {', '.join(missing)}")
                continue
            try:
                rows.append(_row(line, data))
            except ValueError as exc:
                problems.append(f"line {line}: {exc}")
    return rows, problems


def is_jsonl(path: Path) -> bool:
    """JSON lines by the name (.jsonl, .ndjson, .json), else by a first character of ``{``."""
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return True
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        for text in f:
            if text.strip():
                return text.lstrip().startswith("{")
    return False


def read_trace(path: Path | str) -> list[TraceRow]:
    """A user's trace (format: docs/scaling.md), sorted by arrival; raises ``TraceError``
    listing every bad row by line number, and for a trace with no rows. Nothing is guessed:
    a row is replayed as written or the whole trace is refused."""
    path = Path(path)
    try:
        rows, problems = _read_jsonl(path) if is_jsonl(path) else _read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(path, [f"cannot be read: {exc}"]) from exc
    if problems:
        raise TraceError(path, problems)
    if not rows:
        raise TraceError(path, ["no rows: a trace needs at least one arrival"])
    rows.sort(key=lambda r: (r.arrival_s, r.line))
    return rows
