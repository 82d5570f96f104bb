"""Property: leases come out highest priority first, FIFO within a priority, per matching set.

Runs the real Lua scripts on fakeredis (with its Lua extra) against a plain-Python model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import fakeredis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gpufleet.settings import QueueSettings
from gpufleet.store.queue import TaskQueue
from gpufleet.tasks import TaskSubmit

GRAPH = {"1": {"class_type": "KSampler", "inputs": {}}}
POOLS = ("a", "b", None)
# What a lease may ask for: (pools, kinds).
WORKERS = ((("a",), ("comfyui",)), (("b",), ()), ((), ("comfyui",)), (("a", "b"), ("comfyui",)))


@dataclass
class Waiting:
    id: str
    priority: int
    pool: str | None
    seq: int


put = st.tuples(st.just("put"), st.integers(0, 9), st.sampled_from(POOLS))
take = st.tuples(st.just("take"), st.integers(0, len(WORKERS) - 1), st.integers(1, 4))


def matches(task: Waiting, pools: tuple[str, ...], kinds: tuple[str, ...]) -> bool:
    return task.pool in pools if task.pool else "comfyui" in kinds


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def test_lease_order_matches_model() -> None:
    """The comparison runs on every lease; the count shows many leases took tasks."""
    leases_with_tasks = 0

    async def run(ops: list[tuple[str, int, object]]) -> None:
        nonlocal leases_with_tasks
        redis = fakeredis.FakeAsyncRedis(decode_responses=True)
        queue = TaskQueue(redis, QueueSettings(), "prop", clock=Clock())
        model: list[Waiting] = []
        try:
            for seq, (op, a, b) in enumerate(ops):
                if op == "put":
                    pool = b if isinstance(b, str) else None
                    task = await queue.enqueue(TaskSubmit(payload=GRAPH, priority=a, pool=pool))
                    model.append(Waiting(task.id, a, pool, seq))
                    continue
                pools, kinds = WORKERS[a]
                assert isinstance(b, int)
                leases = await queue.lease("w", pools, kinds=kinds, limit=b)
                expected = sorted(
                    (t for t in model if matches(t, pools, kinds)),
                    key=lambda t: (-t.priority, t.seq),
                )[:b]
                if expected:
                    leases_with_tasks += 1
                    event("a lease that takes tasks")
                assert [lease.task_id for lease in leases] == [t.id for t in expected]
                taken = {t.id for t in expected}
                model = [t for t in model if t.id not in taken]
            assert (await queue.stats()).queued == len(model)
        finally:
            await redis.aclose()

    with asyncio.Runner() as runner:

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(ops=st.lists(st.one_of(put, take), max_size=40))
        def check(ops: list[tuple[str, int, object]]) -> None:
            runner.run(run(ops))

        check()
    assert leases_with_tasks > 0, "no generated sequence leased a task: the order was not checked"
