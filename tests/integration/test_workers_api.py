"""/api/v1/workers against a real Redis."""

from __future__ import annotations

from typing import Any

from gpufleet.domain import WorkerState


async def test_list_get_metrics_and_drain(api: Any) -> None:
    registry = api.components.registry
    await registry.register(pool="a", provider="static", slots=2, worker_id="w1",
                            state=WorkerState.ready, base_url="http://h:1")
    await registry.register(pool="a", provider="static", slots=1, worker_id="w2",
                            state=WorkerState.booting)
    await registry.register(pool="b", provider="novita", slots=1, worker_id="w3",
                            state=WorkerState.ready)
    await registry.acquire_slot("w3")

    listed = (await api.get("/api/v1/workers")).json()
    assert [w["id"] for w in listed] == ["w1", "w2", "w3"]
    assert listed[0]["free_slots"] == 2
    assert listed[0]["uptime_s"] is not None
    assert [w["id"] for w in (await api.get("/api/v1/workers?pool=a&state=ready")).json()] == ["w1"]
    assert (await api.get("/api/v1/workers?state=bogus")).status_code == 422

    metrics = (await api.get("/api/v1/workers/metrics")).json()
    assert metrics["total_workers"] == 3
    assert metrics["starting_workers"] == 1
    assert metrics["running_workers"] == 1  # w3 holds a slot
    assert metrics["idle_workers"] == 1
    assert metrics["by_pool"]["a"] == {"ready": 1, "booting": 1}

    one = await api.get("/api/v1/workers/w3")
    assert one.json()["busy_slots"] == 1
    missing = await api.get("/api/v1/workers/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"

    drained = await api.post("/api/v1/workers/w1/drain")
    assert drained.status_code == 200
    assert drained.json()["state"] == "draining"
    assert (await api.post("/api/v1/workers/w1/drain")).status_code == 200  # idempotent
    conflict = await api.post("/api/v1/workers/w2/drain")
    assert conflict.status_code == 409
    assert "booting" in conflict.json()["error"]["message"]
    events = await api.components.events.recent()
    assert events[0]["worker"] == "w1"
    assert events[0]["state"] == "draining"
