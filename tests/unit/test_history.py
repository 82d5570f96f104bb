"""The pool history the scaling policy learns from (scaling/history.py): pure arithmetic."""

from __future__ import annotations

import math

import pytest

from gpufleet.scaling import history as h


def test_buckets_cover_durations_within_a_fifth():
    for value in (0.5, 3.0, 23.0, 210.0, 3600.0, 86400.0):
        b = h.bucket_of(value)
        lower = h.bucket_upper(b - 1) if b else 0.0
        assert lower <= value < h.bucket_upper(b)
        assert abs(h.bucket_value(b) / value - 1) < 0.2
    assert h.bucket_of(0.0) == h.bucket_of(-3.0) == h.bucket_of(float("nan")) == 0
    assert h.bucket_of(math.inf) == h.MAX_BUCKET


def test_histogram_moments_and_tails():
    hist = h.Histogram.from_samples([10.0] * 50 + [100.0] * 50)
    assert hist.total == 100
    assert hist.mean() == pytest.approx(55.0, rel=0.1)
    assert hist.tail(50.0) == pytest.approx(0.5)
    assert hist.mean_min(50.0) == pytest.approx((10.0 + 50.0) / 2, rel=0.1)
    # renewal theory: E[S^2] / 2E[S] = (100 + 10000) / 2 / 55 ~ 92: long jobs dominate
    assert hist.mean_residual() == pytest.approx(10100 / 2 / 110, rel=0.15)
    assert hist.above(50.0).mean() == pytest.approx(50.0, rel=0.15)
    assert h.Histogram().mean() == h.Histogram().tail(1.0) == 0.0


def test_level_gaps_open_when_demand_falls_and_close_when_it_returns():
    opened, closed = h.step_levels({}, 0, 3, now=0.0)
    assert (opened, closed) == ({}, [])
    opened, closed = h.step_levels(opened, 3, 1, now=10.0)
    assert opened == {2: 10.0, 3: 10.0}
    opened, closed = h.step_levels(opened, 1, 2, now=70.0)
    assert closed == [(2, 60.0)]
    assert opened == {3: 10.0}
    opened, closed = h.step_levels(opened, 2, 3, now=72.0)
    assert closed == [(3, 62.0)]
    assert opened == {}
    # a gap shorter than MIN_GAP_S is not a gap a scaler could have used
    opened, _ = h.step_levels({}, 3, 2, now=100.0)
    _, closed = h.step_levels(opened, 2, 3, now=100.0 + h.MIN_GAP_S / 2)
    assert closed == []


def test_levels_are_clipped_so_state_stays_bounded():
    opened, _ = h.step_levels({}, 10_000, 0, now=0.0)
    assert len(opened) == h.LEVELS


def test_book_summarises_service_boots_gaps_and_rate():
    book = h.HistoryBook()
    for i in range(20):
        book.service("p", i * 10.0, 30.0)
        book.arrival("p", 1000.0 + i)
    book.boot("p", 5.0, "create", 200.0)
    book.boot("p", 6.0, "revive", 60.0)
    for t, d in [(0, 2), (100, 0), (400, 2), (500, 1), (520, 2)]:
        book.demand("p", float(t), d, slots=1)
    s = book.summary("p", 1020.0)
    assert s.service_s.total == 20
    assert s.service_s.mean() == pytest.approx(30.0, rel=0.1)
    assert s.boot_s["create"].mean() == pytest.approx(200.0, rel=0.1)
    assert s.gaps(1).total == 1
    assert s.gaps(1).mean() == pytest.approx(300.0, rel=0.1)
    assert s.gaps(2).total == 2  # 300 s, then 20 s
    assert s.arrivals == 20
    # a burst shows at once: 20 arrivals in the last minute, not 20 over ten minutes
    assert s.arrivals_per_s == pytest.approx(20 / 60.0, rel=0.05)


def test_older_days_weigh_less_and_a_week_is_forgotten():
    book = h.HistoryBook()
    book.service("p", 0.0, 10.0)
    assert book.summary("p", 0.0).service_s.total == 1
    assert book.summary("p", h.DAY_S).service_s.total == pytest.approx(h.DAY_DECAY)
    assert book.summary("p", h.WINDOW_DAYS * h.DAY_S).service_s.total == 0


def test_summarize_matches_the_book():
    """The live store sums per-day counts with ``summarize``; the simulator keeps a book."""
    book = h.HistoryBook()
    days: dict[int, dict[str, dict[int, float]]] = {}
    for t, v in [(10.0, 20.0), (90_000.0, 40.0), (180_000.0, 80.0)]:
        book.service("p", t, v)
        counts = days.setdefault(h.day_of(t), {}).setdefault("service", {})
        counts[h.bucket_of(v)] = counts.get(h.bucket_of(v), 0.0) + 1
    now = 200_000.0
    assert h.summarize(days, now).service_s == book.summary("p", now).service_s
