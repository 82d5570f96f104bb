"""Secrets stay secret: file permissions are checked at start, and nothing prints them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpufleet.cli import app
from gpufleet.settings import insecure_secret_files, load_settings, redact_url, redacted

SECRETS = {
    "NOVITA_API_KEY": "sk-novita-very-secret",
    "CLOUD_API_TOKEN": "surf-very-secret",
    "CLOUD_CSRF_TOKEN": "csrf-very-secret",
    "GPUFLEET_AUTH__SECRET": "hmac-very-secret",
    "GPUFLEET_AUTH__METRICS_TOKEN": "metrics-very-secret",
    "REDIS_URL": "redis://fleet:redis-very-secret@redis.internal:6379/0",
}


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in (*SECRETS, "GPUFLEET_CONFIG", "GPUFLEET_REDIS__URL", "REDIS_HOST"):
        monkeypatch.delenv(name, raising=False)


def write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "text",
    [
        '[providers.novita]\napi_key = "sk-x"\n',
        '[providers.surf]\napi_token = "t"\n',
        '[auth]\nsecret = "s"\n',
        '[auth]\nmetrics_token = "m"\n',
        '[redis]\nurl = "redis://:pw@h:6379/0"\n',
    ],
)
def test_config_with_secrets_readable_by_others_is_reported(tmp_path: Path, text: str) -> None:
    config = write(tmp_path / "config.toml", text, 0o644)
    assert insecure_secret_files(config, None) == [config]
    config.chmod(0o600)
    assert insecure_secret_files(config, None) == []
    config.chmod(0o640)  # group is "others" too
    assert insecure_secret_files(config, None) == [config]


def test_files_without_secrets_are_not_reported(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", '[server]\nport = 8000\n[redis]\nurl = "redis://h"\n',
                   0o644)
    env = write(tmp_path / ".env", "PORT=8000\nREDIS_URL=redis://h:6379/0\nNOVITA_API_KEY=\n",
                0o644)
    assert insecure_secret_files(config, env) == []
    assert insecure_secret_files(tmp_path / "absent.toml", tmp_path / "absent.env") == []


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_env_file_with_a_secret_readable_by_others_is_reported(tmp_path: Path, name: str) -> None:
    env = write(tmp_path / ".env", f"PORT=8000\n{name}={SECRETS[name]}\n", 0o644)
    assert insecure_secret_files(None, env) == [env]
    env.chmod(0o600)
    assert insecure_secret_files(None, env) == []


def test_load_settings_warns_naming_the_file_and_chmod_600(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write(tmp_path / "config.toml", '[auth]\nsecret = "hmac-very-secret"\n', 0o644)
    env = write(tmp_path / ".env", "NOVITA_API_KEY=sk-novita-very-secret\n", 0o604)
    caplog.set_level(logging.WARNING, logger="gpufleet.settings")
    load_settings(config, env_file=env)
    lines = [r.getMessage() for r in caplog.records]
    for path in (config, env):
        assert any(str(path) in line and f"chmod 600 {path}" in line for line in lines), lines
    assert not any("very-secret" in line for line in lines)

    caplog.clear()
    config.chmod(0o600)
    env.chmod(0o600)
    load_settings(config, env_file=env)
    assert not [r for r in caplog.records if "chmod" in r.getMessage()]


def test_redis_password_is_redacted() -> None:
    assert redact_url("redis://u:pw@h:6379/0") == "redis://u:**********@h:6379/0"
    assert redact_url("redis://:pw@h/0") == "redis://:**********@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_config_show_never_prints_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    as_json = runner.invoke(app, ["config", "show", "--json"])
    as_toml = runner.invoke(app, ["config", "show"])
    for result in (as_json, as_toml):
        assert result.exit_code == 0, result.output
        assert "very-secret" not in result.output
    data = json.loads(as_json.output)
    assert data["redis"]["url"] == "redis://fleet:**********@redis.internal:6379/0"
    assert data["auth"]["secret"] == "**********"
    assert data["auth"]["metrics_token"] == "**********"
    assert data["providers"]["surf"]["csrf_token"] == "**********"
    settings = load_settings(env_file=None)
    for text in (repr(settings), str(settings), str(redacted(settings))):
        assert "very-secret" not in text
