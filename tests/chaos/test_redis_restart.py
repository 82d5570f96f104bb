"""Issue 10, fault 2: redis-server SIGKILLed mid-load and started again on its AOF.

Two ``gpufleet serve`` replicas take a stream of tasks (submitted through both, with an
Idempotency-Key so a client may retry a submission that got no answer). A third of the
way in, redis-server is SIGKILLed — no shutdown, only the AOF (``appendfsync always``)
survives — and started again two seconds later on the same port and data dir.

No task answered 202 is lost (each has exactly one terminal state, ``succeeded``, with
a result); the replicas are the same processes (no restart of their own), their
``/ready`` comes back, a task submitted after the restart succeeds; and afterwards each
replica still shuts down cleanly on SIGTERM (exit 0) with the task-events subscription
it held across the outage.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.chaos.harness import Fleet, FleetConfig
from tests.chaos.scenarios import redis_restart

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


async def test_redis_killed_and_restarted_loses_no_accepted_task(tmp_path: Path) -> None:
    async with Fleet(tmp_path, FleetConfig(replicas=2)) as fleet:
        report = await redis_restart(fleet, 600)
        print(f"\nredis restart: {report}")
        assert report.replica_pids_same
        assert report.accepted >= 600  # every submission was retried until it got a 202
        assert report.succeeded == report.accepted
        assert report.lost == report.failed == report.missing_result == 0
        assert report.terminal_events_wrong == 0
        assert report.never_ran == 0
        assert report.instances_leaked == 0
        for replica in fleet.replicas:
            replica.signal(signal.SIGTERM)
        for replica in fleet.replicas:
            assert await replica.wait_exit(45) == 0, replica.log_text()[-3000:]
