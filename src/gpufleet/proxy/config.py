"""Settings of the Ollama/OpenAI-compatible proxy (``[proxy]`` in ``config.toml``).

Until ``Settings`` carries a ``proxy`` section, the proxy reads
``getattr(settings, "proxy", ProxySettings())``; a pool may override ``max_wait_s``
with its own field of that name (read the same way).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ProxySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

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
    usage_flush_interval_s: float = Field(
        1.0, ge=0, description="Per-key usage counters are written to Redis at most this often."
    )
    retry_after_s: int = Field(
        10, ge=1, description="Retry-After (seconds) on 503 when the queue is full."
    )
