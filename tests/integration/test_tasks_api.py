"""``/api/v1/tasks`` on a small app (the tasks router only) over a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException

from gpufleet.api.auth import Principal, authenticate
from gpufleet.api.errors import install_error_handlers
from gpufleet.api.tasks import router
from gpufleet.settings import load_settings
from gpufleet.store.apikeys import ApiKey
from gpufleet.store.queue import TaskQueue
from gpufleet.wiring import build_services

SECRET = "tasks-api-test-secret-0123456789"
GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 7, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
}


@pytest.fixture
async def client(redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(
        env_file=None,
        # A configured secret: the key store keeps none in Redis (tests count its keys).
        auth={"enabled": False, "secret": SECRET},
        server={"max_body_bytes": 4096},
        queue={"heartbeat_interval_s": 1},
        results={"dir": tmp_path / "results"},
    )
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    async with contextlib.AsyncExitStack() as stack:
        app.state.services = services = await build_services(settings, redis, stack)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gpufleet") as c:
            c.queue = services.queue  # type: ignore[attr-defined]
            c.app = app  # type: ignore[attr-defined]
            yield c


def queue_of(client: httpx.AsyncClient) -> TaskQueue:
    return client.queue  # type: ignore[attr-defined,no-any-return]


async def test_comfyless_body_is_accepted_as_is(client: httpx.AsyncClient) -> None:
    body = {"workflow_id": "text_to_image_v1", "priority": 5, "payload": GRAPH}
    r = await client.post("/api/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["kind"] == "comfyui"
    assert task["status"] == "queued"
    assert task["workflow_id"] == "text_to_image_v1"
    assert task["payload"] == GRAPH
    got = await client.get(f"/api/v1/tasks/{task['id']}")
    assert got.status_code == 200
    assert got.json()["created_at"] == task["created_at"]


async def test_ollama_task_takes_model_from_body(client: httpx.AsyncClient) -> None:
    body = {"kind": "ollama", "payload": {"api": "embed", "body": {"model": "nomic", "input": "x"}}}
    r = await client.post("/api/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["model"] == "nomic"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"payload": GRAPH, "priority": 10}, "priority"),
        ({"payload": {"1": {"inputs": {}}}}, "payload"),
        ({"kind": "ollama", "payload": {"api": "pull", "body": {}}}, "payload"),
        ({"kind": "sdxl", "payload": GRAPH}, "kind"),
        ({"priority": 1}, "payload"),
        ({"payload": GRAPH, "pool": "Bad Pool"}, "pool"),
    ],
)
async def test_validation_errors_name_the_field(
    client: httpx.AsyncClient, redis: aioredis.Redis, body: dict[str, Any], field: str
) -> None:
    r = await client.post("/api/v1/tasks", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "validation_error"
    assert field in [f["field"] for f in error["fields"]]
    assert await redis.dbsize() == 0


async def test_not_json_is_422(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    r = await client.post("/api/v1/tasks", content=b"{nope", headers={"content-type": "x"})
    assert r.status_code == 422
    assert await redis.dbsize() == 0


async def test_body_over_limit_is_413(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    big = {"payload": {"1": {"class_type": "X", "inputs": {"text": "a" * 5000}}}}
    r = await client.post("/api/v1/tasks", json=big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(10):
            yield b" " * 1000
        yield json.dumps({"payload": GRAPH}).encode()

    r = await client.post("/api/v1/tasks", content=chunks())
    assert r.status_code == 413
    assert await redis.dbsize() == 0


async def test_unknown_task_is_404(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/api/v1/tasks/nosuchtask"),
        ("POST", "/api/v1/tasks/nosuchtask/cancel"),
        ("GET", "/api/v1/tasks/nosuchtask/wait?timeout_s=0"),
        ("GET", "/api/v1/tasks/nosuchtask/events"),
    ]:
        r = await client.request(method, path)
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "task_id", ["NOT-A-TASK", "x" * 65, "bad%20id", "%C3%A9t%C3%A9", "a.b", "0" * 500]
)
async def test_a_malformed_task_id_is_404_like_any_unknown_id(
    client: httpx.AsyncClient, task_id: str
) -> None:
    """A script checking "unknown task -> 404" must not see 422 for an id of another shape."""
    for method, path in [
        ("GET", f"/api/v1/tasks/{task_id}"),
        ("POST", f"/api/v1/tasks/{task_id}/cancel"),
        ("GET", f"/api/v1/tasks/{task_id}/wait?timeout_s=0"),
        ("GET", f"/api/v1/tasks/{task_id}/events"),
        ("GET", f"/api/v1/tasks/{task_id}/outputs"),
        ("GET", f"/api/v1/tasks/{task_id}/outputs/out.png"),
    ]:
        r = await client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        error = r.json()["error"]
        assert error["code"] == "not_found"
        assert "no task" in error["message"]


async def test_idempotency_key_race(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    body = {"payload": GRAPH, "workflow_id": "wf"}
    headers = {"Idempotency-Key": "same-key"}
    answers = await asyncio.gather(
        *(client.post("/api/v1/tasks", json=body, headers=headers) for _ in range(50))
    )
    assert {r.status_code for r in answers} == {202}
    assert len({r.json()["id"] for r in answers}) == 1
    assert (await queue_of(client).stats()).queued == 1
    other = await client.post("/api/v1/tasks", json={**body, "priority": 9}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"


async def test_list_filters_and_pages(client: httpx.AsyncClient) -> None:
    ollama = {"kind": "ollama", "payload": {"api": "chat", "body": {"model": "m"}}}
    ids = []
    for i in range(5):
        body = ollama if i % 2 else {"payload": GRAPH, "pool": "gpu-a"}
        ids.append((await client.post("/api/v1/tasks", json=body)).json()["id"])
    r = await client.get("/api/v1/tasks", params={"limit": 2})
    page = r.json()
    assert [t["id"] for t in page["tasks"]] == ids[::-1][:2]
    assert all(t["payload"] is None for t in page["tasks"])
    r = await client.get("/api/v1/tasks", params={"limit": 10, "cursor": page["next_cursor"]})
    assert [t["id"] for t in r.json()["tasks"]] == ids[::-1][2:]
    r = await client.get("/api/v1/tasks", params={"kind": "ollama"})
    assert [t["id"] for t in r.json()["tasks"]] == [ids[3], ids[1]]
    r = await client.get("/api/v1/tasks", params={"pool": "gpu-a", "status": "queued"})
    assert [t["id"] for t in r.json()["tasks"]] == [ids[4], ids[2], ids[0]]
    r = await client.get("/api/v1/tasks", params={"status": "bogus"})
    assert r.status_code == 422


async def test_next_cursor_is_opaque_and_tells_nothing_of_others_volume(
    client: httpx.AsyncClient,
) -> None:
    """The index position is a global counter: a cursor must not carry it readably."""
    as_key(client, "alice")
    mine = [(await client.post("/api/v1/tasks", json={"payload": GRAPH})).json()["id"]
            for _ in range(3)]
    first = (await client.get("/api/v1/tasks", params={"limit": 1})).json()
    as_key(client, "bob")
    for _ in range(7):
        assert (await client.post("/api/v1/tasks", json={"payload": GRAPH})).status_code == 202
    as_key(client, "alice")
    again = (await client.get("/api/v1/tasks", params={"limit": 1})).json()
    cursor = first["next_cursor"]
    assert cursor
    assert again["next_cursor"]
    assert not cursor.isdigit()
    # The same position twice gives two different tokens: nothing to compare or count.
    assert cursor != again["next_cursor"]
    for token in (cursor, again["next_cursor"]):
        page = (await client.get("/api/v1/tasks", params={"limit": 5, "cursor": token})).json()
        assert [t["id"] for t in page["tasks"]] == mine[::-1][1:]
        assert page["next_cursor"] is None


@pytest.mark.parametrize("cursor", ["3", "12345678901234567890", "not-a-cursor", "AAAA" * 12])
async def test_a_cursor_this_server_did_not_issue_is_400(
    client: httpx.AsyncClient, cursor: str
) -> None:
    await client.post("/api/v1/tasks", json={"payload": GRAPH})
    r = await client.get("/api/v1/tasks", params={"cursor": cursor})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"
    assert "cursor" in r.json()["error"]["message"]


async def test_a_tampered_cursor_is_400(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await client.post("/api/v1/tasks", json={"payload": GRAPH})
    cursor = (await client.get("/api/v1/tasks", params={"limit": 1})).json()["next_cursor"]
    flipped = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
    r = await client.get("/api/v1/tasks", params={"cursor": flipped})
    assert r.status_code == 400, r.text


async def test_cancel_then_409(client: httpx.AsyncClient) -> None:
    task_id = (await client.post("/api/v1/tasks", json={"payload": GRAPH})).json()["id"]
    r = await client.post(f"/api/v1/tasks/{task_id}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    r = await client.post(f"/api/v1/tasks/{task_id}/cancel")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "conflict"


async def test_wait_long_polls_until_finished(client: httpx.AsyncClient) -> None:
    task_id = (await client.post("/api/v1/tasks", json={"payload": GRAPH})).json()["id"]
    waiter = asyncio.create_task(client.get(f"/api/v1/tasks/{task_id}/wait?timeout_s=30"))
    await asyncio.sleep(0.05)
    queue = queue_of(client)
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    await queue.ack(lease.task_id, lease.token, {"images": ["out.png"]})
    r = await waiter
    assert r.status_code == 200
    assert r.json()["status"] == "succeeded"
    assert r.json()["result"] == {"images": ["out.png"]}
    r = await client.get(f"/api/v1/tasks/{task_id}/wait?timeout_s=0")
    assert r.json()["status"] == "succeeded"


async def test_events_stream_every_change(client: httpx.AsyncClient) -> None:
    task_id = (await client.post("/api/v1/tasks", json={"payload": GRAPH})).json()["id"]
    stream = asyncio.create_task(client.get(f"/api/v1/tasks/{task_id}/events"))
    await asyncio.sleep(0.05)
    queue = queue_of(client)
    (lease,) = await queue.lease("w1", kinds=["comfyui"])
    await queue.fail(lease.task_id, lease.token, "invalid graph", retryable=False)
    r = await stream
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in r.text.split("\n\n") if f.startswith("id:")]
    kinds = [line.split(": ", 1)[1] for f in frames for line in f.split("\n") if "event:" in line]
    assert kinds == ["queued", "running", "failed"]
    first_id = frames[0].split("\n")[0].split(": ", 1)[1]
    r = await client.get(f"/api/v1/tasks/{task_id}/events", headers={"Last-Event-ID": first_id})
    assert r.text.count("event: ") == 2


def as_key(client: httpx.AsyncClient, key_id: str, **limits: Any) -> None:
    """Make the app believe every request comes with this (non-admin) API key."""
    key = ApiKey(id=key_id, name=key_id, email="", role="user", created_at=0.0, **limits)
    app: FastAPI = client.app  # type: ignore[attr-defined]
    app.dependency_overrides[authenticate] = lambda: Principal(key)


async def test_keys_see_only_their_own_tasks(client: httpx.AsyncClient) -> None:
    as_key(client, "alice")
    mine = (await client.post("/api/v1/tasks", json={"payload": GRAPH})).json()
    assert mine["owner"] == "alice"
    as_key(client, "bob")
    theirs = (await client.post("/api/v1/tasks", json={"payload": GRAPH})).json()
    assert (await client.get(f"/api/v1/tasks/{mine['id']}")).status_code == 404
    assert (await client.post(f"/api/v1/tasks/{mine['id']}/cancel")).status_code == 404
    listed = (await client.get("/api/v1/tasks")).json()["tasks"]
    assert [t["id"] for t in listed] == [theirs["id"]]


async def test_key_limits(client: httpx.AsyncClient) -> None:
    as_key(client, "carol", max_priority=5, max_queued=2)
    r = await client.post("/api/v1/tasks", json={"payload": GRAPH, "priority": 9})
    assert r.status_code == 403
    for _ in range(2):
        assert (await client.post("/api/v1/tasks", json={"payload": GRAPH})).status_code == 202
    r = await client.post("/api/v1/tasks", json={"payload": GRAPH})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"


async def test_a_client_leaving_mid_body_is_a_quiet_400(api: Any) -> None:
    from starlette.requests import Request

    from gpufleet.api.tasks import read_limited_body

    messages = [
        {"type": "http.request", "body": b'{"kind": "comfyui", ', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/tasks", "headers": [],
             "app": api.app}
    with pytest.raises(HTTPException) as left:  # not starlette's ClientDisconnect traceback
        await read_limited_body(Request(scope, receive))
    assert left.value.status_code == 400


@pytest.fixture
async def pooled(redis: aioredis.Redis) -> AsyncIterator[httpx.AsyncClient]:
    """The tasks router with two configured pools and a small default max_queued."""
    settings = load_settings(
        env_file=None,
        auth={"enabled": False, "default_max_queued": 3, "secret": SECRET},
        pools=[
            {"name": "comfy", "provider": "static", "engine": "comfyui", "urls": ["http://h:1"]},
            {"name": "llm", "provider": "static", "engine": "ollama", "urls": ["http://h:2"],
             "models": ["llama3.2", "qwen2.5:7b"]},
        ],
    )
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    async with contextlib.AsyncExitStack() as stack:
        app.state.services = services = await build_services(settings, redis, stack)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gpufleet") as c:
            c.queue = services.queue  # type: ignore[attr-defined]
            c.app = app  # type: ignore[attr-defined]
            yield c


def chat(model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return {"kind": "ollama", "payload": {"api": "chat", "body": body}, **extra}


async def test_a_task_nothing_serves_is_422_naming_what_is_missing(
    pooled: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    """Issue 19 point 8: such a task would never run and keep a pool scaled up."""
    cases = [
        (chat("mistral:7b"), "no ollama pool serves model 'mistral:7b'"),
        (chat("mistral:7b", pool="llm"), "pool 'llm' does not serve model 'mistral:7b'"),
        ({"payload": GRAPH, "pool": "llm"}, "pool 'llm' runs ollama, not comfyui"),
        ({"payload": GRAPH, "model": "sdxl.safetensors", "pool": "nope"}, "unknown pool 'nope'"),
    ]
    for body, message in cases:
        refused = await pooled.post("/api/v1/tasks", json=body)
        assert refused.status_code == 422, body
        assert message in refused.text, refused.text
    assert "llama3.2" in (await pooled.post("/api/v1/tasks", json=chat("nope"))).text
    assert await redis.dbsize() == 0  # nothing was stored
    for body in (chat("llama3.2"), chat("qwen2.5:7b", pool="llm"), {"payload": GRAPH}):
        assert (await pooled.post("/api/v1/tasks", json=body)).status_code == 202, body


async def test_a_kind_no_pool_runs_is_422(redis: aioredis.Redis) -> None:
    settings = load_settings(env_file=None, auth={"enabled": False}, pools=[
        {"name": "llm", "provider": "static", "engine": "ollama", "urls": ["http://h:2"]}])
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    async with contextlib.AsyncExitStack() as stack:
        app.state.services = await build_services(settings, redis, stack)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gpufleet") as c:
            refused = await c.post("/api/v1/tasks", json={"payload": GRAPH})
            assert refused.status_code == 422
            assert "no pool runs comfyui tasks" in refused.text
            # An Ollama pool without a models list serves any model.
            assert (await c.post("/api/v1/tasks", json=chat("anything:1b"))).status_code == 202


async def test_keys_without_their_own_max_queued_get_the_default(
    pooled: httpx.AsyncClient,
) -> None:
    as_key(pooled, "dave")
    for _ in range(3):
        assert (await pooled.post("/api/v1/tasks", json={"payload": GRAPH})).status_code == 202
    limited = await pooled.post("/api/v1/tasks", json={"payload": GRAPH})
    assert limited.status_code == 429
    assert "limit 3" in limited.json()["error"]["message"]
    as_key(pooled, "erin", max_queued=5)  # a key's own limit wins over the default
    for _ in range(5):
        assert (await pooled.post("/api/v1/tasks", json={"payload": GRAPH})).status_code == 202
    assert (await pooled.post("/api/v1/tasks", json={"payload": GRAPH})).status_code == 429
    # Admin keys (operators' bulk jobs) are bound only by a max_queued of their own.
    admin = ApiKey(id="ops", name="ops", email="", role="admin", created_at=0.0)
    pooled.app.dependency_overrides[authenticate] = lambda: Principal(admin)  # type: ignore[attr-defined]
    for _ in range(5):
        assert (await pooled.post("/api/v1/tasks", json={"payload": GRAPH})).status_code == 202


async def test_submitted_tasks_show_when_they_expire(pooled: httpx.AsyncClient) -> None:
    task = (await pooled.post("/api/v1/tasks", json={"payload": GRAPH,
                                                    "max_queue_age_s": 600})).json()
    assert task["expires_at"] == pytest.approx(task["created_at"] + 600)
    default = (await pooled.post("/api/v1/tasks", json={"payload": GRAPH})).json()
    assert default["expires_at"] == pytest.approx(default["created_at"] + 86400)
    bad = await pooled.post("/api/v1/tasks", json={"payload": GRAPH, "max_queue_age_s": 0})
    assert bad.status_code == 422


async def test_user_keys_see_their_tasks_workers_by_alias_and_no_worker_urls(
    client: httpx.AsyncClient,
) -> None:
    """Issue 19 point 6: a Novita worker's id is its instance id, and engine errors quote
    the worker's URL; neither reaches a user key through its own tasks."""
    from gpufleet.domain import public_worker_id

    as_key(client, "frank")
    task_id = (await client.post("/api/v1/tasks", json={"payload": GRAPH})).json()["id"]
    queue = queue_of(client)
    (lease,) = await queue.lease("inst-9f2c41d0", kinds=["comfyui"])
    await queue.fail(task_id, lease.token,
                     "comfyui: GET https://inst-9f2c41d0-8188.gpu.example/history/x timed out")
    seen = await client.get(f"/api/v1/tasks/{task_id}")
    assert seen.status_code == 200
    assert "inst-9f2c41d0" not in seen.text
    assert "gpu.example" not in seen.text
    task = seen.json()
    alias = public_worker_id("inst-9f2c41d0")
    assert task["worker"] == alias
    assert task["errors"][0]["worker"] == alias
    assert task["errors"][0]["message"] == "comfyui: GET <worker> timed out"
    listed = await client.get("/api/v1/tasks")
    assert "inst-9f2c41d0" not in listed.text
    await queue.cancel(task_id)
    events = await client.get(f"/api/v1/tasks/{task_id}/events")
    assert "running" in events.text
    assert alias in events.text
    assert "inst-9f2c41d0" not in events.text
    client.app.dependency_overrides.clear()  # type: ignore[attr-defined]
    admin = (await client.get(f"/api/v1/tasks/{task_id}")).json()  # auth off: admin
    assert admin["worker"] == "inst-9f2c41d0"
    assert "gpu.example" in admin["errors"][0]["message"]
