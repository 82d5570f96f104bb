"""The CLI: version, help, config show/check and their exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpufleet import __version__
from gpufleet.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("GPUFLEET_CONFIG", "NOVITA_API_KEY", "CLOUD_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"gpufleet {__version__}"


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "demo", "config"):
        assert command in result.output


def test_config_show_redacts_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVITA_API_KEY", "sk-top-secret")
    result = runner.invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["providers"]["novita"]["api_key"] == "**********"
    toml = runner.invoke(app, ["config", "show"])
    assert "sk-top-secret" not in toml.output
    assert "[server]" in toml.output


def test_config_check_bad_config_exits_2_naming_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[pools]]\nname="x"\nprovider="static"\nengine="ollama"\n'
        'urls=["http://h"]\nmax_workers=-1\n'
    )
    result = runner.invoke(app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 2
    assert "pools[0].max_workers" in result.output


def test_config_check_ok(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[[pools]]\nname="x"\nprovider="static"\nengine="ollama"\nurls=["http://h"]\n')
    result = runner.invoke(app, ["config", "check", "-c", str(path)])
    assert result.exit_code == 0
    assert "1 pool(s)" in result.output


def test_demo_leaves_unset_options_to_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpufleet demo` without flags must not pin auth/port/host over GPUFLEET_* settings."""
    import gpufleet.demo

    seen: list[gpufleet.demo.DemoOptions] = []
    monkeypatch.setattr(gpufleet.demo, "main", lambda options: seen.append(options) or 0)
    assert runner.invoke(app, ["demo"]).exit_code == 0
    assert (seen[0].auth, seen[0].port, seen[0].host, seen[0].log_level) == (None,) * 4
    result = runner.invoke(app, ["demo", "--no-auth", "--port", "9123", "--log-level", "debug"])
    assert result.exit_code == 0
    assert (seen[1].auth, seen[1].port, seen[1].log_level) == (False, 9123, "debug")
