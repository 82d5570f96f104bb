"""Issue 10, fault 1: SIGKILL gpufleet replicas under load; no accepted task is lost.

Three ``gpufleet serve`` processes share one real redis-server and dispatch 2,000 tiny
Ollama tasks (zero simulated latency) to workers on a simulated Novita cloud (another
process). Every few seconds a random replica is SIGKILLed and started again. The
leases it held expire after ``[queue] lease_ttl_s`` and the tasks run elsewhere.

Checked from outside gpufleet: every task answered 202 has exactly one terminal state
(``succeeded``, with a result, and one terminal event in its stream); the engines' own
count of each prompt shows how often it ran, and the runs beyond the first are at most
the tasks that were in flight (leased fleet-wide) at the kills. A control run without
kills runs every task exactly once. No instance at the cloud is unknown to gpufleet.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import Fleet, FleetConfig
from tests.chaos.scenarios import process_kill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


async def test_sigkilled_replicas_lose_no_task(tmp_path: Path) -> None:
    async with Fleet(tmp_path, FleetConfig(replicas=3)) as fleet:
        report = await process_kill(fleet, 2000, kill_every_s=3.0, max_kills=8)
    print(f"\nprocess kill: {report}")
    assert report.kills >= 3
    assert report.accepted == 2000
    assert report.succeeded == report.accepted
    assert report.lost == report.failed == report.missing_result == 0
    assert report.terminal_events_wrong == 0
    assert report.never_ran == 0
    assert report.reexecuted <= report.in_flight_at_kills
    assert report.instances_leaked == 0


async def test_without_kills_nothing_runs_twice(tmp_path: Path) -> None:
    async with Fleet(tmp_path, FleetConfig(replicas=3)) as fleet:
        report = await process_kill(fleet, 500, kills=False)
    print(f"\ncontrol: {report}")
    assert report.accepted == report.succeeded == 500
    assert report.terminal_events_wrong == 0
    assert report.reexecuted == 0
    assert report.never_ran == 0
    assert report.instances_leaked == 0
