"""`gpufleet teams …`, `keys update --team` and `gpufleet usage` against a real Redis."""

from __future__ import annotations

import csv
import datetime
import io
import json
from pathlib import Path

import pytest
import redis as sync_redis
from typer.testing import CliRunner

from gpufleet.cli import app

runner = CliRunner()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str) -> sync_redis.Redis:
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    monkeypatch.setenv("GPUFLEET_REDIS__URL", redis_url)
    monkeypatch.setenv("GPUFLEET_AUTH__SECRET", "cli-test-secret")
    return client


def run(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_teams_lifecycle_and_key_membership(env: sync_redis.Redis) -> None:
    run("teams", "create", "ml", "--description", "vision", "--budget-day", "12.5",
        "--max-queued", "30", "--rate-limit", "10/s")
    listed = [json.loads(line) for line in run("teams", "list", "--json").splitlines()]
    assert listed[0]["name"] == "ml"
    assert listed[0]["budget_day_usd"] == 12.5
    assert listed[0]["rate_limit_per_min"] == 600
    assert listed[0]["keys"] == 0
    again = runner.invoke(app, ["teams", "create", "ml"])
    assert again.exit_code == 1
    assert "already exists" in again.output
    assert runner.invoke(app, ["keys", "create", "--name", "x", "--team", "nope"]).exit_code == 1
    created = run("keys", "create", "--name", "ann", "--team", "ml", "--role", "team_admin")
    key_id = created.split()[0]
    assert "team=ml" in created
    assert "team_admin" in created
    run("teams", "update", "ml", "--clear", "budget_day_usd", "--budget-month", "100")
    team = json.loads(run("teams", "list", "--json"))
    assert team["budget_day_usd"] is None
    assert team["budget_month_usd"] == 100.0
    assert team["keys"] == 1
    refused = runner.invoke(app, ["teams", "delete", "ml"])
    assert refused.exit_code == 1
    assert key_id in refused.output
    moved = run("keys", "update", key_id, "--no-team", "--role", "user", "--max-queued", "4")
    assert "team=" not in moved
    assert "queued=4" in moved
    assert "deleted team ml" in run("teams", "delete", "ml")
    assert run("teams", "list") == ""


def test_usage_table_json_and_csv(env: sync_redis.Redis) -> None:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    env.hset(
        f"gpufleet:usage:{today}",
        mapping={
            "ml|k1|llm|llama3.2|requests": 3,
            "ml|k1|llm|llama3.2|usd": 0.5,
            "ml|k1|llm|llama3.2|gpu_s": 100,
            "ml|k1|llm|llama3.2|tokens_out": 42,
            "|k2|comfy||tasks": 2,
            "|k2|comfy||usd": 0.25,
            "pool|llm|spend_usd": 0.8,
            "pool|comfy|spend_usd": 0.25,
        },
    )
    data = json.loads(run("usage", "--json"))
    rows = {r["group"]: r for r in data["rows"]}
    assert rows["ml"]["requests"] == 3
    assert rows["ml"]["tokens_out"] == 42
    assert rows[""]["tasks"] == 2
    assert data["total"]["usd"] == pytest.approx(0.75)
    overhead = {p["pool"]: p["overhead_usd"] for p in data["overhead"]}
    assert overhead == pytest.approx({"llm": 0.3, "comfy": 0.0})
    table = run("usage", "--group-by", "pool")
    assert "llm" in table
    assert "overhead $0.3000" in table
    parsed = list(csv.DictReader(io.StringIO(run("usage", "--csv", "--group-by", "model",
                                                 "--team", "ml"))))
    assert [(r["group"], r["usd"]) for r in parsed] == [("llama3.2", "0.5")]
    bad = runner.invoke(app, ["usage", "--group-by", "color"])
    assert bad.exit_code == 2
