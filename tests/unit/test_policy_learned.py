"""``plan`` with a pool history: work-aware scale-up and keep-alive learned from idle gaps."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpufleet.domain import Engine, ProviderKind, WorkerState
from gpufleet.scaling.actions import Create, Drain, Start, Stop
from gpufleet.scaling.history import Histogram, PoolHistory
from gpufleet.scaling.keepalive import idle_timeout_from_cost, keep_alive, park_timeout_s
from gpufleet.scaling.policy import next_wake_s, plan
from gpufleet.scaling.snapshot import Demand, PoolView, Snapshot, WorkerView

NOW = 500_000.0
S = WorkerState
AUTO = PoolView(
    "p",
    ProviderKind.novita,
    Engine.comfyui,
    max_workers=8,
    price_per_hour=0.5,
    parked_cost_per_hour=0.005,
    idle_timeout_s=3600.0,
    idle_timeout_auto=True,
    create_boot_s=200.0,
    revive_boot_s=60.0,
)


def service(seconds: float, n: int = 50) -> Histogram:
    return Histogram.from_samples([seconds] * n)


def hist(svc: float = 30.0, gaps: list[float] | None = None, rate: float = 0.0) -> PoolHistory:
    return PoolHistory(
        service_s=service(svc),
        idle_gaps_s=(Histogram.from_samples(gaps),) if gaps else (),
        arrivals_per_s=rate,
    )


def busy(wid: str, since: float = 100.0) -> WorkerView:
    return WorkerView(wid, "p", S.ready, 1, 1, f"i-{wid}", NOW - since, None, NOW - since, NOW)


def idle(wid: str, idle_s: float) -> WorkerView:
    return WorkerView(
        wid, "p", S.ready, 1, 0, f"i-{wid}", NOW - 9999, None, NOW - 9999, NOW - idle_s
    )


def stopped(wid: str) -> WorkerView:
    return WorkerView(wid, "p", S.stopped, 1, 0, f"i-{wid}", NOW - 100, None, NOW - 5000)


def snap(workers: list[WorkerView], queued: int, history: PoolHistory | None, pool=AUTO):
    in_flight = sum(w.busy_slots for w in workers)
    demand = Demand("p", ("p",), queued=queued, in_flight=in_flight)
    demands = (demand,) if queued or in_flight else ()
    return Snapshot(
        NOW, (pool,), tuple(workers), demands, history={"p": history} if history else {}
    )


def starts(actions) -> list:
    return [a for a in actions if isinstance(a, Create | Start)]


def test_no_history_covers_every_waiting_task_like_before():
    assert len(starts(plan(snap([busy("a")], queued=3, history=None)))) == 3


def test_a_busy_worker_that_frees_before_a_boot_takes_the_task():
    # one task waits; the busy worker's job (10 s jobs) ends long before a 60-200 s boot
    assert starts(plan(snap([busy("a"), stopped("s")], queued=1, history=hist(svc=10.0)))) == []


def test_a_long_queue_starts_workers_but_never_more_than_it_needs():
    actions = plan(snap([busy("a"), stopped("s")], queued=6, history=hist(svc=120.0)))
    started = starts(actions)
    assert 1 <= len(started) <= 6
    assert isinstance(started[0], Start)  # the parked worker first: the shortest boot
    reason = started[0].reason
    assert "predicted longest wait" in reason
    assert "service mean" in reason


def test_an_empty_pool_starts_at_once_whatever_the_history():
    actions = plan(snap([], queued=1, history=hist(svc=5.0)))
    assert len(starts(actions)) == 1


def test_expected_arrivals_count_as_waiting_work():
    quiet = plan(snap([busy("a", since=1.0)], queued=1, history=hist(svc=40.0)))
    burst = plan(snap([busy("a", since=1.0)], queued=1, history=hist(svc=40.0, rate=0.5)))
    assert len(starts(burst)) > len(starts(quiet))


def test_short_idle_gaps_keep_a_worker_long_gaps_park_it_at_once():
    short = keep_alive(AUTO, hist(gaps=[20.0] * 30), level=1)
    long = keep_alive(AUTO, hist(gaps=[20_000.0] * 30), level=1)
    assert 20.0 <= short.timeout_s <= 30.0  # rent 20 s < one cold start: keep over the gap
    assert long.timeout_s == 0.0  # waiting never pays: park as soon as idle
    assert "learned" in short.why
    assert "30 idle gaps" in short.why


def test_mixed_gaps_pick_the_cheapest_threshold():
    gaps = [10.0] * 60 + [5000.0] * 40
    keep = keep_alive(AUTO, hist(gaps=gaps), level=1)
    # keep 10 s gaps (rent 10 s < a 60 s revive billed + waited); never wait out the 5000 s ones
    assert 10.0 <= keep.timeout_s < 100.0


def test_too_few_gaps_fall_back_to_break_even():
    keep = keep_alive(AUTO, hist(gaps=[20.0] * 3), level=1)
    assert keep.timeout_s == pytest.approx(idle_timeout_from_cost(AUTO))
    assert "break-even" in keep.why


def test_a_fixed_idle_timeout_is_used_as_configured():
    fixed = replace(AUTO, idle_timeout_auto=False, idle_timeout_s=300.0)
    assert keep_alive(fixed, hist(gaps=[20_000.0] * 30), level=1).timeout_s == 300.0


def test_learned_timeout_parks_and_says_why():
    workers = [idle("a", idle_s=100.0)]
    actions = plan(snap(workers, queued=0, history=hist(gaps=[20_000.0] * 30)))
    assert [type(a) for a in actions] == [Drain, Stop]
    assert "learned 0s from 30 idle gaps" in actions[1].reason
    kept = plan(snap([idle("a", idle_s=10.0)], queued=0, history=hist(gaps=[20.0] * 30)))
    assert kept == []
    wake = next_wake_s(snap([idle("a", idle_s=10.0)], queued=0, history=hist(gaps=[20.0] * 30)))
    assert wake is not None
    assert NOW < wake <= NOW + 20.0


def test_parking_is_never_shorter_than_break_even():
    short_gaps = hist(gaps=[30.0] * 40 + [40.0] * 40)
    assert park_timeout_s(AUTO, short_gaps) >= park_timeout_s(AUTO, None) > 0


def hourly(rate_per_h: float, days: float = 3.0) -> PoolHistory:
    return replace(
        hist(gaps=[20.0] * 30), arrivals_by_hour=(rate_per_h,) * 24, days_observed=days
    )


def test_an_empty_pool_is_prewarmed_when_its_hour_is_busy():
    actions = plan(snap([stopped("s")], queued=0, history=hourly(600.0)))
    assert [type(a) for a in actions] == [Start]
    assert "pre-warm: 600 arrivals/h" in actions[0].reason


def test_no_prewarm_for_a_quiet_hour_or_a_short_history():
    assert starts(plan(snap([stopped("s")], queued=0, history=hourly(2.0)))) == []
    assert starts(plan(snap([stopped("s")], queued=0, history=hourly(600.0, days=1.0)))) == []
    busy_pool = plan(snap([idle("a", 1.0), stopped("s")], queued=0, history=hourly(600.0)))
    assert starts(busy_pool) == []  # only an empty pool is pre-warmed


def test_hourly_arrivals_are_averaged_over_the_days_seen():
    from gpufleet.scaling.history import HistoryBook

    book = HistoryBook()
    for day in range(3):
        for i in range(30):  # 30 arrivals in hour 9 of each day
            book.arrival("p", day * 86400.0 + 9 * 3600.0 + i)
    s = book.summary("p", 2 * 86400.0 + 10 * 3600.0)
    assert s.days_observed == pytest.approx(1.75)
    assert s.arrivals_by_hour[9] == pytest.approx(30.0)
    assert s.arrivals_by_hour[8] == 0.0
    assert s.hourly_rate_per_s(9 * 3600.0 + 5.0) == pytest.approx(30.0 / 3600.0)


def test_a_boot_source_not_seen_yet_keeps_its_ratio_to_the_one_seen():
    from gpufleet.scaling.keepalive import expected_boot_s

    fast_creates = PoolHistory(boot_s={"create": Histogram.from_samples([6.0] * 5)})
    assert expected_boot_s(AUTO, fast_creates, "create") == pytest.approx(6.0, rel=0.1)
    # revive guessed at 60 s against a 200 s create guess: creates seen at 6 s make it ~1.8 s
    assert expected_boot_s(AUTO, fast_creates, "revive") == pytest.approx(1.8, rel=0.1)
    assert park_timeout_s(AUTO, fast_creates) > 0  # parking still saves the faster revive
    assert expected_boot_s(AUTO, None, "revive") == 60.0
