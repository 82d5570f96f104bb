"""Issue 10, fault 5: the leader frozen (SIGSTOP) past its lease; fencing refuses it.

Two ``gpufleet serve`` replicas; replica 0 starts first and leads. The simulated cloud
holds replica 0's next instance listing, and replica 0 is SIGSTOPped in the middle of
that reconcile tick — after it took its fencing token, before it acted. Replica 1 takes
over once the lease runs out (the failover time is printed). Then replica 1's own next
listing is held too and work is queued, so nobody has created an instance yet, and
replica 0 is SIGCONTinued: its listing (taken before the freeze) shows an empty cloud
and the queue shows demand, so it plans a create — which the fencing check refuses.

Checked: the stale leader's actions are recorded as ``refused`` under its old token and
none of them succeeded; the new leader's token is newer; the cloud itself saw exactly
one instance created for the one worker's worth of demand (no double create); the work
then runs; the old leader lives on as a follower.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import Fleet, FleetConfig
from tests.chaos.scenarios import leader_split

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


async def test_stale_leader_is_fenced_and_nothing_is_created_twice(tmp_path: Path) -> None:
    async with Fleet(tmp_path, FleetConfig(replicas=2, max_workers=1), start=[0]) as fleet:
        await fleet.wait_leader([fleet.replicas[0]])
        await fleet.start_replicas([1])
        report = await leader_split(fleet)
    print(f"\nleader split: failover {report.failover_s:.1f} s; {report}")
    assert report.old_token is not None
    assert report.new_token is not None
    assert report.new_token > report.old_token
    assert report.stale_refused, "the stale leader's create was not refused"
    assert all(e.get("token") == str(report.old_token) for e in report.stale_refused)
    assert not report.stale_ok
    assert report.creates_ok == 1
    assert report.instances_created == 1
    assert report.succeeded == 4
    assert report.old_leader_alive
