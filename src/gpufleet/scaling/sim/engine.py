"""The virtual fleet: replay jobs through a policy on a virtual clock.

The simulator builds the same ``Snapshot`` the live reconciler builds, calls the same ``plan``,
and applies the returned actions to a virtual fleet with drawn boot delays and prices. It is
event-driven: it wakes on arrivals, completions, boot ends, every ``tick_s`` while work waits,
and at the policy's own next timer (``policy.next_wake_s``), so 23 quiet nights cost nothing.
Must not touch Redis or a provider.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from gpufleet.domain import LIVE_WORKER_STATES, PARKED_WORKER_STATES, WorkerState
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
from gpufleet.scaling.history import HistoryBook, PoolHistory
from gpufleet.scaling.snapshot import Demand, GlobalBudget, PoolView, Snapshot, WorkerView


@dataclass(frozen=True, slots=True)
class Job:
    arrival_s: float
    service_s: float
    model: str = ""
    succeeded: bool = True


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
    # The WorkerView last built for this worker; None once any field plan() sees changed.
    view: WorkerView | None = None


@dataclass(frozen=True, slots=True)
class SimConfig:
    pool: PoolView
    tick_s: float = 5.0
    create_boot_s: tuple[float, float] = (120.0, 300.0)  # Novita: 2-5 min incl. image pull
    revive_boot_s: tuple[float, float] = (45.0, 75.0)  # start of a stopped instance / resume
    load_latency_s: tuple[float, ...] = ()  # model load on a worker's first job of a model
    seed: int = 0
    # Workers the pool has before the first arrival: a SURF pool's paused workspaces (it can
    # resume them, never create one), a static pool's always-on URLs.
    initial_paused: int = 0
    initial_ready: int = 0
    # The replay's clock starts here (the first arrival of a user's trace, so nothing bills
    # before it); the shipped traces start at 0.
    start_s: float = 0.0
    # The [scaling] caps; the spend it counts is this replay's (one pool per replay).
    budget: GlobalBudget = GlobalBudget()


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
        self.now = config.start_s
        self.result = SimResult(sim_policy.name)
        self.spend_today_usd = 0.0
        self.horizon_s = math.inf
        # The pool's past as the live service records it (scaling/history.py): arrivals,
        # service and boot times, idle gaps per demand level; plan() reads its summary.
        self.history = HistoryBook()
        self._due_retried: float | None = None
        self._at_last_done: tuple[float, float, float] | None = None
        self._pool_view: tuple[float, PoolView] | None = None  # (spend it was built for, view)
        self._views: tuple[WorkerView, ...] | None = None  # every worker's view, until a change
        for state, count in (
            (WorkerState.paused, config.initial_paused),
            (WorkerState.ready, config.initial_ready),
        ):
            for _ in range(count):
                # ready_since set: a paused workspace is revived, not created (plan() tells
                # them apart by it); a static worker counts idle from the start.
                w = SimWorker(
                    f"w{self.seq}-{len(self.workers)}",
                    state,
                    config.start_s,
                    ready_since=config.start_s,
                )
                self.seq += 1
                self.workers[w.id] = w

    def run(self) -> SimResult:
        nxt = 0
        next_plan = self.now
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
            # Nothing was recorded in the history since the first snapshot of this step, and
            # dispatching does not change the demand level: reuse its history and pool.
            next_plan = self._next_plan(self._snapshot(snap))
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
        live = idle = parked = 0
        for w in self.workers.values():
            if w.state in LIVE_WORKER_STATES:
                live += 1
                idle += w.state is WorkerState.ready and w.busy == 0
            elif w.state in PARKED_WORKER_STATES:
                parked += 1
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
        live = busy = 0
        for w in self.workers.values():
            live += w.state in LIVE_WORKER_STATES
            busy += w.busy
        demand = len(self.queue) + busy
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
            self._touch(w)
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
            self._touch(w)
            w.busy += 1
            self.result.waits_s.append(self.now - job.arrival_s)
            self.result.finished += 1
            self.result.succeeded += job.succeeded
            self._push(self.now + load + job.service_s, "done", f"{w.id}#{load + job.service_s!r}")

    def _snapshot(self, same_step: Snapshot | None = None) -> Snapshot:
        """What plan() sees now. ``same_step``: an earlier snapshot of this very step, whose
        pool and history still hold (the demand level was recorded by it)."""
        in_flight = 0
        for w in self.workers.values():
            in_flight += w.busy
        if same_step is not None:
            pool, history = same_step.pools[0], same_step.history
        else:
            pool = self._pool()
            self.history.demand(pool.name, self.now, len(self.queue) + in_flight, pool.slots)
            history = _LazyHistory(self.history, pool.name, self.now)
        oldest = self.now - self.jobs[self.queue[0]].arrival_s if self.queue else 0.0
        demand = Demand(pool.name, (pool.name,), len(self.queue), 0, in_flight, oldest)
        budget = self.cfg.budget
        if budget.max_spend_per_day is not None or budget.max_spend_per_hour is not None:
            budget = replace(budget, spend_today_usd=pool.spend_today_usd)
        workers = self._worker_views(pool)
        return Snapshot(self.now, (pool,), workers, (demand,), budget=budget, history=history)

    def _pool(self) -> PoolView:
        spend = self.spend_today_usd
        if self._pool_view is None or self._pool_view[0] != spend:
            self._pool_view = (spend, replace(self.cfg.pool, spend_today_usd=spend))
        return self._pool_view[1]

    def _worker_views(self, pool: PoolView) -> tuple[WorkerView, ...]:
        if self._views is None:
            views = []
            for w in self.workers.values():
                if w.view is None:
                    w.view = WorkerView(
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
                views.append(w.view)
            self._views = tuple(views)
        return self._views

    def _touch(self, w: SimWorker) -> None:
        """``w`` is about to change: its view, and the tuple of views, are rebuilt."""
        w.view, self._views = None, None

    def _set(self, w: SimWorker, state: WorkerState) -> None:
        self._touch(w)
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
                self._views = None
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
            self._views = None
        elif isinstance(a, MarkFailed):
            self._set(w, WorkerState.failed)


class _LazyHistory(Mapping[str, PoolHistory]):
    """``Snapshot.history`` for the one simulated pool: the summary is built on first use
    (the baselines never read it) and kept for the step."""

    def __init__(self, book: HistoryBook, pool: str, now: float) -> None:
        self._book, self._pool, self._now = book, pool, now
        self._summary: PoolHistory | None = None

    def __getitem__(self, key: str) -> PoolHistory:
        if key != self._pool:
            raise KeyError(key)
        if self._summary is None:
            self._summary = self._book.summary(self._pool, self._now)
        return self._summary

    def __iter__(self) -> Iterator[str]:
        return iter((self._pool,))

    def __len__(self) -> int:
        return 1


def simulate(
    jobs: Sequence[Job], config: SimConfig, sim_policy: SimPolicy, horizon_s: float = 7 * 86400.0
) -> SimResult:
    """Replay ``jobs``; raises if work is still queued ``horizon_s`` after the last arrival."""
    sim = Simulator(jobs, config, sim_policy)
    last = jobs[-1].arrival_s if jobs else 0.0
    sim.horizon_s = last + horizon_s
    return sim.run()
