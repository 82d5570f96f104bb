"""What survives when processes die? The issue-10 fault scenarios with real processes,
and their figures.

    python bench/chaos_report.py [--tasks 2000] [--kill-every 3] [--kills 8] [--quick]

Runs, each on a fresh fleet from ``tests/chaos/harness.py`` (a real ``redis-server``
with AOF ``appendfsync always``, a simulated Novita + Ollama cloud process, N
``gpufleet serve`` processes, all on loopback):

1. **process kill**: 3 replicas, ``--tasks`` tiny tasks; every ``--kill-every`` seconds
   a random replica is SIGKILLed and started again (``--kills`` times). Then the fleet
   idles past its idle timeout and the simulated cloud is asked what still runs;
2. **Redis restart**: 2 replicas under load; redis-server SIGKILLed and started again on
   its AOF two seconds later;
3. **leader split**: the leader SIGSTOPped mid-tick past its lease, then SIGCONTinued.

Printed: tasks accepted, finished, lost, duplicated (runs beyond the first, counted by
the engines themselves) against tasks in flight at the kills; instances created and
leaked (live at the cloud after the idle timeout, or unknown to gpufleet); the leader
failover time; the time to recover from the Redis restart. Exit status 1 if a task was
lost or an instance leaked. ``--quick``: 500 tasks, leader split skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos.harness import Fleet, FleetConfig
from tests.chaos.scenarios import (
    LIVE_INSTANCE,
    leader_split,
    process_kill,
    redis_restart,
)

IDLE_TIMEOUT_S = 5.0


async def kill_run(workdir: Path, tasks: int, every: float, kills: int) -> dict[str, float]:
    cfg = FleetConfig(replicas=3, idle_timeout_s=IDLE_TIMEOUT_S)
    async with Fleet(workdir, cfg) as fleet:
        report = await process_kill(fleet, tasks, kill_every_s=every, max_kills=kills)
        # Demand is over: after the idle timeout nothing may run beyond min_workers (0).
        deadline = time.monotonic() + IDLE_TIMEOUT_S + 30
        live = report.instances_live
        while time.monotonic() < deadline:
            cloud = await fleet.cloud()
            live = sum(1 for i in cloud["instances"] if i["status"] in LIVE_INSTANCE)
            if live == 0:
                break
            await asyncio.sleep(0.5)
    return {
        "accepted": report.accepted, "refused": report.refused,
        "finished": report.succeeded + report.failed, "succeeded": report.succeeded,
        "failed": report.failed, "lost": report.lost,
        "duplicated": report.reexecuted, "in_flight_at_kills": report.in_flight_at_kills,
        "kills": report.kills, "seconds": report.seconds,
        "instances_created": report.instances_created,
        "instances_unknown": report.instances_leaked, "instances_live_after_idle": live,
    }


async def redis_run(workdir: Path, tasks: int) -> dict[str, float]:
    async with Fleet(workdir, FleetConfig(replicas=2)) as fleet:
        report = await redis_restart(fleet, tasks)
    return {
        "accepted": report.accepted, "succeeded": report.succeeded, "lost": report.lost,
        "duplicated": report.reexecuted, "in_flight_at_kill": report.in_flight_at_kills,
        "down_s": report.down_s, "ready_again_s": report.recovered_s,
        "first_new_task_s": report.first_success_s,
        "replicas_restarted": 0 if report.replica_pids_same else 1,
    }


async def split_run(workdir: Path) -> dict[str, float]:
    async with Fleet(workdir, FleetConfig(replicas=2, max_workers=1), start=[0]) as fleet:
        await fleet.wait_leader([fleet.replicas[0]])
        await fleet.start_replicas([1])
        report = await leader_split(fleet)
    return {
        "failover_s": report.failover_s, "stale_actions_refused": len(report.stale_refused),
        "stale_actions_applied": len(report.stale_ok), "creates": report.creates_ok,
        "instances_created": report.instances_created,
    }


def show(title: str, figures: dict[str, float]) -> None:
    print(f"\n{title}")
    for name, value in figures.items():
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        print(f"  {name:<28} {text}")


async def main(args: argparse.Namespace) -> int:
    tasks = 500 if args.quick else args.tasks
    with tempfile.TemporaryDirectory(prefix="gpufleet-chaos-") as tmp:
        root = Path(tmp)
        kill = await kill_run(root / "kill", tasks, args.kill_every, args.kills)
        show(f"process kill: 3 replicas, {tasks} tasks, SIGKILL every {args.kill_every:g} s",
             kill)
        ratio = kill["duplicated"] / kill["in_flight_at_kills"] if kill["in_flight_at_kills"] \
            else 0.0
        print(f"  duplicated / in flight at kills: {ratio:.2f} (<= 1 required)")
        redis = await redis_run(root / "redis", max(200, tasks // 3))
        show("redis restart: SIGKILL redis-server mid-load, restart on its AOF", redis)
        bad = kill["lost"] or kill["instances_unknown"] or kill["instances_live_after_idle"] \
            or redis["lost"] or kill["duplicated"] > kill["in_flight_at_kills"]
        if not args.quick:
            split = await split_run(root / "split")
            show("leader split: SIGSTOP the leader mid-tick past its 15 s lease", split)
            bad = bad or split["stale_actions_applied"] or split["instances_created"] != 1
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    sys.exit(asyncio.run(main(parser.parse_args())))
