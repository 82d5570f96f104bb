"""Pool history recorded by the live service, on real Redis.

Replicas record concurrently and lose nothing; a restart keeps it; the real recording hooks
fire: an accepted task is an arrival, a task the dispatcher finishes is a service sample, a
worker the reconciler sees become ready is a boot (create, then revive), and the reconciler's
demand levels become idle gaps. Recording never fails the request it rides on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gpufleet.engines.simulated import OllamaConfig, SimulatedOllama
from gpufleet.results import DirectoryResultStore
from gpufleet.settings import load_settings
from gpufleet.store.history import HistoryStore
from gpufleet.store.keys import Keys
from gpufleet.store.queue import TaskQueue
from gpufleet.tasks import TaskSubmit
from tests.integration import test_dispatch as dispatch_harness
from tests.reconciler_harness import COMFY, Fleet

pytestmark = pytest.mark.timeout(60)

T0 = 1_767_225_600.0
GRAPH = {"1": {"class_type": "KSampler", "inputs": {"seed": 1}}}  # 2026-01-01T00:00:00Z


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pools() -> Any:
    return load_settings(
        env_file=None,
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui",
             "urls": ["http://127.0.0.1:1"]},
            {"name": "llm", "provider": "static", "engine": "ollama", "slots": 4,
             "models": ["llama3.2"], "urls": ["http://127.0.0.1:1"]},
        ],
    ).pools


async def test_two_replicas_record_concurrently_and_a_restart_keeps_every_sample(
    redis_url: str, redis: aioredis.Redis
) -> None:
    clock = Clock(T0 + 3600)
    clients = [aioredis.Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
    replicas = [HistoryStore(c, prefix="h", clock=clock, pools=pools()) for c in clients]

    async def record(store: HistoryStore, rounds: int) -> None:
        for i in range(rounds):
            store.note_arrival("llm", 2)
            store.note_service("llm", 1.0 + i % 7, model="llama3.2")
            if i % 10 == 0:
                store.note_boot("llm", "create", 90.0)
            await asyncio.sleep(0)
            if i % 3 == 0:
                await store.flush()
        await store.service("comfy", 12.0)  # the direct, awaited form as well

    await asyncio.gather(record(replicas[0], 150), record(replicas[1], 100))
    await asyncio.gather(*(r.aclose() for r in replicas))

    got = (await replicas[0].summary(["llm", "comfy"]))
    assert got == await replicas[1].summary(["llm", "comfy"])  # one shared history
    assert got["llm"].arrivals == 2 * (150 + 100)
    # all 500 in this minute: a burst shows at once (history.recent_rate), not diluted over 10 min
    minute_s = clock() % 60.0
    assert got["llm"].arrivals_per_s == pytest.approx(max(500 / 600, 500 / (60.0 + minute_s)))
    assert got["llm"].service_s.total == 250
    assert got["llm"].boot_s["create"].total == 15 + 10
    assert got["comfy"].service_s.total == 2
    per_model = await replicas[0].model_service("llm")
    assert per_model["llama3.2:latest"].service_s.total == 250

    # a restart: a new instance (new connection) on the same Redis sees all of it
    for c in clients:
        await c.aclose()
    fresh = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        again = await HistoryStore(fresh, prefix="h", clock=clock, pools=pools()).summary(
            ["llm", "comfy"]
        )
        assert again == got
        # and the keys carry their window as a TTL: nothing lives forever
        day_ttl = await fresh.ttl(Keys("h").history_day("llm", int(clock.now // 86400)))
        assert 7 * 86400 < day_ttl <= 8 * 86400
        minute_ttl = await fresh.ttl(Keys("h").history_arrivals("llm", int(clock.now // 60)))
        assert 0 < minute_ttl <= 720
    finally:
        await fresh.aclose()


async def test_the_dispatcher_records_service_and_the_queue_arrivals(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        queue={"lease_ttl_s": 2.0, "heartbeat_interval_s": 0.2},
        pools=[{"name": "comfy", "provider": "static", "engine": "comfyui",
                "urls": ["http://127.0.0.1:1"]},
               {"name": "llm", "provider": "static", "engine": "ollama", "slots": 4,
                "models": ["llama3.2"], "urls": ["http://127.0.0.1:1"]}],
    )
    history = HistoryStore(redis, prefix="gpufleet", pools=settings.pools)
    async with httpx.AsyncClient(trust_env=False) as http:
        fleet = dispatch_harness.Fleet(redis, settings, http, DirectoryResultStore(tmp_path))
        fleet.queue.history = history
        fleet.dispatcher.history = history
        async with fleet.stack:
            try:
                sim = SimulatedOllama(OllamaConfig(models=("llama3.2",), first_token_s=0.01))
                await fleet.add("o0", "llm", sim, slots=4, models=("llama3.2:latest",))
                # no pool named: an engine-wide task counts for the ollama pool "llm"
                tasks = [
                    await fleet.submit("ollama", dispatch_harness.chat()) for _ in range(3)
                ]
                await history.flush()
                arrived = (await history.summary(["llm"]))["llm"]
                assert arrived.arrivals == 3
                assert arrived.service_s.total == 0

                done = await fleet.run_until_finished([t.id for t in tasks])
                assert {t.status.value for t in done} == {"succeeded"}
            finally:
                await fleet.dispatcher.aclose()
        await fleet.queue.aclose()
    await history.flush()
    served = (await history.summary(["llm", "comfy"]))
    assert served["llm"].service_s.total == 3
    assert served["comfy"].service_s.total == 0
    per_model = await history.model_service("llm")
    assert per_model["llama3.2:latest"].service_s.total == 3


@pytest.fixture
async def fleet(redis: aioredis.Redis) -> AsyncIterator[Fleet]:
    f = Fleet(redis, pools=[COMFY])
    yield f
    await f.aclose()


async def test_reconciler_records_boots_per_source_and_idle_gaps_into_the_snapshot(
    fleet: Fleet,
) -> None:
    r = fleet.reconciler()
    await fleet.enqueue(1, pool="comfy")
    await r.reconcile_once()  # create
    fleet.clock.advance(13)
    await r.reconcile_once()  # the instance runs: booting
    (worker_id,) = await fleet.ready_all()
    report = await r.reconcile_once()  # ready: a "create" boot of ~13 s
    assert report.snapshot is not None
    seen = report.snapshot.history["comfy"]
    assert seen.boot_s["create"].total == 1
    assert 8 < seen.boot_s["create"].mean() < 20
    assert "revive" not in seen.boot_s

    (lease,) = await fleet.queue.lease(worker_id, ["comfy"])
    await fleet.queue.ack(lease.task_id, lease.token, {"ok": True})
    fleet.clock.advance(121)  # idle past the 120 s timeout: demand 0, level 1's gap opens
    await r.reconcile_once()
    fleet.clock.advance(10)
    await r.reconcile_once()
    assert (await fleet.states())[worker_id] == "stopped"

    await fleet.enqueue(1, pool="comfy")  # the gap closes; the worker is started again
    await r.reconcile_once()
    fleet.clock.advance(5)
    await r.reconcile_once()
    assert await fleet.ready_all() == [worker_id]
    report = await r.reconcile_once()
    assert report.snapshot is not None
    seen = report.snapshot.history["comfy"]
    assert seen.boot_s["create"].total == 1
    assert seen.boot_s["revive"].total == 1
    assert len(seen.idle_gaps_s) == 1
    assert seen.gaps(1).total == 1
    # opened at the tick after 121 s, closed 10 s later (gaps under 5 s are not recorded)
    assert 8 < seen.gaps(1).mean() < 12
    # the leader keeps the gap clocks in Redis, so the next leader carries on
    state = await fleet.redis.hgetall(Keys("rt").history_levels("comfy"))
    assert state == {"level": "1"}


@pytest.fixture
async def api(redis_url: str, redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Any]:
    """The whole app (``create_app``, lifespan running) with a ComfyUI and an Ollama pool."""
    from gpufleet.app import create_app

    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        results={"dir": tmp_path / "results"},
        auth={"enabled": False},
        pools=[{"name": "comfy", "provider": "static", "engine": "comfyui",
                "urls": ["http://127.0.0.1:1"]},
               {"name": "llm", "provider": "static", "engine": "ollama",
                "models": ["llama3.2"], "urls": ["http://127.0.0.1:1"]}],
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gpufleet") as client:
            client.services = app.state.services  # type: ignore[attr-defined]
            client.app = app  # type: ignore[attr-defined]
            yield client


async def test_an_accepted_task_is_an_arrival_once_and_a_history_outage_fails_nothing(
    api: Any,
) -> None:
    history: HistoryStore = api.services.history
    queue: TaskQueue = api.services.queue
    assert queue.history is history  # one recorder for the whole app
    assert api.app.state.proxy.history is history
    assert api.services.dispatcher.history is history
    assert api.services.reconciler.history is history
    body = {"kind": "comfyui", "payload": GRAPH}
    first = await api.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
    again = await api.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    await history.flush()
    got = await history.summary(["comfy", "llm"])
    assert got["comfy"].arrivals == 1  # not 2: the duplicate is the same task
    assert got["llm"].arrivals == 0

    # history's Redis is unreachable: the task is still accepted, the sample just dropped
    live = history.redis
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    history.redis = dead
    try:
        answer = await api.post("/api/v1/tasks", json=body)
        assert answer.status_code == 202
        assert (await queue.get(answer.json()["id"])).status.value == "queued"
        assert await history.flush() == 0
        assert history.pending == 0
    finally:
        history.redis = live
        await dead.aclose()


async def test_recording_on_an_unreachable_redis_never_raises_into_enqueue(
    redis: aioredis.Redis,
) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    history = HistoryStore(dead, prefix="h", pools=pools())
    queue = TaskQueue(redis, load_settings(env_file=None).queue, key_prefix="h", history=history)
    try:
        task = await queue.enqueue(TaskSubmit(kind="comfyui", payload=GRAPH, pool="comfy"))
        assert task.status.value == "queued"
        # the arrival is buffered: its hour-of-day field and the day-seen mark, the minute counter
        assert history.pending == 3
        assert await history.flush() == 0  # the write fails quietly; the task is in the queue
        assert (await queue.get(task.id)).status.value == "queued"
    finally:
        await queue.aclose()
        await dead.aclose()


async def test_get_pool_shows_what_its_history_says(api: Any) -> None:
    history: HistoryStore = api.services.history
    for seconds in (2.0, 2.0, 2.0, 40.0):
        history.note_service("llm", seconds, model="llama3.2")
    history.note_boot("llm", "revive", 30.0)
    history.note_arrival("llm", 4)
    await history.flush()
    clock = Clock(time.time())
    history.clock, real = clock, history.clock
    try:
        for demand in (1, 0, 1):  # level 1 idles 20 s: one gap
            await history.demands({"llm": (demand, 1)})
            clock.now += 20
    finally:
        history.clock = real

    body = (await api.get("/api/v1/pools/llm")).json()
    seen = body["history"]
    assert seen["arrivals"] == 4
    assert seen["service"]["samples"] == 4
    assert 1.5 < seen["service"]["mean_s"] < 15 < seen["service"]["p95_s"]
    assert seen["service_by_model"]["llama3.2:latest"]["samples"] == 4
    assert list(seen["boot"]) == ["revive"]
    assert 25 < seen["boot"]["revive"]["mean_s"] < 35
    assert [g["level"] for g in seen["idle_gaps"]] == [1]
    assert 15 < seen["idle_gaps"][0]["mean_s"] < 25
    assert (await api.get("/api/v1/pools/comfy")).json()["history"]["service"]["samples"] == 0
