"""`gpufleet status` shows the cloud accounts' balances an admin key may read."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import gpufleet.remote as remote
from gpufleet.cli import app

runner = CliRunner()
POOLS = [
    {"name": "comfy", "provider": "novita", "engine": "comfyui", "workers_by_state": {},
     "min_workers": 0, "max_workers": 2},
    {"name": "llm", "provider": "surf", "engine": "ollama", "workers_by_state": {},
     "min_workers": 0, "max_workers": 1},
    {"name": "home", "provider": "static", "engine": "ollama", "workers_by_state": {},
     "min_workers": 0, "max_workers": 1},
]
NOVITA = {"provider": "novita", "known": True, "currency": "USD",
          "balance": {"available_usd": 87.5, "cash_usd": 87.5}}
SURF = {"provider": "surf", "known": False, "balance": None,
        "message": "gpufleet cannot read the surf account's balance"}


def _fleet(monkeypatch: pytest.MonkeyPatch, *, admin: bool) -> list[str]:
    asked: list[str] = []

    def call(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        return {"/api/v1/pools": POOLS, "/api/v1/workers": []}[path]

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if not admin:
            return httpx.Response(403, json={"error": {"code": "forbidden", "message": "x"}})
        name = request.url.path.split("/")[4]
        return httpx.Response(200, json={"novita": NOVITA, "surf": SURF}[name])

    def client(self: Any, timeout_s: float | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(remote.Remote, "call", call)
    monkeypatch.setattr(remote.Remote, "client", client)
    return asked


def test_status_shows_balances(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _fleet(monkeypatch, admin=True)
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "cloud accounts" in result.output
    assert "87.50" in result.output
    assert "unknown" in result.output
    # static pools have no account: never asked
    assert asked == ["/api/v1/providers/novita/account", "/api/v1/providers/surf/account"]
    out = runner.invoke(app, ["status", "--json"])
    assert json.loads(out.output)["accounts"] == [NOVITA, SURF]


def test_user_keys_see_no_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    _fleet(monkeypatch, admin=False)
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "cloud accounts" not in result.output
    assert "accounts" not in json.loads(runner.invoke(app, ["status", "--json"]).output)
