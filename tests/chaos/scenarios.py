"""The multi-process fault scenarios, shared by the tests and ``bench/chaos_report.py``.

Each runs against a started ``Fleet`` and returns a report of what happened, measured
from outside gpufleet (the task records in Redis, the engines' own execution counts,
the simulated cloud's own instance list); the tests assert on the reports and the
benchmark prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gpufleet.domain import WorkerState
from gpufleet.store.workers import WorkerRegistry
from tests.chaos.harness import PREFIX, TERMINAL, Fleet, Replica, reexecutions, until

LIVE_INSTANCE = ("toCreate", "creating", "pulling", "running", "toStart", "starting")


@dataclass
class RunReport:
    accepted: int = 0
    refused: int = 0  # submissions that never got a 202 (not accepted: no promise made)
    succeeded: int = 0
    failed: int = 0
    lost: int = 0  # accepted, but missing or not finished
    missing_result: int = 0
    terminal_events_wrong: int = 0  # tasks whose event stream has != 1 terminal event
    reexecuted: int = 0  # runs beyond the first, by the engines' own count
    never_ran: int = 0  # succeeded tasks the engines never saw (must be 0)
    kills: int = 0
    in_flight_at_kills: int = 0  # tasks leased fleet-wide just before each kill, summed
    instances_created: int = 0
    instances_live: int = 0
    instances_leaked: int = 0  # live at the cloud but unknown to gpufleet's registry
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


async def check_tasks(fleet: Fleet, ids: dict[str, str], report: RunReport) -> None:
    """Fill ``report`` from the task records, their event streams and the engines."""
    assert fleet.redis is not None
    states = await fleet.task_states(ids.values())
    statuses = Counter(s.get("status", "missing") for s in states.values())
    report.accepted = len(ids)
    report.succeeded = statuses["succeeded"]
    report.failed = statuses["failed"] + statuses["cancelled"]
    report.lost = sum(n for status, n in statuses.items() if status not in TERMINAL)
    report.missing_result = sum(
        1 for s in states.values() if s.get("status") == "succeeded" and not s.get("result")
    )
    task_ids = list(ids.values())
    for start in range(0, len(task_ids), 500):
        chunk = task_ids[start:start + 500]
        async with fleet.redis.pipeline(transaction=False) as pipe:
            for task_id in chunk:
                pipe.xrange(f"{PREFIX}:task:{task_id}:events")
            streams = await pipe.execute()
        for entries in streams:
            terminal = [d for _, d in entries if d.get("status") in TERMINAL]
            report.terminal_events_wrong += len(terminal) != 1
    cloud = await fleet.cloud()
    executions: dict[str, int] = cloud["executions"]
    report.reexecuted = reexecutions(executions, ids)
    report.never_ran = sum(
        1 for marker, task_id in ids.items()
        if states[task_id].get("status") == "succeeded" and executions.get(marker, 0) == 0
    )
    await check_instances(fleet, report, cloud)


async def check_instances(fleet: Fleet, report: RunReport, cloud: dict[str, Any]) -> None:
    """The cloud's own instance list against gpufleet's registry."""
    assert fleet.redis is not None
    registry = WorkerRegistry(fleet.redis, prefix=PREFIX)
    known = {
        w.instance_id or w.id for w in await registry.list_workers()
        if w.state is not WorkerState.deleted
    }
    live = [i for i in cloud["instances"] if i["status"] in LIVE_INSTANCE]
    report.instances_created = len(cloud["created"])
    report.instances_live = len(live)
    report.instances_leaked = sum(1 for i in live if i["id"] not in known)


async def process_kill(
    fleet: Fleet,
    tasks: int,
    *,
    kill_every_s: float = 3.0,
    max_kills: int = 8,
    kills: bool = True,
    seed: int = 10,
    finish_timeout_s: float = 90.0,
) -> RunReport:
    """Submit ``tasks`` tiny tasks across the replicas; every ``kill_every_s`` SIGKILL a
    random replica and start it again at once, until the work is done or ``max_kills``."""
    rng = random.Random(seed)
    report = RunReport()
    markers = [f"chaos-{i:05d}" for i in range(tasks)]
    began = time.monotonic()
    submitting = asyncio.create_task(fleet.submit(markers))
    submitted = None
    try:
        while kills and report.kills < max_kills:
            done, _ = await asyncio.wait([submitting], timeout=kill_every_s)
            if done:
                submitted = submitting.result()
                states = await fleet.task_states(submitted.ids.values())
                if all(s.get("status") in TERMINAL for s in states.values()):
                    break
            victim: Replica = rng.choice(fleet.replicas)
            report.in_flight_at_kills += await fleet.running()
            victim.kill()
            report.kills += 1
            victim.start()
        submitted = await submitting
    finally:
        if not submitting.done():
            submitting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await submitting
    await fleet.wait_finished(submitted.ids.values(), finish_timeout_s)
    report.seconds = time.monotonic() - began
    report.refused = submitted.refused
    for replica in fleet.replicas:
        await fleet.wait_ready(replica)
    await check_tasks(fleet, submitted.ids, report)
    return report


@dataclass
class RedisRestartReport(RunReport):
    down_s: float = 0.0  # how long redis-server was away
    recovered_s: float = 0.0  # from its restart until every replica is ready again
    first_success_s: float = 0.0  # from its restart until a new (top-priority) task succeeded
    replica_pids_same: bool = False


async def redis_restart(
    fleet: Fleet, tasks: int, *, down_s: float = 2.0, finish_timeout_s: float = 90.0
) -> RedisRestartReport:
    """Load the fleet, SIGKILL redis-server in the middle, start it again on the same
    port and data dir (the AOF brings everything back), keep submitting all along."""
    report = RedisRestartReport()
    pids = [r.pid for r in fleet.replicas]
    markers = [f"chaos-r-{i:05d}" for i in range(tasks)]
    began = time.monotonic()
    submitting = asyncio.create_task(fleet.submit(markers, concurrency=8, attempts=100))
    # Kill while both submissions and runs are in flight.
    async def loaded() -> bool:
        return await _accepted_so_far(fleet) >= tasks // 3

    await until(loaded, 60)
    # A waiter on every replica, so each has its task-events subscription (the queue's
    # _Notifier) open when Redis goes away: it must reconnect, and shut down cleanly later.
    assert fleet.redis is not None
    some_task = (await fleet.redis.zrange(f"{PREFIX}:tasks", 0, 0))[0]
    for replica in fleet.replicas:
        answer = await fleet.http.get(f"{replica.url}/api/v1/tasks/{some_task}/wait",
                                      params={"timeout_s": 0.2})
        assert answer.status_code == 200, answer.text
    report.in_flight_at_kills = await fleet.running()
    killed = time.monotonic()
    await asyncio.to_thread(fleet.redis_server.kill)
    report.kills = 1
    await asyncio.sleep(down_s)
    restarted = time.monotonic()
    report.down_s = restarted - killed
    await asyncio.to_thread(fleet.redis_server.start)
    for replica in fleet.replicas:
        await fleet.wait_ready(replica, timeout_s=60)
    report.recovered_s = time.monotonic() - restarted
    # A task at the top priority: it does not wait behind the backlog of the outage.
    probe = await fleet.submit(["chaos-r-probe"], concurrency=1, attempts=100, priority=9)
    await fleet.wait_finished(probe.ids.values(), 60)
    report.first_success_s = time.monotonic() - restarted
    submitted = await submitting
    submitted.ids.update(probe.ids)
    await fleet.wait_finished(submitted.ids.values(), finish_timeout_s)
    report.seconds = time.monotonic() - began
    report.refused = submitted.refused
    report.replica_pids_same = [r.pid for r in fleet.replicas] == pids and all(
        r.alive for r in fleet.replicas
    )
    await check_tasks(fleet, submitted.ids, report)
    return report


async def _accepted_so_far(fleet: Fleet) -> int:
    assert fleet.redis is not None
    return int(await fleet.redis.zcard(f"{PREFIX}:tasks"))


@dataclass
class LeaderSplitReport:
    old_token: int | None = None
    new_token: int | None = None
    failover_s: float = 0.0  # from SIGSTOP until the other replica reported itself leader
    stale_refused: list[dict[str, Any]] = field(default_factory=list)  # old token, refused
    stale_ok: list[dict[str, Any]] = field(default_factory=list)  # old token acted after all
    creates_ok: int = 0
    instances_created: int = 0
    instances_live: int = 0
    old_leader_alive: bool = False
    succeeded: int = 0


async def leader_split(fleet: Fleet, *, stop_s: float | None = None) -> LeaderSplitReport:
    """Freeze the leader in the middle of a tick (its instance listing held at the cloud),
    SIGSTOP it past its lease, let the other replica take over, then queue work and SIGCONT
    the old leader while the new one is itself mid-tick: the old one acts on a stale view
    of the cloud (no instances) and its create must be refused by the fencing token."""
    report = LeaderSplitReport()
    a, b = fleet.replicas[0], fleet.replicas[1]
    leader = await fleet.wait_leader([a, b])
    assert leader is a, "replica 0 is started first and leads"
    holder, report.old_token = await fleet.lock_holder()
    ttl_ms = await _lock_pttl(fleet)
    # 1. Hold A's next listing at the cloud, then freeze A in the middle of its tick.
    await fleet.hold_lists(True)
    await until(lambda: _held(fleet), 30)
    a.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    await fleet.hold_lists(False)  # A's answer sits unread in its socket
    # 2. B takes over once A's lease runs out.
    await fleet.wait_leader([b], timeout_s=(ttl_ms / 1000) + 30)
    report.failover_s = time.monotonic() - stopped
    _, report.new_token = await fleet.lock_holder()
    # 3. Freeze B's next listing too, then queue work: nobody has created anything yet.
    await fleet.hold_lists(True)
    await until(lambda: _held(fleet), 30)
    submitted = await fleet.submit([f"chaos-split-{i}" for i in range(4)], concurrency=4,
                                   to=[b])
    if stop_s is not None:
        await asyncio.sleep(max(0.0, stop_s - (time.monotonic() - stopped)))
    # 4. Wake A: its stale listing says the cloud is empty and there is demand.
    a.signal(signal.SIGCONT)

    async def refused() -> bool:
        events = await fleet.events()
        return any(e.get("replica") == holder and e.get("outcome") == "refused" for e in events)

    await until(refused, 30)
    await fleet.hold_lists(False)
    states = await fleet.wait_finished(submitted.ids.values(), 60)
    report.succeeded = sum(1 for s in states.values() if s.get("status") == "succeeded")
    events = await fleet.events()
    after = [e for e in events if float(e["ts"]) >= time.time() - (time.monotonic() - stopped)]
    old = [e for e in after if e.get("replica") == holder]
    report.stale_refused = [e for e in old if e.get("outcome") == "refused"]
    report.stale_ok = [e for e in old if e.get("outcome") == "ok"]
    report.creates_ok = sum(
        1 for e in events if e.get("action") == "create" and e.get("outcome") == "ok"
    )
    cloud = await fleet.cloud()
    report.instances_created = len(cloud["created"])
    report.instances_live = sum(1 for i in cloud["instances"] if i["status"] in LIVE_INSTANCE)
    report.old_leader_alive = a.alive
    return report


async def _lock_pttl(fleet: Fleet) -> int:
    assert fleet.redis is not None
    return int(await fleet.redis.pttl(f"{PREFIX}:leader:reconciler"))


async def _held(fleet: Fleet) -> bool:
    return int((await fleet.cloud())["held"]) > 0
