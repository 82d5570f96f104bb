"""Issue 10: a replica with running tasks gets SIGTERM and steps down gracefully.

Replica 0 starts alone, leads, and runs four long tasks (the simulated engine answers
after a minute). Replica 1 joins. A client holds a long poll open on replica 0, and
replica 0 gets SIGTERM. Then:

- it stops accepting: new connections are refused while the open long poll is still
  being served, and that long poll gets its answer;
- it leases nothing new: tasks queued after the SIGTERM all run on replica 1;
- it releases the leader lock at once: Redis reports the lock key deleted (not expired)
  before replica 1 takes it, and replica 1 leads with a newer token;
- it hands its four running tasks back with the attempt refunded: each succeeds on
  replica 1 at attempt 1, its error history naming the shutdown hand-back;
- it exits with status 0 within the grace period.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.chaos.harness import PREFIX, Fleet, FleetConfig, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GRACE_S = 30.0  # server.GRACEFUL_SHUTDOWN_S


async def test_sigterm_hands_back_leases_and_leadership(tmp_path: Path) -> None:
    config = FleetConfig(replicas=2, max_workers=1, first_token_s=60.0)
    async with Fleet(tmp_path, config, start=[0]) as fleet:
        a, b = fleet.replicas
        assert fleet.redis is not None
        await fleet.wait_leader([a])
        first = await fleet.submit([f"chaos-term-{i}" for i in range(4)], to=[a])
        assert len(first.ids) == 4

        async def all_running() -> bool:
            states = await fleet.task_states(first.ids.values())
            return all(s.get("status") == "running" for s in states.values())

        await until(all_running, 60)
        await fleet.start_replicas([1])
        await fleet.set_first_token_s(0.0)  # from now on the engines answer at once
        holder, old_token = await fleet.lock_holder()
        lock_key = f"{PREFIX}:leader:reconciler"
        lease_left_ms = int(await fleet.redis.pttl(lock_key))
        assert lease_left_ms > 0
        # Watch the lock key: Redis announces a release as "del" and a lease that ran out by
        # itself as "expired", so the order of events says how leadership moved, with no clock.
        await fleet.redis.config_set("notify-keyspace-events", "Kghx")
        db = fleet.redis.connection_pool.connection_kwargs.get("db", 0)
        lock_events = fleet.redis.pubsub()
        await lock_events.subscribe(f"__keyspace@{db}__:{lock_key}")

        # A long poll keeps replica 0's server open through the first part of its shutdown.
        async with httpx.AsyncClient(headers=fleet.http.headers, trust_env=False) as poller:
            task_id = next(iter(first.ids.values()))
            long_poll = poller.get(f"{a.url}/api/v1/tasks/{task_id}/wait",
                                   params={"timeout_s": 5}, timeout=30)
            polling = asyncio.create_task(long_poll)
            await asyncio.sleep(0.5)
            termed = time.monotonic()
            a.signal(signal.SIGTERM)

            async def refuses() -> bool:
                try:
                    async with httpx.AsyncClient(trust_env=False) as fresh:
                        await fresh.get(f"{a.url}/health", timeout=2)
                except httpx.ConnectError:
                    return True
                return False

            await until(refuses, 10)
            assert not polling.done(), "the long poll must still be open while new ones fail"
            answer = await polling
            assert answer.status_code == 200

        # Work queued after the SIGTERM is not leased by the replica that is stopping.
        second = await fleet.submit([f"chaos-term-late-{i}" for i in range(4)], to=[b])
        code = await a.wait_exit(GRACE_S + 10)
        exited_s = time.monotonic() - termed
        assert code == 0, a.log_text()[-3000:]
        log = a.log_text()
        assert "released leadership" in log

        leader = await fleet.wait_leader([b], timeout_s=10)
        assert leader is b
        new_holder, new_token = await fleet.lock_holder()
        assert new_holder != holder
        assert new_token is not None
        assert old_token is not None
        assert new_token > old_token
        # Leadership moved because replica 0 released the lock, not because its lease ran out:
        # the key was deleted before it could expire, and replica 1 took it after that.
        events: list[str] = []

        async def replica_1_took_it() -> bool:  # its acquire writes the hash: "hset"
            message = await lock_events.get_message(timeout=1.0)
            if message is not None and message["type"] == "message":
                events.append(message["data"])
            return "hset" in events

        await until(replica_1_took_it, 10)  # all published already: replica 1 leads
        await lock_events.aclose()
        removals = [e for e in events if e in ("del", "expired")]
        assert removals[:1] == ["del"], events
        assert "hset" in events[events.index("del"):], events

        states = await fleet.wait_finished([*first.ids.values(), *second.ids.values()], 60)
        for task_id in first.ids.values():
            state = states[task_id]
            assert state["status"] == "succeeded", state
            assert state["attempts"] == "1", state  # the handed-back attempt was refunded
            assert "shut" in state.get("errors", ""), state
        for task_id in second.ids.values():
            assert states[task_id]["status"] == "succeeded"
            assert states[task_id]["attempts"] == "1"
        cloud = await fleet.cloud()
        assert all(cloud["executions"].get(m) == 1 for m in second.ids)
    print(f"\nsigterm: replica exited 0 in {exited_s:.1f} s; leader token {old_token} -> "
          f"{new_token}")
