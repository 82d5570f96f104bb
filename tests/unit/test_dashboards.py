"""The Grafana dashboard and the alert rules query metrics gpufleet really exports.

No Grafana or Prometheus runs here, so the JSON and YAML are checked by reading them:
every ``gpufleet_*`` name in a query must be one of the series ``gpufleet.metrics``
exposes, and every ``by (...)`` label must be a label of those metrics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import gpufleet.metrics as metrics

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bgpufleet_[a-z_]+\b")
BY = re.compile(r"\bby \(([^)]*)\)")
UNBOUNDED_LABELS = {"id", "task_id", "task", "request_id", "worker_id", "instance_id", "key"}


def exported() -> dict[str, set[str]]:
    """Series name -> label names, for every gpufleet collector (with its sample suffixes)."""
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = set(value._labelnames)
        for family in value.describe():
            for suffix in ("", "_total", "_bucket", "_count", "_sum", "_created", "_info"):
                out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def dashboard_queries() -> list[str]:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/gpufleet.json").read_text())
    return [t["expr"] for panel in dash["panels"] for t in panel["targets"]]


def alert_queries() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


def check_query(expr: str, series: dict[str, set[str]]) -> list[str]:
    problems = []
    names = NAME.findall(expr)
    for name in names:
        if name not in series:
            problems.append(f"{expr!r}: gpufleet does not export {name}")
    known = set().union(*(series.get(n, set()) for n in names)) | {"job", "instance"}
    for group in BY.findall(expr):
        for label in (x.strip() for x in group.split(",")):
            if label not in known:
                problems.append(f"{expr!r}: no metric in it has the label {label!r}")
    return problems


def test_every_dashboard_query_uses_exported_metrics_and_labels() -> None:
    series = exported()
    queries = dashboard_queries()
    assert len(queries) >= 15
    problems = [p for q in queries for p in check_query(q, series)]
    assert not problems, "\n".join(problems)


def test_dashboard_covers_queue_workers_slots_cold_starts_spend_and_proxy_latency() -> None:
    used = {n for q in dashboard_queries() for n in NAME.findall(q)}
    for needed in (
        "gpufleet_queue_depth",
        "gpufleet_workers",
        "gpufleet_slots",
        "gpufleet_cold_starts_total",
        "gpufleet_spend_dollars_total",
        "gpufleet_proxy_time_to_first_byte_seconds_bucket",
    ):
        assert needed in used, needed


def test_alert_rules_use_exported_metrics_and_are_wired_into_prometheus() -> None:
    series = exported() | {"up": {"job", "instance"}}
    queries = alert_queries()
    problems = [p for q in queries for p in check_query(q, series)]
    assert not problems, "\n".join(problems)
    rules = yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"GpufleetQueueWaitTooLong", "GpufleetSpendOverBudget", "GpufleetBootFailures",
            "GpufleetNoLeader"} <= names
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    assert "/etc/prometheus/alerts.yml" in prometheus["rule_files"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_grafana_profile_provisions_the_datasource_the_dashboard_uses() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_dir = mounts["./deploy/grafana/dashboards"]
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/gpufleet.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == dash_dir
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = source["datasources"][0]["uid"]
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    dash = json.loads((ROOT / "deploy/grafana/dashboards/gpufleet.json").read_text())
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]


def test_metric_names_follow_prometheus_conventions() -> None:
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        (family,) = value.describe()
        assert family.name.startswith("gpufleet_"), family.name
        assert not UNBOUNDED_LABELS & set(value._labelnames), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        assert family.name in {f.name for f in REGISTRY.collect()}, family.name
