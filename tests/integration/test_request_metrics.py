"""gpufleet_http_requests_total: route templates, never concrete ids; unmatched paths pooled."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY


def count(route: str, status_class: str) -> float:
    labels = {"route": route, "status_class": status_class}
    return REGISTRY.get_sample_value("gpufleet_http_requests_total", labels) or 0.0


async def test_requests_are_counted_by_route_template_and_status_class(api: Any) -> None:
    task_route = "/api/v1/tasks/{task_id}"
    before = (count(task_route, "4xx"), count("/health", "2xx"), count("unmatched", "4xx"))
    assert (await api.get("/api/v1/tasks/abc123")).status_code == 404
    assert (await api.get("/api/v1/tasks/def456")).status_code == 404
    assert (await api.get("/health")).status_code == 200
    assert (await api.get("/no/such/path/7f3a")).status_code == 404
    after = (count(task_route, "4xx"), count("/health", "2xx"), count("unmatched", "4xx"))
    assert after[0] - before[0] == 2
    assert after[1] - before[1] == 1
    assert after[2] - before[2] == 1
    text = (await api.get("/metrics")).text
    assert "abc123" not in text
    assert "7f3a" not in text
