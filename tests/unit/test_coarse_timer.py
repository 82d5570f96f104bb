"""The proxy's shared coarse timer: deadlines fire once, never early, at most a tick late;
cancelled ones never fire; the loop timer stops when nothing is armed."""

from __future__ import annotations

import asyncio

from gpufleet.proxy.coarse_timer import CoarseTimer, coarse_timer


async def test_fires_once_not_early_and_within_a_tick() -> None:
    loop = asyncio.get_running_loop()
    timer = CoarseTimer(loop, tick_s=0.01)
    fired: list[float] = []
    start = loop.time()
    timer.call_later(0.05, lambda: fired.append(loop.time()))
    await asyncio.sleep(0.2)
    assert len(fired) == 1
    assert fired[0] - start >= 0.05
    assert len(timer) == 0
    assert timer._ticker is None  # nothing armed: no loop timer left


async def test_cancelled_deadlines_never_fire_and_others_still_do() -> None:
    loop = asyncio.get_running_loop()
    timer = CoarseTimer(loop, tick_s=0.01)
    fired: list[str] = []
    keep = timer.call_later(0.03, lambda: fired.append("kept"))
    drop = timer.call_later(0.03, lambda: fired.append("dropped"))
    timer.cancel(drop)
    timer.cancel(drop)  # twice: nothing happens
    await asyncio.sleep(0.1)
    assert fired == ["kept"]
    timer.cancel(keep)  # after it fired: nothing happens


async def test_a_callback_may_cancel_another_due_in_the_same_tick() -> None:
    loop = asyncio.get_running_loop()
    timer = CoarseTimer(loop, tick_s=0.05)
    fired: list[str] = []
    second = 0

    def first() -> None:
        fired.append("first")
        timer.cancel(second)

    timer.call_later(0.0, first)
    second = timer.call_later(0.0, lambda: fired.append("second"))
    await asyncio.sleep(0.15)
    assert fired == ["first"]


async def test_a_failing_callback_does_not_stop_the_others() -> None:
    loop = asyncio.get_running_loop()
    timer = CoarseTimer(loop, tick_s=0.01)
    fired: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")

    timer.call_later(0.0, boom)
    timer.call_later(0.0, lambda: fired.append("ok"))
    await asyncio.sleep(0.05)
    assert fired == ["ok"]


async def test_one_shared_timer_per_loop() -> None:
    assert coarse_timer() is coarse_timer(asyncio.get_running_loop())


async def test_a_sooner_deadline_is_not_held_back_by_a_later_one() -> None:
    loop = asyncio.get_running_loop()
    timer = CoarseTimer(loop, tick_s=0.01)
    fired: list[str] = []
    late = timer.call_later(30.0, lambda: fired.append("late"))
    timer.call_later(0.03, lambda: fired.append("soon"))
    await asyncio.sleep(0.15)
    assert fired == ["soon"]
    assert timer._ticker is not None  # still set, for the late one
    timer.cancel(late)


def test_each_loop_gets_its_own_timer_though_the_last_is_remembered() -> None:
    async def timer_of_this_loop() -> CoarseTimer:
        first = coarse_timer()
        assert coarse_timer() is first  # the remembered one
        assert first.loop is asyncio.get_running_loop()
        return first

    one = asyncio.run(timer_of_this_loop())
    two = asyncio.run(timer_of_this_loop())
    assert one is not two
    assert one.loop is not two.loop
