"""/api/v1/workers against a real Redis."""

from __future__ import annotations

from typing import Any

from gpufleet.domain import WorkerState


async def test_list_get_metrics_and_drain(api: Any) -> None:
    registry = api.services.registry
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
    events = await api.services.events.recent()
    assert events[0]["worker"] == "w1"
    assert events[0]["state"] == "draining"


async def _user(api: Any) -> dict[str, str]:
    _, key = await api.keys.create("tenant", role="user")
    return {"Authorization": f"Bearer {key}"}


async def test_user_keys_never_see_worker_urls_instance_ids_or_costs(api: Any) -> None:
    registry = api.services.registry
    await registry.register(
        pool="gpu", provider="novita", slots=1, worker_id="inst-4f2a9c", state=WorkerState.ready,
        instance_id="inst-4f2a9c", base_url="https://inst-4f2a9c-8188.gpu.example",
        price_per_hour=0.7,
    )
    await registry.transition("inst-4f2a9c", WorkerState.draining,
                              "instance running at https://inst-4f2a9c-8188.gpu.example")
    user = await _user(api)
    listed = await api.get("/api/v1/workers", headers=user)
    assert listed.status_code == 200
    (seen,) = listed.json()
    text = listed.text
    assert "inst-4f2a9c" not in text
    assert "gpu.example" not in text
    for field in ("base_url", "instance_id", "last_error", "cost_usd", "price_per_hour"):
        assert field not in seen
    assert seen["pool"] == "gpu"
    assert seen["state"] == "draining"
    assert seen["slots"] == 1
    # Users address the worker by its alias; the real id is unknown to them.
    one = await api.get(f"/api/v1/workers/{seen['id']}", headers=user)
    assert one.status_code == 200
    assert "inst-4f2a9c" not in one.text
    assert "base_url" not in one.json()
    assert (await api.get("/api/v1/workers/inst-4f2a9c", headers=user)).status_code == 404
    # Admin keys see everything.
    admin = (await api.get("/api/v1/workers/inst-4f2a9c")).json()
    assert admin["base_url"] == "https://inst-4f2a9c-8188.gpu.example"
    assert admin["instance_id"] == "inst-4f2a9c"
    assert admin["price_per_hour"] == 0.7


async def test_user_key_cannot_drain_a_worker(api: Any) -> None:
    registry = api.services.registry
    await registry.register(pool="a", provider="static", slots=1, worker_id="w1",
                            state=WorkerState.ready, base_url="http://h:1")
    user = await _user(api)
    alias = (await api.get("/api/v1/workers", headers=user)).json()[0]["id"]
    for worker_id in ("w1", alias):
        refused = await api.post(f"/api/v1/workers/{worker_id}/drain", headers=user)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "forbidden"
    assert (await registry.get("w1")).state is WorkerState.ready
    assert (await api.post("/api/v1/workers/w1/drain")).status_code == 200
