"""Teams on a real Redis, two replicas: isolation, shared limits, team admins, budgets (402)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gpufleet.app import create_app
from gpufleet.settings import load_settings
from gpufleet.store.apikeys import ApiKeyStore
from gpufleet.store.teams import Periods, TeamStore

GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
}
TASK = {"payload": GRAPH}


class Replicas:
    """Two gpufleet apps on one Redis; ``as_(key, i)`` is a client of replica ``i``."""

    def __init__(self, apps: list[Any], admin: str) -> None:
        self.apps = apps
        self.admin = admin
        self.clients: list[httpx.AsyncClient] = []

    def as_(self, key: str, i: int = 0) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.apps[i % 2]),
            base_url="http://gpufleet",
            headers={"Authorization": f"Bearer {key}"},
        )
        self.clients.append(client)
        return client

    async def key(self, name: str, **fields: Any) -> tuple[str, str]:
        """(id, secret) of a new key, made through replica 0's API by the admin."""
        r = await self.as_(self.admin).post("/api/v1/keys", json={"name": name, **fields})
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["key"]


@pytest.fixture
async def replicas(
    redis_url: str, redis: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Replicas]:
    apps = [
        create_app(
            load_settings(
                env_file=None,
                redis={"url": redis_url},
                results={"dir": tmp_path / f"results{i}"},
                auth={"key_cache_ttl_s": 0},
            )
        )
        for i in range(2)
    ]
    async with apps[0].router.lifespan_context(apps[0]), apps[1].router.lifespan_context(apps[1]):
        store: ApiKeyStore = apps[0].state.services.apikeys
        _, admin = await store.create("admin", role="admin")
        r = Replicas(apps, admin)
        try:
            yield r
        finally:
            for client in r.clients:
                await client.aclose()


async def test_teams_crud_and_admin_only(replicas: Replicas) -> None:
    admin = replicas.as_(replicas.admin, 1)
    made = await admin.post("/api/v1/teams", json={"name": "ml", "budget_day_usd": 5})
    assert made.status_code == 201, made.text
    assert made.json()["budget_day_usd"] == 5
    assert (await admin.post("/api/v1/teams", json={"name": "ml"})).status_code == 409
    assert (await admin.post("/api/v1/teams", json={"name": "Bad Name"})).status_code == 422
    patched = await admin.patch("/api/v1/teams/ml", json={"max_queued": 3, "budget_day_usd": None})
    assert patched.json()["max_queued"] == 3
    assert patched.json()["budget_day_usd"] is None
    _, user = await replicas.key("u", team="ml")
    assert (await replicas.as_(user).get("/api/v1/teams")).status_code == 403
    assert (await admin.get("/api/v1/teams/ml")).json()["keys"] == 1
    assert (await admin.delete("/api/v1/teams/ml")).status_code == 409  # still has a key
    assert (await admin.post("/api/v1/keys", json={"name": "x", "team": "nope"})).status_code == 404
    assert [t["name"] for t in (await admin.get("/api/v1/teams")).json()] == ["ml"]


async def test_team_tasks_isolated_across_replicas(replicas: Replicas) -> None:
    admin = replicas.as_(replicas.admin)
    for name in ("red", "blue"):
        assert (await admin.post("/api/v1/teams", json={"name": name})).status_code == 201
    _, red1 = await replicas.key("red1", team="red")
    _, red2 = await replicas.key("red2", team="red")
    _, blue1 = await replicas.key("blue1", team="blue")
    _, loner = await replicas.key("loner")
    task = (await replicas.as_(red1, 0).post("/api/v1/tasks", json=TASK)).json()
    assert task["owner"] == "team:red"
    mine = (await replicas.as_(loner, 1).post("/api/v1/tasks", json=TASK)).json()
    # A teammate on the other replica sees it, lists it and may cancel it.
    assert (await replicas.as_(red2, 1).get(f"/api/v1/tasks/{task['id']}")).status_code == 200
    listed = (await replicas.as_(red2, 1).get("/api/v1/tasks")).json()["tasks"]
    assert [t["id"] for t in listed] == [task["id"]]
    # Another team, and a key in no team, do not.
    for key in (blue1, loner):
        for i in (0, 1):
            other = replicas.as_(key, i)
            assert (await other.get(f"/api/v1/tasks/{task['id']}")).status_code == 404
            assert (await other.post(f"/api/v1/tasks/{task['id']}/cancel")).status_code == 404
    assert (await replicas.as_(red1).get(f"/api/v1/tasks/{mine['id']}")).status_code == 404
    blue_list = (await replicas.as_(blue1, 0).get("/api/v1/tasks")).json()["tasks"]
    assert blue_list == []
    cancelled = await replicas.as_(red2, 1).post(f"/api/v1/tasks/{task['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"


async def test_team_limits_are_shared_by_its_keys_and_replicas(replicas: Replicas) -> None:
    admin = replicas.as_(replicas.admin)
    body = {"name": "lab", "max_queued": 3, "max_priority": 6, "rate_limit_per_min": 8}
    assert (await admin.post("/api/v1/teams", json=body)).status_code == 201
    _, a = await replicas.key("a", team="lab")
    _, b = await replicas.key("b", team="lab")
    codes = [
        (await replicas.as_((a, b)[i % 2], i).post("/api/v1/tasks", json=TASK)).status_code
        for i in range(4)
    ]
    assert codes == [202, 202, 202, 429]  # max_queued counts the team's queue, both keys
    high = await replicas.as_(b, 1).post("/api/v1/tasks", json={**TASK, "priority": 7})
    assert high.status_code == 403
    assert "team" in high.json()["error"]["message"]
    # 8 requests a minute for the whole team, across both keys and both replicas: the 4
    # submits and the one above used 5.
    gets = [
        (await replicas.as_((a, b)[i % 2], i).get("/api/v1/workers")).status_code
        for i in range(5)
    ]
    assert gets == [200, 200, 200, 429, 429]


async def test_team_admin_manages_only_its_team(replicas: Replicas) -> None:
    admin = replicas.as_(replicas.admin)
    for name in ("red", "blue"):
        await admin.post("/api/v1/teams", json={"name": name})
    _, boss = await replicas.key("boss", team="red", role="team_admin")
    blue_id, _ = await replicas.key("blue1", team="blue")
    lead = replicas.as_(boss, 1)
    made = await lead.post("/api/v1/keys", json={"name": "new"})
    assert made.status_code == 201
    assert made.json()["team"] == "red"  # a team admin's keys join its team
    assert (await lead.post("/api/v1/keys", json={"name": "x", "team": "blue"})).status_code == 403
    assert (await lead.post("/api/v1/keys", json={"name": "x", "role": "admin"})).status_code == 403
    names = sorted(k["name"] for k in (await lead.get("/api/v1/keys")).json())
    assert names == ["boss", "new"]
    assert (await lead.delete(f"/api/v1/keys/{blue_id}")).status_code == 404
    moved = await lead.patch(f"/api/v1/keys/{made.json()['id']}", json={"team": "blue"})
    assert moved.status_code == 403
    limited = await lead.patch(f"/api/v1/keys/{made.json()['id']}", json={"max_queued": 2})
    assert limited.json()["max_queued"] == 2
    assert (await lead.get("/api/v1/teams")).status_code == 403
    assert (await lead.get("/api/v1/pools")).status_code == 200  # a user otherwise
    assert (await lead.delete(f"/api/v1/keys/{made.json()['id']}")).json()["revoked"] is True


async def test_team_admin_cannot_loosen_limits_an_admin_set(replicas: Replicas) -> None:
    """An admin's caps on a team admin's key bound every key it manages, its own included."""
    admin = replicas.as_(replicas.admin)
    await admin.post("/api/v1/teams", json={"name": "red"})
    boss_id, boss = await replicas.key(
        "boss", team="red", role="team_admin", max_priority=2, rate_limit_per_min=100
    )
    member_id, member = await replicas.key("m", team="red", max_priority=1)
    lead = replicas.as_(boss, 1)
    # Not its own key ...
    raised = await lead.patch(f"/api/v1/keys/{boss_id}", json={"max_priority": 9})
    assert raised.status_code == 403
    cleared = await lead.patch(f"/api/v1/keys/{boss_id}", json={"rate_limit_per_min": None})
    assert cleared.status_code == 403
    # ... nor a member's, above its own cap; within it is fine.
    url = f"/api/v1/keys/{member_id}"
    assert (await lead.patch(url, json={"max_priority": 9})).status_code == 403
    assert (await lead.patch(url, json={"max_priority": 2})).status_code == 200
    # A new key inherits the ceiling, or asks for less.
    made = await lead.post("/api/v1/keys", json={"name": "n"})
    assert made.json()["max_priority"] == 2
    assert made.json()["rate_limit_per_min"] == 100
    above = await lead.post("/api/v1/keys", json={"name": "x", "max_priority": 5})
    assert above.status_code == 403
    # Nothing changed on refusal: the member still cannot submit above 2.
    keys = {k["id"]: k for k in (await admin.get("/api/v1/keys")).json()}
    assert keys[boss_id]["max_priority"] == 2
    assert keys[boss_id]["rate_limit_per_min"] == 100
    over = await replicas.as_(member).post("/api/v1/tasks", json={**TASK, "priority": 5})
    assert over.status_code == 403


async def test_budget_spent_is_402_on_every_replica_and_resets(
    replicas: Replicas, redis: aioredis.Redis
) -> None:
    admin = replicas.as_(replicas.admin)
    await admin.post("/api/v1/teams", json={"name": "ml", "budget_day_usd": 1.0})
    await admin.post("/api/v1/teams", json={"name": "ops", "budget_month_usd": 2.0})
    _, ml = await replicas.key("ml1", team="ml")
    _, ops = await replicas.key("ops1", team="ops")
    assert (await replicas.as_(ml, 0).post("/api/v1/tasks", json=TASK)).status_code == 202
    teams: TeamStore = replicas.apps[0].state.services.teams
    day_key, month_key = teams.spend_keys("ml")
    await redis.incrbyfloat(day_key, 1.25)
    for i in (0, 1):
        refused = await replicas.as_(ml, i).post("/api/v1/tasks", json=TASK)
        assert refused.status_code == 402
        error = refused.json()["error"]
        assert error["code"] == "budget_exhausted"
        assert error["team"] == "ml"
        assert error["period"] == "day"
        assert error["resets_at"] > teams.clock()
        assert "1.25" in error["message"]
    # Reading is not new work; the other team is not affected.
    assert (await replicas.as_(ml, 1).get("/api/v1/tasks")).status_code == 200
    assert (await replicas.as_(ops, 1).post("/api/v1/tasks", json=TASK)).status_code == 202
    _, ops_month = teams.spend_keys("ops")
    await redis.incrbyfloat(ops_month, 2.0)
    assert (await replicas.as_(ops, 0).post("/api/v1/tasks", json=TASK)).json()["error"][
        "period"
    ] == "month"
    # A new day is a new counter: the budget is back.
    await redis.delete(day_key)
    assert (await replicas.as_(ml, 1).post("/api/v1/tasks", json=TASK)).status_code == 202
    # Raising the budget lets the team in at once (no cache on these replicas).
    await redis.incrbyfloat(day_key, 1.5)
    assert (await replicas.as_(ml, 0).post("/api/v1/tasks", json=TASK)).status_code == 402
    await admin.patch("/api/v1/teams/ml", json={"budget_day_usd": 10})
    assert (await replicas.as_(ml, 0).post("/api/v1/tasks", json=TASK)).status_code == 202


def test_periods_follow_the_configured_time_zone() -> None:
    # 2024-03-31 22:30 UTC is already April 1st in Amsterdam (UTC+2 from that night).
    instant = 1711924200.0
    assert Periods("UTC").of(instant) == ("2024-03-31", "2024-03")
    assert Periods("Europe/Amsterdam").of(instant) == ("2024-04-01", "2024-04")
    ams = Periods("Europe/Amsterdam")
    assert ams.resets_at(instant, "day") == 1712008800.0  # 2024-04-02 00:00 +02:00
    assert ams.resets_at(instant, "month") == 1714514400.0  # 2024-05-01 00:00 +02:00
    assert Periods("UTC").resets_at(instant, "day") == 1711929600.0  # 2024-04-01 00:00 UTC
