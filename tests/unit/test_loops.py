"""``gpufleet.loops``: background loops tick on one grid per process, so that an idle server
wakes once for all of them; uvicorn's housekeeping tick is on the same grid and a signal
still stops the server at once."""

from __future__ import annotations

import asyncio
import signal

import pytest
import uvicorn

from gpufleet import loops, server
from gpufleet.loops import run_periodically, until_next_tick


@pytest.mark.parametrize(
    ("now", "interval", "expected"),
    [
        (10.0, 1.0, 0.3),  # next grid point 10.3
        (10.29, 1.0, 0.01),
        (10.3, 1.0, 1.0),  # on a grid point: the next one, never 0
        (10.31, 5.0, 4.99),  # grid 0.3 + 5k: next 15.3
        (-2.0, 1.0, 0.3),
    ],
)
def test_until_next_tick_is_the_next_point_of_the_phase_grid(
    now: float, interval: float, expected: float
) -> None:
    assert until_next_tick(interval, now, phase=0.3) == pytest.approx(expected)


def test_loops_of_one_and_five_seconds_tick_together() -> None:
    """Every 5 s tick is also a 1 s tick: one wakeup serves both."""
    phase = 0.618
    for start in (0.0, 3.7, 1234.5678):
        five = start + until_next_tick(5.0, start, phase)
        one = five - 1.0 + until_next_tick(1.0, five - 1.0, phase)
        assert one == pytest.approx(five)
        assert (five - phase) / 5.0 == pytest.approx(round((five - phase) / 5.0))


async def test_run_periodically_ticks_at_once_then_on_the_grid_and_sooner_on_wake() -> None:
    loop = asyncio.get_running_loop()
    stop, wake = asyncio.Event(), asyncio.Event()
    interval = 0.4
    ticks: list[float] = []

    async def tick() -> None:
        ticks.append(loop.time())
        if len(ticks) == 2:
            wake.set()  # wakes the loop at once, off the grid
        if len(ticks) == 4:
            stop.set()

    await asyncio.wait_for(run_periodically("t", tick, interval, stop, wake=wake), 10)
    assert len(ticks) == 4
    assert ticks[2] - ticks[1] < interval / 2  # the wake did not wait for the grid
    for on_grid in (ticks[1], ticks[3]):  # timers are never early, and seldom 0.1 s late
        offset = (on_grid - loops.TICK_PHASE) % interval
        assert offset < 0.1 or offset > interval - 1e-6


async def test_a_failing_tick_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loops, "until_next_tick", lambda *_a, **_k: 0.001)
    stop = asyncio.Event()
    calls = 0

    async def tick() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("one bad record")
        stop.set()

    await asyncio.wait_for(run_periodically("t", tick, 1.0, stop), 10)
    assert calls == 2
    assert "loop t: tick failed; continuing" in caplog.text


async def test_the_server_tick_stops_at_once_on_a_signal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn's housekeeping waits for the next grid point; SIGTERM wakes it at once."""
    monkeypatch.setattr(server, "until_next_tick", lambda *_a, **_k: 3600.0)
    exits: list[str] = []
    config = uvicorn.Config(lambda *_a: None, log_config=None)
    graceful = server.graceful_server_class()(config, on_exit=lambda: exits.append("exit"))
    main = asyncio.create_task(graceful.main_loop())
    await asyncio.sleep(0.05)
    assert not main.done()
    assert any(name == b"date" for name, _ in graceful.server_state.default_headers)
    graceful.handle_exit(signal.SIGTERM, None)
    await asyncio.wait_for(main, 10)  # not the 3600 s tick
    assert exits == ["exit"]
    assert graceful.should_exit
