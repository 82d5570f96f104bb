"""`gpufleet keys …` against a real Redis, and against the embedded one."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from gpufleet.cli import app
from gpufleet.store.apikeys import ApiKey, ApiKeyStore

runner = CliRunner()


def verify(url: str, plaintext: str) -> ApiKey | None:
    """Check a key with the real store (the CLI runs its own event loop, so tests are sync)."""

    async def run() -> ApiKey | None:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            return await ApiKeyStore(client, b"cli-test-secret").verify(plaintext)
        finally:
            await client.aclose()

    return asyncio.run(run())


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str) -> None:
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_url).flushdb()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    monkeypatch.setenv("GPUFLEET_REDIS__URL", redis_url)
    monkeypatch.setenv("GPUFLEET_AUTH__SECRET", "cli-test-secret")


@pytest.mark.usefixtures("env")
def test_create_list_rotate_revoke(redis_url: str) -> None:
    result = runner.invoke(
        app,
        [
            "keys",
            "create",
            "--name",
            "ann",
            "--email",
            "a@x",
            "--role",
            "admin",
            "--rate-limit",
            "2/s",
            "--max-priority",
            "7",
        ],
    )
    assert result.exit_code == 0, result.output
    plaintext = result.output.strip().splitlines()[-1]
    assert plaintext.startswith("gpf_")
    key = verify(redis_url, plaintext)
    assert key is not None
    assert (key.role, key.rate_limit_per_min, key.max_priority) == ("admin", 120, 7)

    listed = runner.invoke(app, ["keys", "list", "--json"])
    (row,) = [json.loads(line) for line in listed.output.splitlines()]
    assert row["name"] == "ann"
    assert plaintext not in listed.output

    rotated = runner.invoke(app, ["keys", "rotate", key.id])
    assert rotated.exit_code == 0
    assert verify(redis_url, plaintext) is None
    assert verify(redis_url, rotated.output.strip().splitlines()[-1]) is not None

    assert runner.invoke(app, ["keys", "revoke", key.id]).exit_code == 0
    assert runner.invoke(app, ["keys", "revoke", "nope"]).exit_code == 1
    assert "revoked" in runner.invoke(app, ["keys", "list"]).output


@pytest.mark.usefixtures("env")
def test_bad_options_exit_nonzero() -> None:
    assert runner.invoke(app, ["keys", "create", "--name", "x", "--role", "root"]).exit_code == 2
    bad_rate = runner.invoke(app, ["keys", "create", "--name", "x", "--rate-limit", "fast"])
    assert bad_rate.exit_code == 2


@pytest.mark.usefixtures("env")
def test_import_surf_controller_file(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "api_keys.json"
    path.write_text(json.dumps([{"name": "Ann", "email": "ann@uni.nl", "key": "old-1"}]))
    result = runner.invoke(app, ["keys", "import", str(path)])
    assert "imported 1 key(s)" in result.output
    assert "imported 0 key(s)" in runner.invoke(app, ["keys", "import", str(path)]).output
    assert verify(redis_url, "old-1") is not None


def test_embedded_redis_keeps_keys_between_commands(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("GPUFLEET_CONFIG", "GPUFLEET_REDIS__URL", "REDIS_URL", "REDIS_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    created = runner.invoke(app, ["keys", "create", "--name", "demo"])
    assert created.exit_code == 0, created.output
    listed = runner.invoke(app, ["keys", "list"])
    assert re.search(r"user\s+active\s+demo", listed.output)
    assert not (tmp_path / "data" / "gpufleet" / "redis" / "redis.sock").exists()
