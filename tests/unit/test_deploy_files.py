"""No Docker engine runs here: check the Dockerfile and compose file by reading them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gpufleet.settings import LEGACY_ENV, LEGACY_POOL_ENV

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_and_wiring() -> None:
    services = compose()["services"]
    assert set(services) >= {"redis", "gpufleet", "prometheus"}
    redis = services["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd
    assert "--appendfsync always" in cmd
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    app = services["gpufleet"]
    assert app["build"] == "."
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert app["env_file"][0]["path"] == ".env"
    assert "8000:8000" in app["ports"]
    assert app["environment"]["GPUFLEET_REDIS__URL"].startswith("redis://redis:6379")
    assert any(v.startswith("./config.toml:") for v in app["volumes"])
    assert "healthcheck" in app
    prom = services["prometheus"]
    assert any("deploy/prometheus.yml" in v for v in prom["volumes"])


def test_prometheus_scrapes_gpufleet_metrics() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "gpufleet"]
    assert job["metrics_path"] == "/metrics"
    assert "gpufleet:8000" in job["static_configs"][0]["targets"]


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms
    assert all("slim" in f for f in froms)
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*", text, re.M)
    assert "/health" in text
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert 'ENTRYPOINT ["gpufleet"]' in text
    # The env names the image sets are ones the app reads.
    for name in re.findall(r"(GPUFLEET_[A-Z_]+)=", text):
        assert name in {"GPUFLEET_SERVER__HOST", "GPUFLEET_SERVER__PORT", "GPUFLEET_CONFIG"}


def test_env_example_names_are_read_by_the_app() -> None:
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M)
    known = set(LEGACY_ENV) | set(LEGACY_POOL_ENV) | {"REDIS_HOST", "REDIS_PORT", "GPUFLEET_CONFIG"}
    for name in names:
        assert name in known or name.startswith("GPUFLEET_"), name


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[dev]" && make check'
    assert command in readme
    assert command in ci.splitlines()
