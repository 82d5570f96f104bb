"""The task queue: order, leases, expiry, retries, cancel, retention.

Every test that takes ``store`` runs twice, as a contract: on the real redis-server and on
fakeredis (with Lua). Concurrency and memory checks run on the real server only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

from gpufleet.errors import IdempotencyConflict, LimitExceeded, TaskConflict, TaskNotFound
from gpufleet.settings import QueueSettings
from gpufleet.store.keys import Keys
from gpufleet.store.queue import TaskQueue
from gpufleet.tasks import LeaseOutcome, TaskSubmit

GRAPH = {"1": {"class_type": "KSampler", "inputs": {"seed": 1}}}


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def comfy(**kw: Any) -> TaskSubmit:
    return TaskSubmit(payload=GRAPH, **kw)


def ollama(model: str = "llama3:8b", **kw: Any) -> TaskSubmit:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return TaskSubmit(kind="ollama", payload={"api": "chat", "body": body}, **kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["redis", "fakeredis"])
def store(request: pytest.FixtureRequest) -> aioredis.Redis:
    if request.param == "fakeredis":
        return request.getfixturevalue("fake_redis")  # type: ignore[no-any-return]
    return request.getfixturevalue("redis")  # type: ignore[no-any-return]


@pytest.fixture
async def queue(store: aioredis.Redis, clock: Clock) -> AsyncIterator[TaskQueue]:
    settings = QueueSettings(lease_ttl_s=15, heartbeat_interval_s=5, retry_backoff_s=2)
    q = TaskQueue(store, settings, "t", clock=clock, jitter=lambda: 1.0)
    yield q
    await q.aclose()


async def lease_ids(queue: TaskQueue, n: int = 1, **kw: Any) -> list[str]:
    kw.setdefault("kinds", ["comfyui", "ollama"])
    return [lease.task_id for lease in await queue.lease("w1", limit=n, **kw)]


async def test_key_layout_matches_lua(queue: TaskQueue) -> None:
    keys = Keys("t")
    names = await queue._run("keynames", "ID", "gpu-a", "comfyui", "m1")
    assert names == [
        keys.task("ID"),
        keys.task_events("ID"),
        keys.pool_queue("gpu-a", "m1"),
        keys.kind_queue("comfyui"),
        keys.pool_queues("gpu-a"),
        keys.kind_queues("comfyui"),
        keys.delayed(),
        keys.leases(),
        keys.tasks(),
        keys.tasks_by_status("queued"),
        keys.expiry(),
        keys.depth(),
        keys.inflight(),
        keys.seq(),
        keys.wake(),
        keys.task_channel(),
        keys.cancel_channel(),
        keys.deadlines(),
    ]


async def test_enqueue_get_and_timeline(queue: TaskQueue, clock: Clock) -> None:
    task = await queue.enqueue(comfy(workflow_id="text_to_image_v1"), owner="k1")
    assert task.status == "queued"
    assert task.attempts == 0
    assert task.max_attempts == 3
    stored = await queue.get(task.id)
    assert stored == task
    assert stored.created_at == stored.queued_at == clock.now
    with pytest.raises(TaskNotFound):
        await queue.get("nope")


async def test_priority_then_fifo(queue: TaskQueue, clock: Clock) -> None:
    ids = []
    for priority in (5, 9, 5, 0, 9):
        ids.append((await queue.enqueue(comfy(priority=priority))).id)
        clock.advance(0.001)
    got = await lease_ids(queue, 5)
    assert got == [ids[1], ids[4], ids[0], ids[2], ids[3]]


async def test_lease_matches_pool_kind_and_model(queue: TaskQueue) -> None:
    in_a = (await queue.enqueue(comfy(pool="gpu-a"))).id
    in_b = (await queue.enqueue(comfy(pool="gpu-b"))).id
    llama = (await queue.enqueue(ollama("llama3:8b"))).id
    qwen = (await queue.enqueue(ollama("qwen2:7b"))).id
    anywhere = (await queue.enqueue(comfy())).id

    assert await lease_ids(queue, 9, pools=["gpu-c"], kinds=["ollama"], models=["qwen2:7b"]) == [
        qwen
    ]
    got = await lease_ids(queue, 9, pools=["gpu-a"], kinds=["comfyui"], models=[])
    assert got == [in_a, anywhere]
    assert await lease_ids(queue, 9, pools=["gpu-b"], kinds=[], models=None) == [in_b]
    assert await lease_ids(queue, 9, pools=[], kinds=["ollama"], models=None) == [llama]
    stats = await queue.stats()
    assert stats.queued == 0
    assert stats.running == 5


async def test_stats_counts_and_oldest(queue: TaskQueue, clock: Clock) -> None:
    first = clock.now
    await queue.enqueue(comfy(pool="gpu-a", priority=1))
    clock.advance(10)
    await queue.enqueue(comfy(pool="gpu-a", priority=9))
    await queue.enqueue(ollama("llama3:8b"))
    stats = await queue.stats()
    assert stats.queued == 3
    assert stats.running == 0
    assert stats.queued_by_pool == {"gpu-a": 2}
    assert stats.queued_unpooled == {"ollama": 1}
    assert stats.queued_by_engine == {"comfyui": 2, "ollama": 1}
    assert stats.queued_by_model == {"llama3:8b": 1}
    assert stats.oldest_by_pool == {"gpu-a": first}
    assert stats.oldest_age_s(clock.now + 5) == 15
    await lease_ids(queue, 1, pools=["gpu-a"])
    stats = await queue.stats()
    assert stats.running_by_pool == {"gpu-a": 1}
    assert stats.queued_by_pool == {"gpu-a": 1}


async def test_heartbeat_ack_and_stale_token(queue: TaskQueue) -> None:
    task = await queue.enqueue(comfy())
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    assert lease.task.status == "running"
    assert lease.task.attempts == 1
    assert lease.task.payload == GRAPH
    assert await queue.heartbeat(task.id, lease.token) is LeaseOutcome.ok
    assert await queue.heartbeat(task.id, "w2:1") is LeaseOutcome.lost
    assert await queue.ack(task.id, lease.token, {"images": ["a.png"]}) is LeaseOutcome.ok
    assert await queue.ack(task.id, lease.token, None) is LeaseOutcome.lost
    done = await queue.get(task.id)
    assert done.status == "succeeded"
    assert done.result == {"images": ["a.png"]}
    assert done.finished_at is not None
    assert done.started_at is not None
    assert (await queue.stats()).running == 0


async def test_expired_lease_requeues_with_attempts(queue: TaskQueue, clock: Clock) -> None:
    task = await queue.enqueue(comfy())
    (first,) = await queue.lease("w1", kinds=["comfyui"])
    clock.advance(14)
    assert (await queue.requeue_expired()).requeued == 0
    assert await queue.heartbeat(task.id, first.token) is LeaseOutcome.ok
    clock.advance(14)
    assert (await queue.requeue_expired()).requeued == 0
    clock.advance(16)
    report = await queue.requeue_expired()
    assert report.requeued == 1
    back = await queue.get(task.id)
    assert back.status == "queued"
    assert back.attempts == 1
    assert back.errors[0]["code"] == "lease_expired"
    assert await queue.heartbeat(task.id, first.token) is LeaseOutcome.lost
    (second,) = await queue.lease("w2", kinds=["comfyui"])
    assert second.task.attempts == 2
    assert second.token != first.token
    # The first holder's late ack no longer counts: the second holder owns the task.
    assert await queue.ack(task.id, first.token) is LeaseOutcome.lost
    assert await queue.ack(task.id, second.token) is LeaseOutcome.ok


async def test_late_ack_of_requeued_task_is_taken(queue: TaskQueue, clock: Clock) -> None:
    task = await queue.enqueue(comfy())
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    clock.advance(16)
    await queue.requeue_expired()
    assert await queue.ack(task.id, lease.token, 42) is LeaseOutcome.ok
    assert (await queue.get(task.id)).status == "succeeded"
    assert await queue.lease("w2", kinds=["comfyui"]) == []
    assert (await queue.stats()).queued == 0


async def test_lease_itself_requeues_expired(queue: TaskQueue, clock: Clock) -> None:
    task = await queue.enqueue(comfy())
    await queue.lease("w1", kinds=["comfyui"])
    clock.advance(15.5)
    (again,) = await queue.lease("w2", kinds=["comfyui"])
    assert again.task_id == task.id
    assert again.task.attempts == 2


async def test_expiry_after_last_attempt_is_dead(queue: TaskQueue, clock: Clock) -> None:
    task = await queue.enqueue(comfy(max_attempts=2))
    for _ in range(2):
        assert await lease_ids(queue) == [task.id]
        clock.advance(16)
    assert (await queue.requeue_expired()).dead == 1
    dead = await queue.get(task.id)
    assert dead.status == "failed"
    assert len(dead.errors) == 2


async def test_retry_backoff_then_dead_letter(queue: TaskQueue, clock: Clock) -> None:
    task = await queue.enqueue(comfy())
    delays = []
    for attempt in (1, 2, 3):
        (lease,) = await queue.lease("w1", kinds=["comfyui"])
        assert lease.task.attempts == attempt
        outcome = await queue.fail(task.id, lease.token, {"code": "boom", "message": "oom"})
        if attempt < 3:
            assert outcome is LeaseOutcome.retry
            waiting = await queue.get(task.id)
            assert waiting.status == "queued"
            assert waiting.next_attempt_at is not None
            delays.append(waiting.next_attempt_at - clock.now)
            assert await queue.lease("w1", kinds=["comfyui"]) == []  # not due yet
            assert (await queue.stats()).delayed == 1
            clock.advance(delays[-1])
        else:
            assert outcome is LeaseOutcome.failed
    assert delays == [2, 4]  # retry_backoff_s * 2**(attempt-1), jitter pinned to 1.0
    dead = await queue.get(task.id)
    assert dead.status == "failed"
    assert [e["attempt"] for e in dead.errors] == [1, 2, 3]
    assert all(e["message"] == "oom" and e["worker"] == "w1" for e in dead.errors)
    page = await queue.list(status="failed")
    assert [t.id for t in page.tasks] == [task.id]


async def test_non_retryable_fails_at_once(queue: TaskQueue) -> None:
    task = await queue.enqueue(comfy())
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    outcome = await queue.fail(task.id, lease.token, "invalid graph", retryable=False)
    assert outcome is LeaseOutcome.failed
    failed = await queue.get(task.id)
    assert failed.status == "failed"
    assert failed.attempts == 1
    assert failed.error is not None
    assert failed.error["message"] == "invalid graph"


async def test_cancel_queued_never_starts(queue: TaskQueue) -> None:
    task = await queue.enqueue(comfy())
    cancelled = await queue.cancel(task.id)
    assert cancelled.status == "cancelled"
    assert await queue.lease("w1", kinds=["comfyui"]) == []
    assert (await queue.stats()).queued == 0
    with pytest.raises(TaskConflict):
        await queue.cancel(task.id)
    with pytest.raises(TaskNotFound):
        await queue.cancel("nope")


async def test_cancel_delayed_retry(queue: TaskQueue, clock: Clock) -> None:
    task = await queue.enqueue(comfy())
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    await queue.fail(task.id, lease.token, "flaky")
    await queue.cancel(task.id)
    clock.advance(60)
    assert await queue.lease("w1", kinds=["comfyui"]) == []
    stats = await queue.stats()
    assert stats.queued == 0
    assert stats.delayed == 0


async def test_cancel_running_tells_the_holder(queue: TaskQueue, store: aioredis.Redis) -> None:
    task = await queue.enqueue(comfy())
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    pubsub = store.pubsub()
    await pubsub.subscribe(queue.keys.cancel_channel())
    await pubsub.get_message(timeout=1)
    watcher = asyncio.create_task(queue.wait(task.id, timeout_s=30))
    await asyncio.sleep(0.05)
    await queue.cancel(task.id)
    message = await pubsub.get_message(timeout=5)
    assert message is not None
    assert message["data"] == task.id
    assert (await watcher).status == "cancelled"
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert await queue.heartbeat(task.id, lease.token) is LeaseOutcome.cancelled
    assert await queue.ack(task.id, lease.token, 1) is LeaseOutcome.cancelled
    assert await queue.fail(task.id, lease.token, "x") is LeaseOutcome.cancelled
    assert (await queue.stats()).running == 0


async def test_cancel_races_lease(queue: TaskQueue) -> None:
    """Cancel and lease at once: each task ends either cancelled-and-never-leased or leased."""
    ids = [(await queue.enqueue(comfy())).id for _ in range(40)]

    async def cancel(task_id: str) -> str:
        try:
            return (await queue.cancel(task_id)).status
        except TaskConflict:
            return "conflict"

    leases, cancels = await asyncio.gather(
        asyncio.gather(*(queue.lease(f"w{i}", kinds=["comfyui"]) for i in range(40))),
        asyncio.gather(*(cancel(i) for i in ids)),
    )
    leased = {lease.task_id: lease for batch in leases for lease in batch}
    assert all(c == "cancelled" for c in cancels)  # running tasks can be cancelled too
    for task_id in ids:
        task = await queue.get(task_id)
        assert task.status == "cancelled"
        if task_id in leased:
            outcome = await queue.ack(task_id, leased[task_id].token)
            assert outcome is LeaseOutcome.cancelled
    stats = await queue.stats()
    assert stats.queued == stats.running == 0


async def test_ack_races_cancel(queue: TaskQueue) -> None:
    ids = [(await queue.enqueue(comfy())).id for _ in range(40)]
    leases = await queue.lease("w1", kinds=["comfyui"], limit=40)

    async def cancel(task_id: str) -> str:
        try:
            await queue.cancel(task_id)
        except TaskConflict:
            return "late"
        return "cancelled"

    acks, cancels = await asyncio.gather(
        asyncio.gather(*(queue.ack(lease.task_id, lease.token) for lease in leases)),
        asyncio.gather(*(cancel(i) for i in ids)),
    )
    for task_id, ack, cancel_result in zip(ids, acks, cancels, strict=True):
        status = (await queue.get(task_id)).status
        # Exactly one of them won, and the task's status says which.
        assert (ack is LeaseOutcome.ok) == (cancel_result == "late")
        assert status == ("succeeded" if ack is LeaseOutcome.ok else "cancelled")


async def test_idempotency_race_100_submits(queue: TaskQueue, store: aioredis.Redis) -> None:
    spec = comfy(workflow_id="wf")
    tasks = await asyncio.gather(
        *(queue.enqueue(spec, owner="k1", idempotency_key="abc") for _ in range(100))
    )
    assert len({t.id for t in tasks}) == 1
    assert await store.zcard(queue.keys.tasks()) == 1
    assert (await queue.stats()).queued == 1
    with pytest.raises(IdempotencyConflict):
        await queue.enqueue(comfy(priority=9), owner="k1", idempotency_key="abc")
    other = await queue.enqueue(spec, owner="k2", idempotency_key="abc")
    assert other.id != tasks[0].id


async def test_many_consumers_ack_each_task_once(redis_url: str) -> None:
    """Eight consumers, each on its own connection, drain 400 tasks: every task acked once."""
    clients = [aioredis.Redis.from_url(redis_url, decode_responses=True) for _ in range(8)]
    settings = QueueSettings()
    queues = [TaskQueue(c, settings, "many") for c in clients]
    await clients[0].flushdb()
    ids = {(await queues[0].enqueue(comfy(priority=i % 10))).id for i in range(400)}
    acked: list[str] = []

    async def consume(q: TaskQueue, name: str) -> None:
        while True:
            leases = await q.lease(name, kinds=["comfyui"], limit=3)
            if not leases:
                return
            for lease in leases:
                assert await q.ack(lease.task_id, lease.token) is LeaseOutcome.ok
                acked.append(lease.task_id)

    await asyncio.gather(*(consume(q, f"c{i}") for i, q in enumerate(queues)))
    assert sorted(acked) == sorted(ids)
    stats = await queues[0].stats()
    assert stats.queued == stats.running == 0
    await clients[0].flushdb()
    for c in clients:
        await c.aclose()


async def test_list_pages_and_filters(queue: TaskQueue, clock: Clock) -> None:
    made = []
    for i in range(7):
        spec = ollama() if i % 2 else comfy(pool="gpu-a")
        made.append((await queue.enqueue(spec, owner=f"k{i % 3}")).id)
        clock.advance(1)
    page = await queue.list(limit=3)
    assert [t.id for t in page.tasks] == made[::-1][:3]
    assert all(t.payload is None for t in page.tasks)
    rest = await queue.list(limit=10, cursor=page.next_cursor)
    assert [t.id for t in rest.tasks] == made[::-1][3:]
    assert rest.next_cursor is None
    assert [t.id for t in (await queue.list(kind="ollama")).tasks] == made[1::2][::-1]
    assert [t.id for t in (await queue.list(pool="gpu-a")).tasks] == made[0::2][::-1]
    assert [t.id for t in (await queue.list(owner="k0")).tasks] == [made[6], made[3], made[0]]
    await lease_ids(queue, 2)
    assert len((await queue.list(status="running")).tasks) == 2
    assert len((await queue.list(status="queued")).tasks) == 5


async def test_wait_returns_when_finished(queue: TaskQueue) -> None:
    task = await queue.enqueue(comfy())
    waiter = asyncio.create_task(queue.wait(task.id, timeout_s=30))
    await asyncio.sleep(0.05)
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    await queue.ack(lease.task_id, lease.token, {"ok": True})
    done = await waiter
    assert done.status == "succeeded"
    assert done.result == {"ok": True}


async def test_wait_times_out_with_current_state(queue: TaskQueue) -> None:
    task = await queue.enqueue(comfy())
    assert (await queue.wait(task.id, timeout_s=0.05)).status == "queued"


async def test_events_follow_every_change(queue: TaskQueue, clock: Clock) -> None:
    task = await queue.enqueue(comfy())
    seen: list[str] = []

    async def follow() -> None:
        async for event in queue.events(task.id, keepalive_s=0.2):
            if event is not None:
                seen.append(f"{event.status}:{event.detail}")

    follower = asyncio.create_task(follow())
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    await queue.fail(task.id, lease.token, "flaky")
    clock.advance(10)
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    await queue.ack(task.id, lease.token)
    await asyncio.wait_for(follower, 10)
    assert [s.split(":")[0] for s in seen] == [
        "queued",
        "running",
        "queued",
        "running",
        "succeeded",
    ]
    assert seen[2].startswith("queued:retry in")
    # A follower arriving late still gets the history, then the stream ends.
    late = [e.status async for e in queue.events(task.id) if e is not None]
    assert late[-1] == "succeeded"
    assert len(late) == 5


async def test_wake_channel_on_enqueue(queue: TaskQueue, store: aioredis.Redis) -> None:
    pubsub = store.pubsub()
    await pubsub.subscribe(queue.keys.wake())
    await pubsub.get_message(timeout=1)
    await queue.enqueue(comfy(pool="gpu-a"))
    message = await pubsub.get_message(timeout=5)
    assert message is not None
    assert message["data"] == "comfyui gpu-a "
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_retention_returns_to_baseline(
    store: aioredis.Redis, queue: TaskQueue, clock: Clock
) -> None:
    """After a run and its retention, no key of the run is left (only the seq counter)."""
    redis = store
    real = not isinstance(redis, fakeredis.FakeAsyncRedis)
    baseline = await redis.dbsize()
    memory_before = (await redis.info("memory"))["used_memory"] if real else 0
    specs = [comfy(pool="gpu-a"), comfy(), ollama(), ollama("qwen2:7b", priority=9)]
    for i in range(200):
        await queue.enqueue(specs[i % 4], owner="k1", idempotency_key=f"key-{i}")
    done = 0
    while True:
        leases = await queue.lease("w1", ["gpu-a"], None, kinds=["comfyui", "ollama"], limit=16)
        if not leases:
            break
        for lease in leases:
            kind = done % 4
            if kind == 0:
                await queue.ack(lease.task_id, lease.token, {"n": done})
            elif kind == 1:
                await queue.fail(lease.task_id, lease.token, "bad", retryable=False)
            elif kind == 2:
                await queue.cancel(lease.task_id)
            else:
                await queue.heartbeat(lease.task_id, lease.token)  # leave it to expire
            done += 1
    clock.advance(16)
    await queue.requeue_expired()  # the abandoned ones come back (attempt 2 of 3)
    for lease in await queue.lease("w1", ["gpu-a"], None, kinds=["comfyui", "ollama"], limit=99):
        await queue.ack(lease.task_id, lease.token)
    stats = await queue.stats()
    assert stats.queued == stats.running == 0
    assert await redis.dbsize() > baseline + 200
    clock.advance(queue.settings.result_ttl_s + 1)
    report = await queue.requeue_expired()
    assert report.reaped == 200
    leftover = sorted(await redis.keys("*"))
    assert leftover == [queue.keys.seq()]
    if real:  # allocator slack aside, the memory comes back too
        memory_after = (await redis.info("memory"))["used_memory"]
        assert memory_after - memory_before < 256 * 1024


async def test_max_queued_per_owner(queue: TaskQueue) -> None:
    for _ in range(3):
        await queue.enqueue(comfy(), owner="k1", max_queued=3)
    with pytest.raises(LimitExceeded):
        await queue.enqueue(comfy(), owner="k1", max_queued=3)
    await queue.enqueue(comfy(), owner="k2", max_queued=3)  # another key's budget
    await queue.lease("w1", kinds=["comfyui"], limit=1)  # running tasks do not count
    await queue.enqueue(comfy(), owner="k1", max_queued=3)
    stats = await queue.stats()
    assert stats.queued_by_owner == {"k1": 3, "k2": 1}
    assert stats.running_by_owner == {"k1": 1}


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_100k_tasks_then_retention_back_to_baseline(redis: aioredis.Redis) -> None:
    """The issue's retention claim at full size: 100k tasks, then their TTL, then nothing."""
    clock = Clock()
    queue = TaskQueue(redis, QueueSettings(), "big", clock=clock)
    await redis.set("unrelated", "1")
    baseline_keys = await redis.dbsize()
    baseline_dataset = (await redis.memory_stats())["dataset.bytes"]
    n = 100_000
    spec = comfy()

    async def producer(count: int) -> None:
        for _ in range(count):
            await queue.enqueue(spec, owner="k1")

    await asyncio.gather(*(producer(n // 40) for _ in range(40)))

    async def consumer(name: str) -> None:
        while leases := await queue.lease(name, kinds=["comfyui"], limit=20):
            await asyncio.gather(*(queue.ack(le.task_id, le.token, {"n": 1}) for le in leases))

    await asyncio.gather(*(consumer(f"c{i}") for i in range(4)))
    stats = await queue.stats()
    assert stats.queued == 0
    assert stats.running == 0
    assert len((await queue.list(status="succeeded", limit=500)).tasks) == 500
    clock.advance(queue.settings.result_ttl_s + 1)
    while (await queue.requeue_expired(limit=5000)).reaped:
        pass
    assert await redis.dbsize() == baseline_keys + 1  # + the seq counter
    # Data memory (not client buffers or the script cache) comes back too, once Redis's
    # cron has shrunk its hash tables; poll for that instead of guessing a delay.
    growth = 0
    for _ in range(100):
        growth = (await redis.memory_stats())["dataset.bytes"] - baseline_dataset
        if growth < 256 * 1024:
            break
        await asyncio.sleep(0.1)
    assert growth < 256 * 1024
    await queue.aclose()


async def test_waiting_tasks_fail_at_their_maximum_queue_age(
    clock: Clock, store: aioredis.Redis
) -> None:
    """Issue 19 point 8: a task nothing runs does not wait (and count as demand) forever."""
    # A lease long enough for one attempt to run past every deadline below.
    settings = QueueSettings(lease_ttl_s=30 * 86400, heartbeat_interval_s=5)
    queue = TaskQueue(store, settings, "t", clock=clock)
    assert queue.settings.max_queue_age_s == 24 * 3600  # the default
    stale = await queue.enqueue(ollama("no-worker-has-this"), owner="k1")
    short = await queue.enqueue(comfy(max_queue_age_s=60))
    capped = await queue.enqueue(comfy(max_queue_age_s=7 * 86400))  # longer than allowed
    running = await queue.enqueue(ollama("llama3:8b"))
    assert stale.expires_at == clock.now + 24 * 3600
    assert short.expires_at == clock.now + 60
    assert capped.expires_at == stale.expires_at
    assert (await queue.get(short.id)).expires_at == short.expires_at
    (lease,) = await queue.lease("w1", kinds=["ollama"], models=["llama3:8b"])
    assert lease.task_id == running.id

    clock.advance(61)
    assert (await queue.requeue_expired()).expired == 1
    failed = await queue.get(short.id)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error["code"] == "expired"
    assert "queue" in failed.error["message"]
    assert (await queue.get(stale.id)).status == "queued"

    clock.advance(24 * 3600)  # the running attempt goes on past its deadline
    assert await queue.heartbeat(running.id, lease.token) is LeaseOutcome.ok
    assert (await queue.requeue_expired()).expired == 2
    assert (await queue.get(stale.id)).status == "failed"
    assert (await queue.get(capped.id)).status == "failed"
    assert (await queue.get(running.id)).status == "running"
    stats = await queue.stats()
    assert stats.queued == 0
    assert stats.queued_by_owner == {}
    assert stats.queued_by_model == {}
    assert await queue.ack(running.id, lease.token) is LeaseOutcome.ok
    assert await store.zcard(Keys("t").deadlines()) == 0  # finished tasks leave the set
    await queue.aclose()


async def test_a_retry_waiting_past_the_deadline_expires(queue: TaskQueue, clock: Clock) -> None:
    task = await queue.enqueue(comfy(max_queue_age_s=10))
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    clock.advance(11)
    assert (await queue.requeue_expired()).expired == 0  # running: not cut short
    assert await queue.fail(task.id, lease.token, "oom") is LeaseOutcome.retry
    clock.advance(61)  # looked at again a minute later: it waits again, so it fails
    assert (await queue.requeue_expired()).expired == 1
    failed = await queue.get(task.id)
    assert failed.status == "failed"
    assert [e.get("code") for e in failed.errors][-1] == "expired"
    assert (await queue.stats()).delayed == 0
