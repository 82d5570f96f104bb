"""Invariants of ``policy.plan`` over generated snapshots (hypothesis).

An invariant that only speaks about some plans (those that scale up, those that park) runs as an
inner ``@given`` function inside the test, which counts the examples where the case occurred and
asserts the count is above zero afterwards: a generator that never produced the case fails the
test instead of passing it without checking anything. ``event()`` shows the same cases in
``--hypothesis-show-statistics``.
"""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import event, given, settings
from hypothesis import strategies as st

from gpufleet.domain import LIVE_WORKER_STATES as LIVE_STATES
from gpufleet.domain import Engine, ProviderKind, WorkerState
from gpufleet.scaling.actions import (
    SCALE_UP_ACTIONS,
    Create,
    Delete,
    Drain,
    MarkFailed,
    Pause,
    Start,
    Stop,
)
from gpufleet.scaling.history import Histogram, PoolHistory
from gpufleet.scaling.policy import plan
from gpufleet.scaling.snapshot import Demand, PoolView, Snapshot, WorkerView

NOW = 1_000_000.0
PROVIDERS = [ProviderKind.novita, ProviderKind.surf]


@st.composite
def pools(draw: st.DrawFn, name: str) -> PoolView:
    max_workers = draw(st.integers(0, 6))
    return PoolView(
        name,
        draw(st.sampled_from(PROVIDERS)),
        Engine.comfyui,
        slots=draw(st.integers(1, 4)),
        min_workers=draw(st.integers(0, max_workers)),
        max_workers=max_workers,
        idle_timeout_s=draw(st.sampled_from([0.0, 60.0, 600.0])),
        price_per_hour=draw(st.sampled_from([0.1, 0.5, 1.0])),
        park_timeout_s=draw(st.sampled_from([None, 0.0, 3600.0])),
        parked_cost_per_hour=0.005,
        max_step_per_tick=draw(st.integers(1, 10)),
        idle_timeout_auto=draw(st.booleans()),
        target_wait_s=draw(st.sampled_from([0.0, 60.0, 600.0])),
    )


@st.composite
def histories(draw: st.DrawFn) -> PoolHistory | None:
    """A pool's past: none at all, or service, boot and per-level idle-gap samples."""
    if draw(st.booleans()):
        return None
    seconds = st.floats(0.5, 50_000, allow_nan=False)
    return PoolHistory(
        service_s=Histogram.from_samples(draw(st.lists(seconds, max_size=30))),
        boot_s={"revive": Histogram.from_samples(draw(st.lists(seconds, max_size=5)))},
        idle_gaps_s=tuple(
            Histogram.from_samples(draw(st.lists(seconds, max_size=20)))
            for _ in range(draw(st.integers(0, 4)))
        ),
        arrivals_per_s=draw(st.sampled_from([0.0, 0.01, 1.0])),
    )


@st.composite
def workers(draw: st.DrawFn, pool: PoolView, index: int) -> WorkerView:
    state = draw(st.sampled_from(list(WorkerState)))
    ready = state in (WorkerState.ready, WorkerState.draining)
    return WorkerView(
        f"{pool.name}-w{index}",
        pool.name,
        state,
        slots=pool.slots,
        busy_slots=draw(st.integers(0, pool.slots)) if ready else 0,
        instance_id=f"i-{pool.name}-{index}",
        state_since=NOW - draw(st.floats(0, 100_000)),
        boot_started_at=NOW - draw(st.floats(0, 1200)),
        ready_since=NOW - draw(st.floats(0, 5000)) if ready else None,
        last_busy_at=NOW - draw(st.floats(0, 5000)) if ready else None,
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    ps = [draw(pools(f"p{i}")) for i in range(draw(st.integers(1, 3)))]
    ws = []
    for p in ps:
        ws += [draw(workers(p, i)) for i in range(draw(st.integers(0, 8)))]
    names = tuple(p.name for p in ps)
    dem = Demand(
        "comfyui/m",
        tuple(draw(st.lists(st.sampled_from(names), min_size=1, unique=True))),
        queued=draw(st.integers(0, 40)),
        waiting=draw(st.integers(0, 5)),
        in_flight=sum(w.busy_slots for w in ws),
    )
    history = {p.name: h for p in ps if (h := draw(histories())) is not None}
    return Snapshot(NOW, tuple(ps), tuple(ws), (dem,), history=history)


def test_never_more_than_max_workers_live():
    """Live after the actions apply: live now, minus those retired or parked, plus scale-ups."""
    scale_ups = 0

    @settings(max_examples=300, deadline=None)
    @given(snapshots())
    def check(snap: Snapshot):
        nonlocal scale_ups
        actions = plan(snap)
        gone = {a.worker_id for a in actions if isinstance(a, MarkFailed | Delete | Stop | Pause)}
        for p in snap.pools:
            live = [w for w in snap.workers if w.pool == p.name and w.state in LIVE_STATES]
            kept = sum(1 for w in live if w.id not in gone)
            added = sum(1 for a in actions if isinstance(a, SCALE_UP_ACTIONS) and a.pool == p.name)
            if added:
                scale_ups += 1
                event("a pool scaled up")
            assert added == 0 or kept + added <= p.max_workers

    check()
    assert scale_ups > 0, "no generated plan scaled a pool up: the bound was never checked"


def test_never_parks_or_deletes_a_busy_worker():
    scale_downs = with_busy_workers = 0

    @settings(max_examples=300, deadline=None)
    @given(snapshots())
    def check(snap: Snapshot):
        nonlocal scale_downs, with_busy_workers
        busy = {w.id for w in snap.workers if w.busy_slots > 0}
        for a in plan(snap):
            if isinstance(a, Stop | Pause | Delete | Drain):
                scale_downs += 1
                with_busy_workers += bool(busy)
                event("scale-down with a busy worker present" if busy else "scale-down")
                assert a.worker_id not in busy, a

    check()
    assert scale_downs > 0, "no generated plan parked, drained or deleted a worker"
    assert with_busy_workers > 0, "no such plan had a busy worker it could have picked"


@settings(max_examples=200, deadline=None)
@given(snapshots())
def test_plan_is_deterministic(snap: Snapshot):
    assert plan(snap) == plan(snap)
    assert plan(replace(snap, workers=tuple(reversed(snap.workers)))) == plan(snap)


def test_a_burst_starts_at_most_ceil_d_over_slots_workers():
    """D tasks onto an empty pool, replanned every 5 s while the boots are still pending."""
    covered = 0

    @settings(max_examples=200, deadline=None)
    @given(
        burst=st.integers(1, 200),
        slots=st.integers(1, 8),
        step=st.integers(1, 20),
        ticks=st.integers(1, 12),
        boot_ticks=st.integers(1, 15),
    )
    def check(burst, slots, step, ticks, boot_ticks):
        nonlocal covered
        starts = run_burst(burst, slots, step, ticks, boot_ticks)
        wanted = math.ceil(burst / slots)
        assert starts <= wanted
        if ticks + boot_ticks >= math.ceil(wanted / step):
            covered += 1
            event("enough ticks for the step to cover the burst")
            assert starts == wanted  # and the demand is covered once the step allows it

    check()
    assert covered > 0, "no example had enough ticks to cover its burst"


def run_burst(burst: int, slots: int, step: int, ticks: int, boot_ticks: int) -> int:
    """Creates and starts that ``plan`` asks for over ``ticks + boot_ticks`` ticks."""
    pool = PoolView(
        "p",
        ProviderKind.novita,
        Engine.comfyui,
        slots=slots,
        max_workers=10_000,
        max_step_per_tick=step,
        boot_timeout_s=10_000.0,
    )
    booting: list[WorkerView] = []
    starts = 0
    for tick in range(ticks + boot_ticks):
        now = NOW + 5.0 * tick
        snap = Snapshot(now, (pool,), tuple(booting), (Demand("k", ("p",), queued=burst),))
        actions = plan(snap)
        created = [a for a in actions if isinstance(a, Create | Start)]
        starts += len(created)
        booting += [
            WorkerView(
                f"w{len(booting) + i}",
                "p",
                WorkerState.booting,
                slots=slots,
                state_since=now,
                boot_started_at=now,
            )
            for i in range(len(created))
        ]
    return starts
