"""Batched slot operations (``SlotBatcher``) keep the registry's guarantees on real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gpufleet.domain import WorkerState
from gpufleet.loopback import free_port
from gpufleet.store.connection import EmbeddedRedis, connect
from gpufleet.store.workers import BUSY_WRITTEN_EVERY_S, SlotBatcher, WorkerRegistry


async def test_batched_acquires_across_replicas_never_give_a_slot_twice(
    redis: aioredis.Redis,
) -> None:
    registries = [WorkerRegistry(redis) for _ in range(3)]  # three "replicas"
    batchers = [SlotBatcher(r) for r in registries]
    await registries[0].register(pool="p", provider="static", slots=5, worker_id="w",
                                 state=WorkerState.ready)
    tokens = await asyncio.gather(*(batchers[i % 3].acquire("w") for i in range(120)))
    held = [t for t in tokens if t]
    assert len(held) == 5
    assert await registries[0].busy("w") == 5
    released = await asyncio.gather(*(batchers[1].release("w", t) for t in held[:2]))
    assert released == [True, True]
    assert not await batchers[2].release("w", held[0])
    again = await asyncio.gather(*(batchers[2].acquire("w") for _ in range(10)))
    assert sum(1 for t in again if t) == 2
    for batcher in batchers:
        await batcher.aclose()


async def test_an_acquire_whose_caller_left_gives_its_slot_back(redis: aioredis.Redis) -> None:
    registry = WorkerRegistry(redis)
    batcher = SlotBatcher(registry)
    await registry.register(pool="p", provider="static", slots=1, worker_id="w",
                            state=WorkerState.ready)
    abandoned = asyncio.ensure_future(batcher.acquire("w"))
    await asyncio.sleep(0)  # queued: the flusher has not sent it yet
    abandoned.cancel()
    for _ in range(100):  # the slot is taken by the script, then handed back
        if not batcher._pending and (batcher._flusher is None or batcher._flusher.done()):
            break
        await asyncio.sleep(0.01)
    assert await registry.busy("w") == 0
    assert await batcher.acquire("w") is not None
    await batcher.aclose()


async def test_scripts_flushed_from_redis_are_loaded_again(redis: aioredis.Redis) -> None:
    registry = WorkerRegistry(redis)
    batcher = SlotBatcher(registry)
    await registry.register(pool="p", provider="static", slots=2, worker_id="w",
                            state=WorkerState.ready)
    await redis.script_flush()
    token = await batcher.acquire("w")
    assert token is not None
    assert await batcher.release("w", token)
    await batcher.aclose()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of its own with ``appendfsync always``, whose AOF the test reads."""
    started = EmbeddedRedis(tmp_path / "redis", port=free_port(), appendfsync="always")
    started.start()
    try:
        yield started
    finally:
        started.stop()


async def test_proxy_holds_stay_out_of_the_aof_while_task_holds_are_written(
    server: EmbeddedRedis,
) -> None:
    """``appendfsync always`` fsyncs only what reaches the AOF: a proxied request's slot
    (the batcher's ephemeral hold) is not written there; a queued task's slot (the
    registry's own acquire, which the dispatcher uses) still is, as are the workers."""
    redis = connect(server.url)
    clock = FixedClock()  # within one BUSY_WRITTEN_EVERY_S: only the first release is written
    try:
        registry = WorkerRegistry(redis, clock=clock)
        batcher = SlotBatcher(registry)
        await registry.register(pool="p", provider="static", slots=3, worker_id="w",
                                state=WorkerState.ready)
        warm = await batcher.acquire("w")  # the first call loads the scripts (SCRIPT LOAD)
        assert warm is not None
        await batcher.release("w", warm)
        before = _aof_bytes(server)
        proxied = await batcher.acquire("w")
        assert proxied is not None
        assert await registry.busy("w") == 1  # held all the same
        assert await batcher.release("w", proxied)
        assert _aof_bytes(server) == before  # neither the hold nor its release was written
        task = await registry.acquire_slot("w")
        assert task is not None
        assert task.encode() in _aof_bytes(server)[len(before):]
        await batcher.aclose()
    finally:
        await redis.aclose()


@dataclass
class FixedClock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


async def test_one_proxied_release_per_worker_and_interval_is_written(
    server: EmbeddedRedis,
) -> None:
    """The proxy's releases skip the AOF, but not all of them: the first of each worker in
    every BUSY_WRITTEN_EVERY_S is written, so the worker's last_busy_at on disk (what idle
    scale-down reads after a Redis restart) is never older than that."""
    redis = connect(server.url)
    clock = FixedClock()
    try:
        registry = WorkerRegistry(redis, clock=clock)
        batcher = SlotBatcher(registry)
        for worker_id in ("a", "b"):
            await registry.register(pool="p", provider="static", slots=4,
                                    worker_id=worker_id, state=WorkerState.ready)
        start = _aof_bytes(server)

        async def serve_one(worker_id: str, quiet: bool) -> str:
            token = await batcher.acquire(worker_id)
            assert token is not None
            if quiet:
                batcher.release_now(worker_id, token)
            else:
                assert await batcher.release(worker_id, token)
            return token

        first = await serve_one("a", quiet=True)
        clock.now += 1
        second = await serve_one("a", quiet=False)
        other = await serve_one("b", quiet=False)
        clock.now += BUSY_WRITTEN_EVERY_S
        third = await serve_one("a", quiet=True)
        await batcher.release("a", "no-such-token")  # a round trip: the quiet ones are in
        written = _aof_bytes(server)[len(start):]
        assert first.encode() in written  # a's first release
        assert second.encode() not in written  # a again, 1 s later: memory only
        assert other.encode() in written  # b's first release
        assert third.encode() in written  # a, an interval later
        assert await registry.busy("a") == 0
        await batcher.aclose()
    finally:
        await redis.aclose()


async def test_after_a_redis_crash_a_renewed_worker_was_busy_until_the_renewal(
    server: EmbeddedRedis,
) -> None:
    """The proxy's holds are forgotten when redis-server dies (they never reach the AOF),
    but the keeper's renewal is written: the worker comes back busy as of the last renewal,
    not idle since its last written release, so idle scale-down does not stop it under a
    long request."""
    redis = connect(server.url)
    clock = FixedClock()
    try:
        registry = WorkerRegistry(redis, clock=clock)
        batcher = SlotBatcher(registry)
        await registry.register(pool="p", provider="static", slots=2, worker_id="w",
                                state=WorkerState.ready)
        warm = await batcher.acquire("w")
        assert warm is not None
        assert await batcher.release("w", warm)  # written: last_busy_at = start on disk
        long_request = await batcher.acquire("w")
        assert long_request is not None
        clock.now += 600  # ten minutes into one long stream
        assert await registry.renew_held({"w": [long_request], "gone": ["x"]}) == 1
        assert await registry.busy("w") == 1
        assert await redis.exists(registry.keys.worker("gone")) == 0  # not re-created
        await batcher.aclose()
        await redis.aclose()
        server.kill()
        server.stop()
        server.start()
        redis = connect(server.url)
        registry = WorkerRegistry(redis, clock=clock)
        worker = await registry.get("w")
        assert worker is not None
        assert worker.last_busy_at == pytest.approx(clock.now)
        assert worker.state is WorkerState.ready
        assert await registry.busy("w") == 0  # the hold itself was ephemeral
    finally:
        await redis.aclose()


def _aof_bytes(server: EmbeddedRedis) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(server.data_dir.rglob("*.aof*")))


async def test_release_now_frees_the_slot_without_a_reply(redis: aioredis.Redis) -> None:
    """The end of a proxied answer sends its release at the end of the loop turn and asks
    Redis not to answer (nothing wakes the proxy for it); a command sent after it, even in
    the same turn, reaches Redis after it and gets its own reply, not the skipped one."""
    registry = WorkerRegistry(redis)
    batcher = SlotBatcher(registry)
    await registry.register(pool="p", provider="static", slots=1, worker_id="w",
                            state=WorkerState.ready)
    token = await batcher.acquire("w")  # connects the lean client
    assert token is not None
    assert batcher._resp is not None
    assert batcher._resp._protocol is not None
    batcher.release_now("w", token)
    assert not batcher._pending  # not in the pipeline of replies
    assert not batcher._resp._protocol.waiting  # no reply is awaited
    again = await batcher.acquire("w")  # same connection: after the release, so it fits
    assert again is not None
    assert await registry.busy("w") == 1
    assert await batcher.release("w", again) is True  # replies still pair up
    assert await registry.busy("w") == 0
    await batcher.aclose()


async def test_release_now_before_any_connection_goes_in_the_next_pipeline(
    redis: aioredis.Redis,
) -> None:
    registry = WorkerRegistry(redis)
    await registry.register(pool="p", provider="static", slots=1, worker_id="w",
                            state=WorkerState.ready)
    token = await registry.acquire_slot("w")
    assert token is not None
    batcher = SlotBatcher(registry)  # its lean connection is not up yet
    batcher.release_now("w", token)
    for _ in range(100):
        if await registry.busy("w") == 0:
            break
        await asyncio.sleep(0.01)
    assert await registry.busy("w") == 0
    await batcher.aclose()


class _Recording:
    """A transport that records its writes (uvloop's cannot be patched in place)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def test_the_releases_of_one_loop_turn_go_out_in_one_write(redis: aioredis.Redis) -> None:
    registry = WorkerRegistry(redis)
    batcher = SlotBatcher(registry)
    await registry.register(pool="p", provider="static", slots=3, worker_id="w",
                            state=WorkerState.ready)
    tokens = [await batcher.acquire("w") for _ in range(3)]
    assert batcher._resp is not None
    protocol = batcher._resp._protocol
    assert protocol is not None
    recording = _Recording(protocol.transport)
    protocol.transport = recording  # type: ignore[assignment]
    for token in tokens:
        assert token is not None
        batcher.release_now("w", token)
    assert recording.writes == []  # not yet: at the end of this turn
    await asyncio.sleep(0)
    assert len(recording.writes) == 1
    assert recording.writes[0].count(b"SKIP") == 3
    for _ in range(100):
        if await registry.busy("w") == 0:
            break
        await asyncio.sleep(0.01)
    assert await registry.busy("w") == 0
    await batcher.aclose()
