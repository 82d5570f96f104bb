"""A consumer process SIGKILLed while it holds leases loses no task."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from gpufleet.settings import QueueSettings
from gpufleet.store.connection import EmbeddedRedis
from gpufleet.store.queue import TaskQueue
from gpufleet.tasks import LeaseOutcome, TaskSubmit
from tests.conftest import free_port

GRAPH = {"1": {"class_type": "KSampler", "inputs": {}}}

# The doomed consumer: acks a few tasks, then leases more and heartbeats them until killed.
CONSUMER = """
import asyncio, sys
import redis.asyncio as aioredis
from gpufleet.settings import QueueSettings
from gpufleet.store.queue import TaskQueue

async def main(url):
    queue = TaskQueue(aioredis.Redis.from_url(url, decode_responses=True), QueueSettings(), "kill")
    for lease in await queue.lease("doomed", kinds=["comfyui"], limit=5):
        await queue.ack(lease.task_id, lease.token, {"by": "doomed"})
    held = await queue.lease("doomed", kinds=["comfyui"], limit=20)
    print("holding", len(held), flush=True)
    while True:
        for lease in held:
            await queue.heartbeat(lease.task_id, lease.token)
        await asyncio.sleep(0.2)

asyncio.run(main(sys.argv[1]))
"""


class Later:
    """A clock that reads real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_sigkilled_consumer_loses_nothing(redis: aioredis.Redis, redis_url: str) -> None:
    settings = QueueSettings()
    clock = Later()
    queue = TaskQueue(redis, settings, "kill", clock=clock)
    ids = {(await queue.enqueue(TaskSubmit(payload=GRAPH))).id for _ in range(50)}

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONSUMER, redis_url, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.strip() == b"holding 20"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    stats = await queue.stats()
    assert stats.running == 20
    assert stats.queued == 25
    # Nothing comes back before the lease TTL has passed (the dead process cannot renew) ...
    assert (await queue.requeue_expired()).requeued == 0
    # ... and everything does once it has.
    clock.offset = settings.lease_ttl_s + settings.heartbeat_interval_s
    assert (await queue.requeue_expired()).requeued == 20

    acked: list[str] = []
    while leases := await queue.lease("survivor", kinds=["comfyui"], limit=8):
        for lease in leases:
            assert (
                await queue.ack(lease.task_id, lease.token, {"by": "survivor"}) is LeaseOutcome.ok
            )
            acked.append(lease.task_id)
    assert len(acked) == 45
    by: dict[str, str] = {}
    for task_id in ids:
        task = await queue.get(task_id)
        assert task.status == "succeeded"
        by[task_id] = task.result["by"]
    assert sorted(by.values()).count("doomed") == 5
    retried = [t for t in ids if (await queue.get(t)).attempts == 2]
    assert len(retried) == 20
    stats = await queue.stats()
    assert stats.queued == 0
    assert stats.running == 0


async def test_redis_sigkill_keeps_accepted_tasks(tmp_path: Path) -> None:
    """appendfsync always: every task that got an answer survives a SIGKILL of redis-server."""
    server = EmbeddedRedis(tmp_path, port=free_port(), appendfsync="always")
    await asyncio.to_thread(server.start)
    try:
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        queue = TaskQueue(client, QueueSettings(), "durable")
        ids = [
            (await queue.enqueue(TaskSubmit(payload=GRAPH, priority=i % 10))).id for i in range(30)
        ]
        held = await queue.lease("w1", kinds=["comfyui"], limit=5)
        await queue.ack(held[0].task_id, held[0].token, {"ok": 1})
        await client.aclose()
        server.kill()
        server.stop()
        await asyncio.to_thread(server.start)
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        queue = TaskQueue(client, QueueSettings(), "durable")
        statuses = [str((await queue.get(task_id)).status) for task_id in ids]
        assert statuses.count("succeeded") == 1
        assert statuses.count("running") == 4
        assert statuses.count("queued") == 25
        stats = await queue.stats()
        assert stats.queued == 25
        assert stats.running == 4
        assert await queue.ack(held[1].task_id, held[1].token) is LeaseOutcome.ok
        await client.aclose()
    finally:
        await asyncio.to_thread(server.stop)


async def test_waiter_survives_redis_restart(tmp_path: Path) -> None:
    """A long poll in progress when Redis restarts still returns once the task finishes."""
    server = EmbeddedRedis(tmp_path, port=free_port(), appendfsync="always")
    await asyncio.to_thread(server.start)
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    queue = TaskQueue(client, QueueSettings(), "restart")
    try:
        task = await queue.enqueue(TaskSubmit(payload=GRAPH))
        waiter = asyncio.create_task(queue.wait(task.id, timeout_s=60))
        await asyncio.sleep(0.1)
        server.kill()
        server.stop()
        await asyncio.to_thread(server.start)
        producer = aioredis.Redis.from_url(server.url, decode_responses=True)
        other = TaskQueue(producer, QueueSettings(), "restart")
        (lease,) = await other.lease("w1", kinds=["comfyui"])
        await other.ack(lease.task_id, lease.token, "done")
        await producer.aclose()
        finished = await asyncio.wait_for(waiter, 30)
        assert finished.status == "succeeded"
        assert finished.result == "done"
    finally:
        await queue.aclose()
        await client.aclose()
        await asyncio.to_thread(server.stop)
