"""Trace-driven evaluation: replay a workload through ``policy.plan`` on a virtual clock.

The simulator builds the same ``Snapshot`` the live reconciler builds, calls the same ``plan``,
and applies the returned actions to a virtual fleet with drawn boot delays and prices. It is
event-driven: it wakes on arrivals, completions, boot ends, every ``tick_s`` while work waits,
and at the policy's own next timer (``policy.next_wake_s``), so 23 quiet nights cost nothing.

Readers take the public traces as they are (``GPUFLEET_TRACES_DIR`` or ``../shared/traces``
next to the repository); ``bursty`` makes synthetic ones. The baselines and the report live in
``simulate_report`` style functions at the bottom: ``run_report`` / ``main(argv)`` are what
``gpufleet simulate`` calls. May read files and print; must not touch Redis or a provider.
"""

from __future__ import annotations

import csv
import heapq
import math
import os
import random
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol

from gpufleet.domain import WorkerState
from gpufleet.scaling import policy
from gpufleet.scaling.actions import (
    Action,
    Create,
    Delete,
    Drain,
    Hold,
    MarkFailed,
    Pause,
    Resume,
    Start,
    Stop,
)
from gpufleet.scaling.history import HistoryBook
from gpufleet.scaling.snapshot import Demand, PoolView, Snapshot, WorkerView

GENTD26 = "gentd26_image_requests.csv"
LOAD_LATENCY = "gentd26_model_load_latency.csv"
AZURE = "azure_llm_2023_conv.csv"
LIVE = frozenset({WorkerState.booting, WorkerState.ready, WorkerState.draining})


@dataclass(frozen=True, slots=True)
class Job:
    arrival_s: float
    service_s: float
    model: str = ""
    succeeded: bool = True


# --- trace readers ---------------------------------------------------------------------------


# Where the shared public traces live when no directory is given: ``../shared/traces`` beside
# the repository (the checkout's parent folder).
DEFAULT_TRACE_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "traces"


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


# --- the virtual fleet -----------------------------------------------------------------------


class SimPolicy(Protocol):
    name: str

    def plan(self, snapshot: Snapshot) -> list[Action]: ...

    def next_wake_s(self, snapshot: Snapshot, include_due: bool = False) -> float | None: ...


@dataclass
class SimWorker:
    id: str
    state: WorkerState
    state_since: float
    boot_started_at: float | None = None
    ready_since: float | None = None
    last_busy_at: float | None = None
    busy: int = 0
    boot_gen: int = 0
    revived: bool = False
    models: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class SimConfig:
    pool: PoolView
    tick_s: float = 5.0
    create_boot_s: tuple[float, float] = (120.0, 300.0)  # Novita: 2-5 min incl. image pull
    revive_boot_s: tuple[float, float] = (45.0, 75.0)  # start of a stopped instance / resume
    load_latency_s: tuple[float, ...] = ()  # model load on a worker's first job of a model
    seed: int = 0


@dataclass
class SimResult:
    policy: str
    cost_usd: float = 0.0
    gpu_hours: float = 0.0
    idle_gpu_hours: float = 0.0
    load_gpu_hours: float = 0.0  # slot-hours spent loading a model on its first job
    waits_s: list[float] = field(default_factory=list)
    boots: int = 0
    actions: int = 0
    holds: int = 0
    finished: int = 0
    succeeded: int = 0
    series: list[tuple[float, int, int]] = field(default_factory=list)  # (t, demand, live)

    def wait_pct(self, q: float) -> float:
        if not self.waits_s:
            return 0.0
        ordered = sorted(self.waits_s)
        return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]


class Simulator:
    """One replay of ``jobs`` through ``sim_policy``; ``run()`` returns the totals."""

    def __init__(self, jobs: Sequence[Job], config: SimConfig, sim_policy: SimPolicy) -> None:
        self.jobs, self.cfg, self.policy = jobs, config, sim_policy
        self.rng = random.Random(config.seed)
        self.workers: dict[str, SimWorker] = {}
        self.queue: deque[int] = deque()
        self.events: list[tuple[float, int, str, str]] = []
        self.seq = 0
        self.now = 0.0
        self.result = SimResult(sim_policy.name)
        self.spend_today_usd = 0.0
        self.horizon_s = math.inf
        # The pool's past as the live service records it (scaling/history.py): arrivals,
        # service and boot times, idle gaps per demand level; plan() reads its summary.
        self.history = HistoryBook()
        self._due_retried: float | None = None
        self._at_last_done: tuple[float, float, float] | None = None

    def run(self) -> SimResult:
        nxt = 0
        next_plan = 0.0
        while True:
            times = [next_plan]
            if nxt < len(self.jobs):
                times.append(self.jobs[nxt].arrival_s)
            if self.events:
                times.append(self.events[0][0])
            if nxt >= len(self.jobs) and not self.events and next_plan == math.inf:
                break
            t = min(times)
            if t > self.horizon_s:
                if self.queue:
                    raise RuntimeError(f"{self.policy.name}: work still queued at t={t:.0f}s")
                break
            self._advance(t)
            while nxt < len(self.jobs) and self.jobs[nxt].arrival_s <= t:
                self.queue.append(nxt)
                self.history.arrival(self.cfg.pool.name, self.jobs[nxt].arrival_s)
                nxt += 1
            while self.events and self.events[0][0] <= t:
                self._fire(heapq.heappop(self.events))
            self._dispatch()
            snap = self._snapshot()
            self._apply(self.policy.plan(snap))
            self._dispatch()
            self._record()
            next_plan = self._next_plan(self._snapshot())
        if self._at_last_done is not None:
            # Bill every policy up to the moment its last job finished: what comes after (an
            # idle tail, parked disks until deleted or forever) is an artifact of where the
            # trace ends, and would otherwise be charged to the policies that clean up and not
            # to those that never do.
            r = self.result
            r.cost_usd, r.gpu_hours, r.idle_gpu_hours = self._at_last_done
        return self.result

    def _next_plan(self, snap: Snapshot) -> float:
        if self.queue:
            return self.now + self.cfg.tick_s
        due = self.policy.next_wake_s(snap, include_due=True)
        if due is not None and due <= self.now and due != self._due_retried:
            # A timer already past (a keep-alive that shortened since plan ran): plan again at
            # the next tick, as the live loop would; once per timer, so a worker kept for
            # min_workers does not make the replay tick forever.
            self._due_retried = due
            return self.now + self.cfg.tick_s
        wake = self.policy.next_wake_s(snap)
        if wake is None:
            return math.inf
        tick = self.cfg.tick_s
        return max(self.now + 1e-6, math.ceil(wake / tick) * tick)

    def _push(self, t: float, kind: str, ref: str) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, ref))

    def _advance(self, t: float) -> None:
        dt_h = (t - self.now) / 3600.0
        pool = self.cfg.pool
        live = sum(1 for w in self.workers.values() if w.state in LIVE)
        idle = sum(1 for w in self.workers.values() if w.state is WorkerState.ready and w.busy == 0)
        parked = sum(
            1 for w in self.workers.values() if w.state in (WorkerState.stopped, WorkerState.paused)
        )
        cost = dt_h * (live * pool.price_per_hour + parked * pool.parked_cost_per_hour)
        self.result.cost_usd += cost
        self.result.gpu_hours += dt_h * live
        self.result.idle_gpu_hours += dt_h * idle
        if int(t // 86400) != int(self.now // 86400):
            self.spend_today_usd = 0.0
        self.spend_today_usd += cost
        self.now = t
        self._record()

    def _record(self) -> None:
        live = sum(1 for w in self.workers.values() if w.state in LIVE)
        demand = len(self.queue) + sum(w.busy for w in self.workers.values())
        if not self.result.series or self.result.series[-1][1:] != (demand, live):
            self.result.series.append((self.now, demand, live))

    def _fire(self, event: tuple[float, int, str, str]) -> None:
        _, _, kind, ref = event
        w = self.workers.get(ref.split("#")[0])
        if w is None:
            return
        if kind == "ready" and w.state is WorkerState.booting and ref == f"{w.id}#{w.boot_gen}":
            self._set(w, WorkerState.ready)
            w.ready_since = self.now
            booted = self.now - (w.boot_started_at or self.now)
            source = "revive" if w.revived else "create"
            self.history.boot(self.cfg.pool.name, self.now, source, booted)
        elif kind == "done":
            w.busy -= 1
            w.last_busy_at = self.now
            held_s = float(ref.split("#")[1])
            self.history.service(self.cfg.pool.name, self.now, held_s)
            r = self.result
            self._at_last_done = (r.cost_usd, r.gpu_hours, r.idle_gpu_hours)

    def _dispatch(self) -> None:
        free = [w for w in self.workers.values() if w.state is WorkerState.ready]
        while self.queue and free:
            job = self.jobs[self.queue[0]]
            ready = [w for w in free if w.busy < self.cfg.pool.slots]
            if not ready:
                return
            w = next((w for w in ready if job.model in w.models), ready[0])
            self.queue.popleft()
            load = 0.0
            if job.model not in w.models and self.cfg.load_latency_s:
                load = self.rng.choice(self.cfg.load_latency_s)
                w.models.add(job.model)
                self.result.load_gpu_hours += load / 3600.0
            w.busy += 1
            self.result.waits_s.append(self.now - job.arrival_s)
            self.result.finished += 1
            self.result.succeeded += job.succeeded
            self._push(self.now + load + job.service_s, "done", f"{w.id}#{load + job.service_s!r}")

    def _snapshot(self) -> Snapshot:
        pool = replace(self.cfg.pool, spend_today_usd=self.spend_today_usd)
        workers = tuple(
            WorkerView(
                w.id,
                pool.name,
                w.state,
                pool.slots,
                w.busy,
                f"i-{w.id}",
                w.state_since,
                w.boot_started_at,
                w.ready_since,
                w.last_busy_at,
            )
            for w in self.workers.values()
        )
        in_flight = sum(w.busy for w in self.workers.values())
        oldest = self.now - self.jobs[self.queue[0]].arrival_s if self.queue else 0.0
        demand = Demand(pool.name, (pool.name,), len(self.queue), 0, in_flight, oldest)
        self.history.demand(pool.name, self.now, len(self.queue) + in_flight, pool.slots)
        history = {pool.name: self.history.summary(pool.name, self.now)}
        return Snapshot(self.now, (pool,), workers, (demand,), history=history)

    def _set(self, w: SimWorker, state: WorkerState) -> None:
        w.state, w.state_since = state, self.now

    def _boot(self, w: SimWorker, delay: tuple[float, float], revived: bool = False) -> None:
        self._set(w, WorkerState.booting)
        # A revived worker keeps its last ready_since while it boots, as the live registry
        # does: plan() tells a revive from a fresh create by it.
        w.boot_started_at, w.last_busy_at, w.revived = self.now, None, revived
        if not revived:
            w.ready_since = None
        w.boot_gen += 1
        self.result.boots += 1
        self._push(self.now + self.rng.uniform(*delay), "ready", f"{w.id}#{w.boot_gen}")

    def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Hold):
                self.result.holds += 1
                continue
            self.result.actions += 1
            if isinstance(a, Create):
                w = SimWorker(f"w{self.seq}-{len(self.workers)}", WorkerState.booting, self.now)
                self.seq += 1
                self.workers[w.id] = w
                self._boot(w, self.cfg.create_boot_s)
                continue
            found = self.workers.get(getattr(a, "worker_id", ""))
            if found is not None:
                self._apply_to(found, a)

    def _apply_to(self, w: SimWorker, a: Action) -> None:
        if isinstance(a, Start | Resume):
            self._boot(w, self.cfg.revive_boot_s, revived=True)
        elif isinstance(a, Drain):
            self._set(w, WorkerState.draining)
        elif isinstance(a, Stop | Pause) and w.busy == 0:  # re-checked, like apply() live
            self._set(w, WorkerState.stopped if isinstance(a, Stop) else WorkerState.paused)
            w.models.clear()
        elif isinstance(a, Delete) and w.busy == 0:
            del self.workers[w.id]
        elif isinstance(a, MarkFailed):
            self._set(w, WorkerState.failed)


def simulate(
    jobs: Sequence[Job], config: SimConfig, sim_policy: SimPolicy, horizon_s: float = 7 * 86400.0
) -> SimResult:
    """Replay ``jobs``; raises if work is still queued ``horizon_s`` after the last arrival."""
    sim = Simulator(jobs, config, sim_policy)
    last = jobs[-1].arrival_s if jobs else 0.0
    sim.horizon_s = last + horizon_s
    return sim.run()


# --- policies: ours and the baselines ---------------------------------------------------------


def _live(s: Snapshot) -> list[WorkerView]:
    return [w for w in s.workers if w.state in LIVE]


def _idle_s(w: WorkerView, now: float) -> float:
    return now - w.idle_since if w.state is WorkerState.ready and w.idle_since is not None else -1


def _future(times: list[float], now: float) -> float | None:
    later = [t for t in times if t > now]
    return min(later) if later else None


class Gpufleet:
    """``policy.plan`` itself, on the pool as configured, or with a fixed idle timeout."""

    def __init__(self, name: str = "gpufleet", idle_timeout_s: float | None = None) -> None:
        self.name, self.idle_timeout_s = name, idle_timeout_s

    def _pool(self, s: Snapshot) -> Snapshot:
        if self.idle_timeout_s is None:
            return s
        fixed = self.idle_timeout_s
        pools = tuple(replace(p, idle_timeout_s=fixed, idle_timeout_auto=False) for p in s.pools)
        return replace(s, pools=pools)

    def plan(self, snapshot: Snapshot) -> list[Action]:
        return policy.plan(self._pool(snapshot))

    def next_wake_s(self, snapshot: Snapshot, include_due: bool = False) -> float | None:
        return policy.next_wake_s(self._pool(snapshot), include_due)


class AlwaysOn:
    """(a) one worker, always on."""

    name = "a: always-on x1"

    def plan(self, snapshot: Snapshot) -> list[Action]:
        pool = snapshot.pools[0].name
        return [] if _live(snapshot) else [Create(pool, "always on")]

    def next_wake_s(self, snapshot: Snapshot, include_due: bool = False) -> float | None:
        return None


class ComfyLess:
    """(b) +1 worker when none is idle and tasks wait (cooldown 120 s); delete one when more
    than one worker is idle past 300 s. It never goes below one idle worker."""

    name = "b: ComfyLess"

    def __init__(self, cooldown_s: float = 120.0, idle_timeout_s: float = 300.0) -> None:
        self.cooldown_s, self.idle_timeout_s = cooldown_s, idle_timeout_s
        self.last_up_at = -math.inf

    def plan(self, s: Snapshot) -> list[Action]:
        pool, live, out = s.pools[0], _live(s), list[Action]()
        idle = [w for w in live if _idle_s(w, s.now) >= 0]
        queued = s.demand[0].queued if s.demand else 0
        cooled = s.now - self.last_up_at >= self.cooldown_s
        if queued and not idle and len(live) < pool.max_workers and cooled:
            out.append(Create(pool.name, "tasks wait, no idle worker"))
            self.last_up_at = s.now
        past = sorted((w for w in idle if _idle_s(w, s.now) >= self.idle_timeout_s), key=_key)
        out += [Delete(pool.name, w.id, w.instance_id, "idle") for w in past[1:]]
        return out

    def next_wake_s(self, s: Snapshot, include_due: bool = False) -> float | None:
        times = [s.now - _idle_s(w, s.now) + self.idle_timeout_s for w in _live(s)]
        return _future([*times, self.last_up_at + self.cooldown_s], s.now)


def _key(w: WorkerView) -> tuple[float, str]:
    return (w.idle_since or 0.0, w.id)


class RunPodLike:
    """(c) cover demand at once (start a stopped worker first); stop a worker idle 5 s."""

    name = "c: RunPod-like 5s idle"

    def __init__(self, idle_timeout_s: float = 5.0) -> None:
        self.idle_timeout_s = idle_timeout_s

    def plan(self, s: Snapshot) -> list[Action]:
        pool, live, out = s.pools[0], _live(s), list[Action]()
        demand = s.demand[0].total if s.demand else 0
        need = min(math.ceil(demand / pool.slots), pool.max_workers) - len(live)
        stopped = sorted(w.id for w in s.workers if w.state is WorkerState.stopped)
        for i in range(max(0, need)):
            out.append(
                Start(pool.name, stopped[i], "demand")
                if i < len(stopped)
                else Create(pool.name, "demand")
            )
        if need < 0:
            idle = [w for w in live if _idle_s(w, s.now) >= self.idle_timeout_s]
            out += [Stop(pool.name, w.id, "idle") for w in sorted(idle, key=_key)[:-need]]
        return out

    def next_wake_s(self, s: Snapshot, include_due: bool = False) -> float | None:
        times = [s.now - _idle_s(w, s.now) + self.idle_timeout_s for w in _live(s)]
        return _future(times, s.now)


class KedaLike:
    """(d) desired = ceil((queued + in flight) / slots); scale down to the highest desired of
    the last 300 s (cooldown), deleting idle workers."""

    name = "d: KEDA-like 300s"

    def __init__(self, cooldown_s: float = 300.0) -> None:
        self.cooldown_s = cooldown_s
        self.history: deque[tuple[float, int]] = deque()

    def plan(self, s: Snapshot) -> list[Action]:
        pool, live, out = s.pools[0], _live(s), list[Action]()
        desired = min(
            math.ceil((s.demand[0].total if s.demand else 0) / pool.slots), pool.max_workers
        )
        self.history.append((s.now, desired))
        while self.history and self.history[0][0] < s.now - self.cooldown_s:
            self.history.popleft()
        stable = max(d for _, d in self.history)
        out += [Create(pool.name, "queue length")] * max(0, desired - len(live))
        idle = sorted((w for w in live if _idle_s(w, s.now) >= 0), key=_key)
        extra = len(live) - stable
        out += [Delete(pool.name, w.id, w.instance_id, "cooldown over") for w in idle[:extra]]
        return out

    def next_wake_s(self, s: Snapshot, include_due: bool = False) -> float | None:
        live = len(_live(s))
        above = [t for t, d in self.history if d >= live]
        if not self.history or self.history[-1][1] >= live or not above:
            return None  # nothing to scale down, or it happens as soon as a worker idles
        return _future([max(above) + self.cooldown_s + 1e-3], s.now)


def clairvoyant(jobs: Sequence[Job], config: SimConfig) -> SimResult:
    """(e) knows every arrival and service time in advance; the bound the others are held to.

    Runs at most ``max_workers`` workers, like every policy here, and starts cold like them
    (no worker up before the fastest create boot after the first arrival). Jobs start on
    arrival while a slot of the capped fleet is free, else in arrival order as slots free up
    (an ideal FIFO queue on ``max_workers x slots`` slots with no further boot delay). Then
    worker k runs whenever at least k workers' worth of slots are busy (the "layers" of that
    concurrency profile); a gap inside a layer costs min(gap, the fastest revive), and each
    layer's first boot the fastest create. Model loads are not billed. No policy whose jobs
    start no later than in this schedule can cost less; a policy that lets jobs queue longer
    can (always-on, for one; and a policy that queues a few seconds to pack slots, as
    gpufleet's work-aware scale-up does, can come in just under it).
    """
    pool, slots = config.pool, config.pool.slots
    capacity = max(1, pool.max_workers) * slots
    first = jobs[0].arrival_s if jobs else 0.0
    # It starts cold, like every policy: no worker is up before the fastest create has booted
    # after the first arrival (it cannot rent a GPU before the trace begins).
    free: list[float] = [first + config.create_boot_s[0]] * capacity
    starts: list[tuple[float, float]] = []
    waits: list[float] = []
    for j in sorted(jobs, key=lambda j: j.arrival_s):
        slot_free = heapq.heappop(free)
        start = max(slot_free, j.arrival_s)
        heapq.heappush(free, start + j.service_s)
        starts.append((start, start + j.service_s))
        waits.append(start - j.arrival_s)
    edges = sorted([(a, 1) for a, _ in starts] + [(b, -1) for _, b in starts])
    busy, level, opened, last_end = 0, 0, dict[int, float](), dict[int, float]()
    result = SimResult("e: clairvoyant", waits_s=waits, finished=len(jobs))
    result.succeeded = sum(j.succeeded for j in jobs)
    seconds = 0.0
    for t, step in edges:
        busy += step
        want = math.ceil(busy / slots)
        for k in range(level + 1, want + 1):  # layers opening
            gap = t - last_end[k] if k in last_end else math.inf
            boot = config.revive_boot_s[0] if k in last_end else config.create_boot_s[0]
            seconds += min(gap, boot)
            result.boots += gap > boot
            opened[k] = t
        for k in range(want + 1, level + 1):  # layers closing
            seconds += t - opened.pop(k)
            last_end[k] = t
        level = want
    result.gpu_hours = seconds / 3600.0
    result.cost_usd = result.gpu_hours * pool.price_per_hour
    return result


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
    tuned = round(policy.idle_timeout_from_cost(pool))
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


def report_table(scenario: Scenario, results: list[SimResult]) -> str:
    pool = scenario.config.pool
    bound = next(r for r in results if r.policy.startswith("e:"))
    limit = p95_target_s(scenario.config)
    front = _pareto([r for r in results if not r.policy.startswith("e:")], limit)
    lines = [
        f"### {scenario.name}: {len(scenario.jobs)} jobs over "
        f"{scenario.jobs[-1].arrival_s / 3600:.1f} h; pool {pool.engine}, {pool.slots} slot(s), "
        f"max_workers={pool.max_workers}, ${pool.price_per_hour:.2f}/h running, "
        f"${pool.parked_cost_per_hour:.3f}/h parked, waiting valued at "
        f"${wait_cost_per_hour(pool):.2f}/h, p95 target {limit:.0f}s",
        "",
        "| policy | score $ | $ | × clairvoyant | GPU-h | idle GPU-h | p50 s | p95 s | p99 s "
        "| boots | $/succeeded | actions | Pareto (p95 met) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per = r.cost_usd / r.succeeded if r.succeeded else 0.0
        if r.policy.startswith("e:"):
            mark = "-"
        elif r.wait_pct(95) > limit:
            mark = "p95 missed"
        else:
            mark = "yes" if r.policy in front else "no"
        lines.append(
            f"| {r.policy} | {score(r, pool):.2f} | {r.cost_usd:.2f} | "
            f"{r.cost_usd / bound.cost_usd:.2f} | "
            f"{r.gpu_hours:.1f} | {r.idle_gpu_hours:.1f} | {r.wait_pct(50):.0f} | "
            f"{r.wait_pct(95):.0f} | {r.wait_pct(99):.0f} | {r.boots} | {per:.4f} | {r.actions} | "
            f"{mark} |"
        )
    lines += ["", _targets(scenario, results, bound), ""]
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
    """Run every policy on every scenario; return the markdown report (and write it + PNG)."""
    import time as wallclock  # progress only; the replay itself runs on the virtual clock

    runs: list[tuple[Scenario, list[SimResult]]] = []
    for scenario in scenarios(traces_dir(directory) if directory else None, which):
        results: list[SimResult] = []
        for pol in policies(scenario.config.pool):
            started = wallclock.perf_counter()
            results.append(simulate(scenario.jobs, scenario.config, pol))
            print(
                f"  {scenario.name}: {pol.name} in {wallclock.perf_counter() - started:.1f}s",
                flush=True,
            )
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

    parser = argparse.ArgumentParser(prog="gpufleet simulate", description=__doc__)
    parser.add_argument("--traces", type=Path, help="trace directory (default: ../shared/traces)")
    parser.add_argument("--out", type=Path, help="write report.md and demand_vs_workers.png here")
    parser.add_argument("--only", nargs="*", default=["gentd26", "azure", "bursty"])
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(run_report(args.traces, args.out, args.only, chart=not args.no_chart))
    except TracesNotFound as exc:
        print(f"gpufleet simulate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
