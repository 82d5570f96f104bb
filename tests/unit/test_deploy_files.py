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


def readme_quick_start() -> list[str]:
    """The commands of the README's quick start (its first bash block), comments dropped."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_is_two_commands() -> None:
    assert readme_quick_start() == ["pip install -e . && gpufleet demo", "scripts/test"]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run ends with the README's test command, verbatim."""
    command = readme_quick_start()[-1]
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[-1] == command


def test_the_test_script_is_self_sufficient() -> None:
    script = ROOT / "scripts" / "test"
    assert script.stat().st_mode & 0o111, "scripts/test must be executable"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert 'pip install --quiet -e ".[dev]"' in text
    assert "apt-get install" in text
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[-1] == "make check"
