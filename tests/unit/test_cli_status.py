"""`gpufleet status` and `gpufleet workers` on a narrow terminal and into a pipe.

At 80 columns every header and value used to end in "…" (`prov…`, `engi…`, `read…`):
now columns go by priority and what stays is whole; a pipe gets the whole table.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

import gpufleet.remote as remote
from gpufleet.cli import app

runner = CliRunner()
LONG_URL = "http://127.0.0.1:40123/w/inst-8f3a2c1d9e7b4a60b1c2"
BACKOFF = "insufficient capacity for 4090.18c.60g in every cluster"
POOLS = [
    {
        "name": "comfyui", "provider": "novita", "engine": "comfyui",
        "workers_by_state": {"ready": 2, "booting": 1}, "demand": {"queued": 17, "waiting": 0},
        "min_workers": 0, "max_workers": 3, "burn_rate_per_hour": 2.01, "spend_usd": 0.42,
        "backoff": {"reason": BACKOFF},
    },
    {
        "name": "llm", "provider": "surf", "engine": "ollama",
        "workers_by_state": {"paused": 3}, "demand": {"queued": 0, "waiting": 2},
        "min_workers": 0, "max_workers": 3, "burn_rate_per_hour": 0.0, "spend_usd": 1.2,
    },
]
WORKERS = [
    {"id": "comfyui-8f3a2c1d9e7b", "pool": "comfyui", "state": "ready", "busy_slots": 1,
     "slots": 1, "models_present": ["sd_xl_base_1.0.safetensors"], "base_url": LONG_URL,
     "cost_usd": 0.1234},
    {"id": "llm-gpufleet-gpu-01", "pool": "llm", "state": "paused", "busy_slots": 0,
     "slots": 4, "models_present": ["llama3.2:1b"], "base_url": "http://127.0.0.2:11434",
     "cost_usd": 0.5},
]
HEADERS = ["pool", "provider", "engine", "workers", "queued", "waiting", "min/max", "burn $/h",
           "spend $", "backoff", "worker", "state", "slots", "models", "url", "cost $"]


@pytest.fixture(autouse=True)
def _fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    def call(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        return {"/api/v1/pools": POOLS, "/api/v1/workers": WORKERS}[path]

    monkeypatch.setattr(remote.Remote, "call", call)


def on_terminal(monkeypatch: pytest.MonkeyPatch, width: int) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(remote, "console",
                        Console(file=out, width=width, force_terminal=True, color_system=None))
    return out


@pytest.mark.parametrize("command", [["status"], ["workers"]])
def test_at_80_columns_columns_are_dropped_not_cut(
    monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    out = on_terminal(monkeypatch, 80)
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    text = out.getvalue()
    assert "…" not in text
    assert max(cell_len(line) for line in text.splitlines()) <= 80
    for whole in ("comfyui-8f3a2c1d9e7b", "llm-gpufleet-gpu-01", "ready", "paused"):
        assert whole in text, text
    if command == ["status"]:
        for whole in ("comfyui", "llm", "workers", "ready:2", "queued", "17"):
            assert whole in text, text
    # What went is said, and the least useful went first.
    assert "not shown at 80 columns" in text
    assert "url" in text.split("not shown at 80 columns")[-1]
    assert LONG_URL not in text


def test_a_wide_terminal_shows_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    out = on_terminal(monkeypatch, 250)
    assert runner.invoke(app, ["status"]).exit_code == 0
    text = out.getvalue()
    assert "not shown" not in text
    assert "…" not in text
    assert LONG_URL in text
    assert BACKOFF in text


def test_too_narrow_even_for_the_essentials_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    out = on_terminal(monkeypatch, 30)
    assert runner.invoke(app, ["status"]).exit_code == 0
    text = out.getvalue()
    assert "…" not in text
    assert max(cell_len(line) for line in text.splitlines()) <= 30


@pytest.mark.parametrize("command", [["status"], ["workers"]])
def test_a_pipe_gets_the_whole_table(command: list[str]) -> None:
    """CliRunner's stdout is no terminal: like `gpufleet status | less` or `> file`."""
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "…" not in text
    assert "not shown" not in text
    assert LONG_URL in text
    assert max(cell_len(line) for line in text.splitlines()) > 80
    header_rows = [line for line in text.splitlines() if "worker" in line and "state" in line]
    assert header_rows, text
    if command == ["status"]:
        assert BACKOFF in text
        for header in HEADERS:
            assert header in text, header


def test_other_tables_are_whole_in_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    task = {"id": "01m90s77t3522se690wc6hd5k2", "kind": "comfyui", "status": "succeeded",
            "pool": "a-pool-with-a-rather-long-name-for-a-narrow-console", "priority": 5,
            "attempts": 1}

    def call(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        return {"tasks": [task] * 3}

    monkeypatch.setattr(remote.Remote, "call", call)
    result = runner.invoke(app, ["tasks", "list"])
    assert result.exit_code == 0, result.output
    assert task["pool"] in result.output
    assert task["id"] in result.output
    assert "…" not in result.output
