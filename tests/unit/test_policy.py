"""Tables over plain values for ``policy.plan``: one snapshot in, the expected actions out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpufleet.domain import Engine, ProviderKind, WorkerState
from gpufleet.scaling.actions import (
    Action,
    Adopt,
    Create,
    Delete,
    Hold,
    MarkFailed,
    Resume,
    Start,
    Stop,
)
from gpufleet.scaling.keepalive import park_timeout_s
from gpufleet.scaling.policy import backoff_delay_s, next_wake_s, plan
from gpufleet.scaling.snapshot import (
    Demand,
    GlobalBudget,
    InstanceView,
    PoolView,
    Snapshot,
    WorkerView,
)

NOW = 100_000.0
S = WorkerState


def pool(name: str = "nov", provider: ProviderKind = ProviderKind.novita, **kw: object) -> PoolView:
    base = PoolView(name, provider, Engine.comfyui, max_workers=10, price_per_hour=0.5)
    return replace(base, **kw)  # type: ignore[arg-type]


def worker(
    wid: str, state: WorkerState = S.ready, pool_name: str = "nov", **kw: object
) -> WorkerView:
    defaults: dict[str, object] = {"instance_id": f"i-{wid}", "state_since": NOW - 10}
    if state is S.ready:
        defaults |= {"ready_since": NOW - 10}
    if state in (S.provisioning, S.booting):
        defaults |= {"boot_started_at": NOW - 10}
    return WorkerView(wid, pool_name, state, **(defaults | kw))  # type: ignore[arg-type]


def demand(queued: int = 0, pools: tuple[str, ...] = ("nov",), **kw: int) -> Demand:
    return Demand("comfyui/m", pools, queued=queued, **kw)  # type: ignore[arg-type]


def snap(
    pools: list[PoolView],
    workers: list[WorkerView] | None = None,
    dem: list[Demand] | None = None,
    **kw: object,
) -> Snapshot:
    return Snapshot(NOW, tuple(pools), tuple(workers or ()), tuple(dem or ()), **kw)  # type: ignore[arg-type]


def kinds(actions: list[Action]) -> list[str]:
    return [type(a).__name__ for a in actions if not isinstance(a, Hold)]


# --- scale up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slots", "max_workers", "step", "workers", "queued", "in_flight", "creates"),
    [
        (1, 10, 10, [], 1, 0, 1),  # scale from zero in the same tick
        (1, 10, 10, [], 3, 0, 3),
        (4, 10, 10, [], 9, 0, 3),  # ceil(9 / 4)
        (1, 10, 10, [], 50, 0, 10),  # bounded by max_workers
        (1, 10, 2, [], 5, 0, 2),  # bounded by the step
        (1, 10, 10, [worker("b", S.booting)], 1, 0, 0),  # booting supply covers it
        (1, 10, 10, [worker("p", S.provisioning)], 3, 0, 2),
        (2, 10, 10, [worker("r", slots=2, busy_slots=2)], 1, 2, 1),  # in flight counts
        (1, 10, 10, [worker("r", busy_slots=1)], 0, 1, 0),
        (1, 3, 10, [worker("r", busy_slots=1), worker("s", busy_slots=1)], 5, 2, 1),
        (1, 10, 10, [worker("d", S.draining, busy_slots=0)], 1, 0, 1),  # draining is no supply
    ],
)
def test_cover_demand(slots, max_workers, step, workers, queued, in_flight, creates):
    p = pool(slots=slots, max_workers=max_workers, max_step_per_tick=step)
    actions = plan(snap([p], workers, [demand(queued, in_flight=in_flight)]))
    assert kinds(actions).count("Create") == creates
    assert all(a.reason for a in actions)


def test_proxy_request_waiting_wakes_an_empty_pool():
    actions = plan(snap([pool()], [], [demand(waiting=1)]))
    assert kinds(actions) == ["Create"]


@pytest.mark.parametrize(
    ("pools", "workers", "expected"),
    [
        # paused SURF workspace first, even when a stopped Novita instance and a cheaper pool exist
        (
            [pool("nov"), pool("surf", ProviderKind.surf, price_per_hour=2.0)],
            [worker("s1", S.stopped), worker("w1", S.paused, "surf")],
            Resume("surf", "w1", ""),
        ),
        # then a stopped Novita instance
        (
            [pool("nov"), pool("cheap", price_per_hour=0.1)],
            [worker("s1", S.stopped)],
            Start("nov", "s1", ""),
        ),
        # then a new instance in the pool with the lowest price per slot-hour
        (
            [pool("nov", price_per_hour=0.5), pool("big", price_per_hour=0.8, slots=2)],
            [],
            Create("big", ""),
        ),
        # a pool in backoff is skipped for the next one
        (
            [pool("cheap", price_per_hour=0.1, backoff_until=NOW + 60), pool("nov")],
            [],
            Create("nov", ""),
        ),
        # a backoff that has expired no longer blocks
        (
            [pool("cheap", price_per_hour=0.1, backoff_until=NOW - 1), pool("nov")],
            [],
            Create("cheap", ""),
        ),
    ],
)
def test_preference_order(pools, workers, expected):
    names = tuple(p.name for p in pools)
    actions = [
        a for a in plan(snap(pools, workers, [demand(1, pools=names)])) if not isinstance(a, Hold)
    ]
    assert len(actions) == 1
    assert replace(actions[0], reason="") == expected


def test_surf_pool_never_creates_and_holds_instead():
    p = pool("surf", ProviderKind.surf)
    actions = plan(snap([p], [], [demand(2, pools=("surf",))]))
    assert kinds(actions) == []
    assert [a.code for a in actions if isinstance(a, Hold)] == ["no_source"]


@pytest.mark.parametrize(
    ("pool_kw", "budget", "code"),
    [
        ({"max_spend_per_hour": 0.4}, GlobalBudget(), "budget"),  # one more worker: 0.5 $/h
        ({"max_spend_per_day": 10.0, "spend_today_usd": 10.0}, GlobalBudget(), "budget"),
        ({}, GlobalBudget(max_spend_per_hour=0.2), "budget"),
        ({}, GlobalBudget(max_spend_per_day=5.0, spend_today_usd=6.0), "budget"),
        (
            {"backoff_until": NOW + 30, "backoff_reason": "INSUFFICIENT_RESOURCE"},
            GlobalBudget(),
            "backoff",
        ),
        ({"max_workers": 0}, GlobalBudget(), "max_workers"),
    ],
)
def test_refused_scale_up_is_a_hold_with_the_reason(pool_kw, budget, code):
    actions = plan(snap([pool(**pool_kw)], [], [demand(1)], budget=budget))
    assert kinds(actions) == []
    holds = [a for a in actions if isinstance(a, Hold)]
    assert [h.code for h in holds] == [code]
    assert holds[0].reason


def test_budget_never_kills_running_work():
    busy = worker("r", busy_slots=1, ready_since=NOW - 5000, last_busy_at=NOW - 5000)
    actions = plan(snap([pool(max_spend_per_hour=0.01)], [busy], [demand(3, in_flight=1)]))
    assert kinds(actions) == []


def test_budget_allows_up_to_the_cap():
    actions = plan(snap([pool(max_spend_per_hour=1.0)], [], [demand(5)]))
    assert kinds(actions) == ["Create", "Create"]


def test_min_workers_are_kept():
    actions = plan(snap([pool(min_workers=2)], [worker("s1", S.stopped)], []))
    assert [replace(a, reason="") for a in actions] == [Start("nov", "s1", ""), Create("nov", "")]


# --- scale down ------------------------------------------------------------------------------


def idle(wid: str, idle_s: float, **kw: object) -> WorkerView:
    return worker(wid, ready_since=NOW - 10_000, last_busy_at=NOW - idle_s, **kw)


@pytest.mark.parametrize(
    ("provider", "workers", "min_workers", "queued", "expected"),
    [
        (ProviderKind.novita, [idle("a", 601)], 0, 0, ["Drain", "Stop"]),
        (ProviderKind.surf, [idle("a", 601)], 0, 0, ["Drain", "Pause"]),
        (ProviderKind.novita, [idle("a", 599)], 0, 0, []),  # not idle long enough
        (ProviderKind.novita, [idle("a", 601)], 1, 0, []),  # min_workers
        (ProviderKind.novita, [idle("a", 601), idle("b", 700)], 1, 0, ["Drain", "Stop"]),
        (ProviderKind.novita, [idle("a", 601)], 0, 1, []),  # demand still needs it
        (ProviderKind.novita, [idle("a", 601, busy_slots=1)], 0, 0, []),  # busy: never a victim
        (ProviderKind.novita, [worker("d", S.draining)], 0, 0, ["Stop"]),  # finish the drain
        (ProviderKind.novita, [worker("d", S.draining, busy_slots=1)], 0, 0, []),
        (ProviderKind.static, [idle("a", 10_000)], 0, 0, []),  # static capacity is fixed
    ],
)
def test_idle_tiers(provider, workers, min_workers, queued, expected):
    p = pool(provider=provider, min_workers=min_workers, idle_timeout_s=600.0)
    assert kinds(plan(snap([p], workers, [demand(queued)]))) == expected


def test_idle_clock_starts_only_once_ready():
    slow_boot = worker("a", ready_since=NOW - 5, state_since=NOW - 5, last_busy_at=None)
    assert kinds(plan(snap([pool(idle_timeout_s=60)], [slow_boot]))) == []


def test_longest_idle_is_the_victim():
    workers = [idle("young", 700), idle("old", 900)]
    actions = plan(snap([pool(min_workers=1)], workers))
    assert {a.worker_id for a in actions if isinstance(a, Stop)} == {"old"}


@pytest.mark.parametrize(
    ("provider", "parked_s", "fixed", "expected"),
    [
        (ProviderKind.novita, 3600.0, 1800.0, ["Delete"]),
        (ProviderKind.novita, 600.0, 1800.0, []),
        (ProviderKind.surf, 10**7, 1800.0, []),  # SURF workspaces are never deleted
    ],
)
def test_parked_past_park_timeout_is_deleted(provider, parked_s, fixed, expected):
    p = pool(provider=provider, park_timeout_s=fixed)
    state = S.stopped if provider is ProviderKind.novita else S.paused
    parked = worker("s", state, state_since=NOW - parked_s)
    assert kinds(plan(snap([p], [parked]))) == expected


def test_park_timeout_from_cost_is_the_break_even():
    # penalty: (180 - 60) s at ($0.50 + $0.50)/h = $0.0333; at $0.005/h parked: 6.67 h
    p = pool(parked_cost_per_hour=0.005, create_boot_s=180.0, revive_boot_s=60.0)
    assert park_timeout_s(p) == pytest.approx(24_000.0)
    assert park_timeout_s(replace(p, park_timeout_s=42.0)) == 42.0
    assert park_timeout_s(replace(p, parked_cost_per_hour=1.0)) < park_timeout_s(p)


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.0), (1, 30.0), (2, 60.0), (3, 120.0), (10, 900.0), (99, 900.0)]
)
def test_backoff_is_exponential_and_capped(failures, delay):
    assert backoff_delay_s(failures) == delay


# --- failures, orphans, leaks ----------------------------------------------------------------


@pytest.mark.parametrize("state", [S.provisioning, S.booting])
def test_boot_timeout_marks_failed_and_deletes_the_instance(state):
    stuck = worker("b", state, boot_started_at=NOW - 601)
    actions = plan(snap([pool(boot_timeout_s=600)], [stuck]))
    assert [type(a) for a in actions[:2]] == [MarkFailed, Delete]
    assert actions[1].instance_id == "i-b"


def test_boot_timeout_frees_its_demand_for_a_replacement():
    stuck = worker("b", S.booting, boot_started_at=NOW - 601)
    actions = plan(snap([pool(boot_timeout_s=600)], [stuck], [demand(1)]))
    assert kinds(actions) == ["MarkFailed", "Delete", "Create"]


def test_failed_worker_instance_is_deleted():
    assert kinds(plan(snap([pool()], [worker("f", S.failed)]))) == ["Delete"]


def test_vanished_instance_record_is_cleaned_only_when_the_list_succeeded():
    gone = worker("g", S.stopped)
    listed = snap([pool()], [gone], listed_providers=frozenset({ProviderKind.novita}))
    assert kinds(plan(listed)) == ["Delete"]
    unlisted = snap([pool()], [gone])
    assert kinds(plan(unlisted)) == []


@pytest.mark.parametrize(
    ("inst", "queued", "expected"),
    [
        (InstanceView("x", ProviderKind.novita, "gpufleet-nov-x", "nov", True), 1, Adopt),
        (InstanceView("x", ProviderKind.novita, "gpufleet-nov-x", "nov", True), 0, Delete),
        (InstanceView("x", ProviderKind.novita, "gpufleet-nov-x", "nov", False), 1, Delete),
        (InstanceView("x", ProviderKind.novita, "gpufleet-zzz-x", "", True), 1, Delete),
    ],
)
def test_orphans_are_adopted_when_healthy_and_wanted_else_deleted(inst, queued, expected):
    s = snap(
        [pool()],
        [],
        [demand(queued)],
        instances=(inst,),
        listed_providers=frozenset({ProviderKind.novita}),
    )
    actions = [a for a in plan(s) if not isinstance(a, Hold)]
    orphan = [a for a in actions if getattr(a, "instance_id", "") == "x"]
    assert [type(a) for a in orphan] == [expected]
    if expected is Adopt:
        assert kinds(actions) == ["Adopt"]  # the adopted instance covers the demand


def test_known_instances_are_not_orphans():
    w = worker("a", busy_slots=1)
    inst = InstanceView("i-a", ProviderKind.novita, "gpufleet-nov-a", "nov", True)
    s = snap(
        [pool()],
        [w],
        [demand(in_flight=1)],
        instances=(inst,),
        listed_providers=frozenset({ProviderKind.novita}),
    )
    assert plan(s) == []


def test_next_wake_is_the_earliest_timer():
    p = pool(idle_timeout_s=600, boot_timeout_s=600, park_timeout_s=3600)
    workers = [
        idle("a", 100),
        worker("b", S.booting, boot_started_at=NOW - 300),
        worker("c", S.stopped, state_since=NOW - 3000),
    ]
    assert next_wake_s(snap([p], workers)) == NOW + 300  # b's boot timeout
    assert next_wake_s(snap([p], workers[:1])) == NOW + 500
    assert next_wake_s(snap([p], [])) is None


@pytest.mark.parametrize("healthy", [True, False])
def test_unknown_surf_workspace_is_adopted_never_deleted(healthy):
    inst = InstanceView("ws1", ProviderKind.surf, "gpu-ws1", "surf", healthy)
    p = pool("surf", ProviderKind.surf)
    s = snap(
        [p],
        [],
        [demand(1, pools=("surf",))],
        instances=(inst,),
        listed_providers=frozenset({ProviderKind.surf}),
    )
    actions = plan(s)
    assert [type(a) for a in actions if not isinstance(a, Hold)] == [Adopt]
    # a running workspace covers the demand; a paused one does not (nothing else to start)
    assert any(isinstance(a, Hold) for a in actions) is not healthy
