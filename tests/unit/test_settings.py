"""Settings: sources and their order, legacy names, one clear line per problem, secrets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.settings import PoolSpec, Settings, load_settings, redacted

ROOT = Path(__file__).resolve().parents[2]
LEGACY = [
    "NOVITA_API_KEY",
    "NOVITA_BASE_URL",
    "NOVITA_PRODUCT_ID",
    "NOVITA_IMAGE_URL",
    "NOVITA_GPU_NUM",
    "NOVITA_ROOTFS_SIZE",
    "NOVITA_MIN_WORKERS",
    "NOVITA_MAX_WORKERS",
    "NOVITA_IDLE_TIMEOUT",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_URL",
    "PORT",
    "CLOUD_API_TOKEN",
    "CLOUD_CSRF_TOKEN",
    "GPUFLEET_CONFIG",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GPUFLEET_") or name in LEGACY:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray ./config.toml or ./.env


def problems(**kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_defaults_without_any_file() -> None:
    s = load_settings()
    assert s.server.port == 8000
    assert s.redis.url == ""
    assert s.pools == []


def test_toml_then_env_overrides(
    tmp_config: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_config('[server]\nport = 9000\nhost = "0.0.0.0"\n')
    assert load_settings(path).server.port == 9000
    monkeypatch.setenv("GPUFLEET_SERVER__PORT", "9100")
    s = load_settings(path)
    assert (s.server.port, s.server.host) == (9100, "0.0.0.0")


def test_config_path_from_env_and_default(
    tmp_config: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_config("[server]\nport = 9001\n")
    monkeypatch.setenv("GPUFLEET_CONFIG", str(path))
    assert load_settings().server.port == 9001
    monkeypatch.delenv("GPUFLEET_CONFIG")
    (tmp_path / "config.toml").write_text("[server]\nport = 9002\n")
    assert load_settings().server.port == 9002


def test_dotenv_is_read_below_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text("GPUFLEET_SERVER__PORT=9200\nCLOUD_API_TOKEN=from-dotenv\n")
    s = load_settings(env_file=env)
    assert s.server.port == 9200
    assert s.providers.surf.api_token is not None
    assert s.providers.surf.api_token.get_secret_value() == "from-dotenv"
    monkeypatch.setenv("GPUFLEET_SERVER__PORT", "9300")
    assert load_settings(env_file=env).server.port == 9300


def test_legacy_names_define_a_novita_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "NOVITA_API_KEY": "sk-legacy",
        "NOVITA_PRODUCT_ID": "4090.18c.60g",
        "NOVITA_IMAGE_URL": "ghcr.io/x/comfy:1",
        "NOVITA_GPU_NUM": "2",
        "NOVITA_ROOTFS_SIZE": "80",
        "NOVITA_MIN_WORKERS": "1",
        "NOVITA_MAX_WORKERS": "3",
        "NOVITA_IDLE_TIMEOUT": "120",
        "NOVITA_BASE_URL": "http://127.0.0.1:1/v1",
        "REDIS_HOST": "redis.internal",
        "REDIS_PORT": "6380",
        "PORT": "8123",
        "CLOUD_API_TOKEN": "surf-tok",
        "CLOUD_CSRF_TOKEN": "csrf",
    }.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    (pool,) = s.pools
    assert (pool.name, pool.provider, pool.engine) == ("novita", "novita", "comfyui")
    assert (pool.product_id, pool.image, pool.gpu_num, pool.rootfs_gb) == (
        "4090.18c.60g",
        "ghcr.io/x/comfy:1",
        2,
        80,
    )
    assert (pool.min_workers, pool.max_workers, pool.idle_timeout_s) == (1, 3, 120.0)
    assert s.redis.url == "redis://redis.internal:6380/0"
    assert s.server.port == 8123
    assert s.providers.novita.base_url == "http://127.0.0.1:1/v1"
    assert s.providers.surf.csrf_token is not None
    monkeypatch.setenv("REDIS_URL", "redis://other:1/2")
    assert load_settings().redis.url == "redis://other:1/2"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[[pools]]\nname="a"\nprovider="static"\nengine="comfyui"\nurls=["http://x"]\n'
            "max_workers = -1\n",
            "pools[0].max_workers: Input should be greater than or equal to 0",
        ),
        ('[[pools]]\nname="a"\nprovider="aws"\nengine="comfyui"\n', "pools[0].provider:"),
        (
            '[[pools]]\nname="a"\nprovider="novita"\nengine="comfyui"\nproduct_id="p"\nimage="i"\n',
            "providers.novita.api_key: required by a novita pool",
        ),
        (
            '[[pools]]\nname="a"\nprovider="surf"\nengine="ollama"\n',
            "pools[0]: a surf pool needs name_filter",
        ),
        (
            '[[pools]]\nname="a"\nprovider="static"\nengine="comfyui"\nurls=["u"]\n'
            "min_workers=3\nmax_workers=2\n",
            "min_workers (3) > max_workers (2)",
        ),
        ("[server]\nport = 0\n", "server.port: Input should be greater than or equal to 1"),
        ("[server]\nprot = 1\n", "server.prot: Extra inputs are not permitted"),
        (
            '[[pools]]\nname="A b"\nprovider="static"\nengine="comfyui"\nurls=["u"]\n',
            "pools[0].name:",
        ),
        (
            '[[pools]]\nname="a"\nprovider="static"\nengine="comfyui"\nurls=["u"]\n'
            '[[pools]]\nname="a"\nprovider="static"\nengine="ollama"\nurls=["u"]\n',
            "duplicate pool name 'a'",
        ),
        ("this is = = not toml", "is not valid TOML"),
    ],
)
def test_bad_config_names_the_key(
    tmp_config: Callable[[str], Path], toml: str, expected: str
) -> None:
    lines = problems(path=tmp_config(toml))
    assert any(expected in line for line in lines), lines


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    assert problems(path=tmp_path / "nope.toml") == [
        f"config: file not found: {tmp_path / 'nope.toml'}"
    ]


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVITA_API_KEY", "sk-very-secret")
    monkeypatch.setenv("CLOUD_API_TOKEN", "tok-very-secret")
    s = load_settings()
    for text in (repr(s), str(s), str(redacted(s)), s.model_dump_json()):
        assert "very-secret" not in text
    assert redacted(s)["providers"]["novita"]["api_key"] == "**********"


def test_example_config_is_valid_and_documents_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVITA_API_KEY", "k")
    monkeypatch.setenv("CLOUD_API_TOKEN", "t")
    example = ROOT / "config.toml.example"
    s = load_settings(example)
    assert {p.provider for p in s.pools} == {"novita", "surf", "static"}
    text = example.read_text()
    sections = {name: field.annotation for name, field in Settings.model_fields.items()}
    assert "pools" in sections
    sections_documented = (
        "server", "log", "redis", "queue", "scaling", "workers", "results", "proxy", "auth"
    )
    for section in sections_documented:
        model = type(getattr(s, section))
        for key in model.model_fields:
            assert f"{key} =" in text or f"# {key} =" in text, (
                f"config.toml.example does not document [{section}] {key}"
            )
    for key in PoolSpec.model_fields:
        assert key in text, f"config.toml.example does not document pool key {key}"


def test_env_example_lists_every_legacy_name() -> None:
    text = (ROOT / ".env.example").read_text()
    for name in LEGACY:
        assert name in text


def test_leader_lease_must_outlast_two_ticks() -> None:
    from gpufleet.errors import ConfigError

    short = load_settings(env_file=None, scaling={"interval_s": 1, "leader_lease_s": 3})
    assert short.scaling.leader_lease_s == 3
    with pytest.raises(ConfigError, match="leader_lease_s"):
        load_settings(env_file=None, scaling={"interval_s": 2, "leader_lease_s": 4})
    assert load_settings(env_file=None, scaling={"interval_s": 10}).scaling.leader_lease_s is None


def test_defaults_lose_to_every_source_and_overrides_beat_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What `gpufleet demo` relies on: its defaults yield to config and environment."""
    config = tmp_path / "config.toml"
    config.write_text("[scaling]\ninterval_s = 7.0\n")
    monkeypatch.setenv("GPUFLEET_AUTH__ENABLED", "false")
    defaults = {"auth": {"enabled": True}, "scaling": {"interval_s": 0.5},
                "server": {"port": 8123}}
    s = load_settings(config, env_file=None, defaults=defaults)
    assert s.auth.enabled is False  # environment beats the default
    assert s.scaling.interval_s == 7.0  # config.toml beats the default
    assert s.server.port == 8123  # the default beats the field's own
    s = load_settings(config, env_file=None, defaults=defaults, auth={"enabled": True})
    assert s.auth.enabled is True  # an override beats the environment
