"""Scale-out examples (compose with N replicas behind nginx, Kubernetes), checked by
reading them: no engine or cluster runs here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from gpufleet.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
REPLICAS = ROOT / "deploy" / "replicas"


def env_names_are_settings(env: dict[str, str]) -> None:
    """Every GPUFLEET_* variable an example sets is one the app reads."""
    for name, value in env.items():
        if not name.startswith("GPUFLEET_") or name == "GPUFLEET_CONFIG":
            continue
        section, key = name.removeprefix("GPUFLEET_").lower().split("__")
        model = type(getattr(Settings(), section))
        assert key in model.model_fields, name
        load_settings(env_file=None, **{section: {key: value}})  # valid value too


def test_replicas_compose_scales_behind_nginx_with_shared_results() -> None:
    compose: dict[str, Any] = yaml.safe_load((REPLICAS / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "gpufleet", "nginx", "prometheus"}
    app = services["gpufleet"]
    assert "ports" not in app, "published ports would stop `--scale gpufleet=3`"
    assert app["expose"] == ["8000"]
    assert app["environment"]["GPUFLEET_REDIS__URL"] == "redis://redis:6379/0"
    env_names_are_settings(app["environment"])
    results = app["environment"]["GPUFLEET_RESULTS__DIR"]
    assert f"results:{results}" in app["volumes"], "outputs must be shared by all replicas"
    assert "results" in compose["volumes"]
    assert int(app["stop_grace_period"].rstrip("s")) >= 30
    assert (REPLICAS / app["build"] / "Dockerfile").exists()
    nginx = services["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert "8000:80" in nginx["ports"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendfsync always" in redis_cmd
    assert "noeviction" in redis_cmd


def test_nginx_streams_and_waits_for_cold_starts() -> None:
    conf = (REPLICAS / "nginx.conf").read_text()
    assert conf.count("{") == conf.count("}")
    assert re.search(r"server gpufleet:8000\b", conf)
    assert "proxy_pass http://gpufleet;" in conf
    assert "proxy_buffering off;" in conf
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", conf).group(1))  # type: ignore[union-attr]
    assert read_timeout >= Settings().proxy.load_timeout_s
    body = int(re.search(r"client_max_body_size (\d+)m;", conf).group(1))  # type: ignore[union-attr]
    assert body * 2**20 >= Settings().server.max_body_bytes
    assert "http_503" not in conf, "a 503 after max_wait_s must not be retried elsewhere"


def test_replicas_prometheus_discovers_every_replica() -> None:
    config = yaml.safe_load((REPLICAS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["dns_sd_configs"][0] == {"names": ["gpufleet"], "type": "A", "port": 8000}
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


def k8s() -> dict[str, list[dict[str, Any]]]:
    text = (ROOT / "deploy/kubernetes/gpufleet.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def test_kubernetes_example_runs_replicas_against_one_redis() -> None:
    objects = k8s()
    assert {"Secret", "ConfigMap", "Deployment", "Service", "StatefulSet",
            "PersistentVolumeClaim"} <= set(objects)
    (deploy,) = objects["Deployment"]
    spec = deploy["spec"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 30
    (container,) = pod["containers"]
    assert container["args"] == ["serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e["value"] for e in container["env"]}
    env_names_are_settings(env)
    services = {s["metadata"]["name"]: s for s in objects["Service"]}
    redis_host = env["GPUFLEET_REDIS__URL"].split("//")[1].split(":")[0]
    assert redis_host in services
    (redis_set,) = objects["StatefulSet"]
    assert services[redis_host]["spec"]["selector"] == redis_set["spec"]["selector"]["matchLabels"]
    assert "always" in redis_set["spec"]["template"]["spec"]["containers"][0]["args"]
    assert services["gpufleet"]["spec"]["selector"] == spec["selector"]["matchLabels"]
    (pvc,) = objects["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["GPUFLEET_RESULTS__DIR"] in mounts


def test_kubernetes_config_map_is_a_valid_gpufleet_config(tmp_path: Path) -> None:
    (config_map,) = k8s()["ConfigMap"]
    text = config_map["data"]["config.toml"]
    tomllib.loads(text)
    path = tmp_path / "config.toml"
    path.write_text(text)
    settings = load_settings(path, env_file=None)
    assert settings.log.format == "json"
    (secret,) = k8s()["Secret"]
    for name in secret["stringData"]:
        assert name.startswith("GPUFLEET_") or name in {"NOVITA_API_KEY", "CLOUD_API_TOKEN"}
