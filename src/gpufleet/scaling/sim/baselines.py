"""The baselines gpufleet is held to, and gpufleet itself as a replayable policy.

(a)-(d) are simple scalers as other systems configure them; (e) ``clairvoyant`` knows the
future and is the bound. Each policy answers ``plan(snapshot)`` and ``next_wake_s`` like
``scaling.policy`` does, so the engine replays them all alike.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

from gpufleet.domain import LIVE_WORKER_STATES, WorkerState
from gpufleet.scaling import policy
from gpufleet.scaling.actions import Action, Create, Delete, Start, Stop
from gpufleet.scaling.sim.engine import Job, SimConfig, SimResult
from gpufleet.scaling.snapshot import PoolView, Snapshot, WorkerView


def _live(s: Snapshot) -> list[WorkerView]:
    return [w for w in s.workers if w.state in LIVE_WORKER_STATES]


def _idle_s(w: WorkerView, now: float) -> float:
    return now - w.idle_since if w.state is WorkerState.ready and w.idle_since is not None else -1


def _future(times: list[float], now: float) -> float | None:
    later = [t for t in times if t > now]
    return min(later) if later else None


class Gpufleet:
    """``policy.plan`` itself, on the pool as configured, or with a fixed idle timeout."""

    def __init__(self, name: str = "gpufleet", idle_timeout_s: float | None = None) -> None:
        self.name, self.idle_timeout_s = name, idle_timeout_s
        self._fixed: tuple[tuple[PoolView, ...], tuple[PoolView, ...]] | None = None

    def _pool(self, s: Snapshot) -> Snapshot:
        if self.idle_timeout_s is None:
            return s
        if self._fixed is None or self._fixed[0] != s.pools:  # the engine reuses pool views
            fixed = self.idle_timeout_s
            pools = tuple(
                replace(p, idle_timeout_s=fixed, idle_timeout_auto=False) for p in s.pools
            )
            self._fixed = (s.pools, pools)
        return replace(s, pools=self._fixed[1])

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
    first = min((j.arrival_s for j in jobs), default=0.0)
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
