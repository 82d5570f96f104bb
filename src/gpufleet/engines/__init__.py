"""Engines: how gpufleet drives a worker's ComfyUI or Ollama over HTTP.

``build_engine(Engine.ollama, http)`` returns the client for one engine kind; the
module of each engine is imported only when it is asked for. The interface and
its contract (errors, cancellation, events) are in ``engines/base.py``.
``WorkerEngines`` answers "which pool, which engine, which client" for a worker, the
one lookup the dispatcher and the health checker share.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import httpx

from gpufleet.domain import Engine, Worker
from gpufleet.engines.base import EngineClient, Health, Inventory, cancelled_result, is_cancelled
from gpufleet.errors import ConfigError
from gpufleet.settings import PoolSpec, Settings

__all__ = [
    "EngineClient",
    "Health",
    "Inventory",
    "WorkerEngines",
    "build_engine",
    "cancelled_result",
    "is_cancelled",
]


def build_engine(engine: Engine | str, http: httpx.AsyncClient, **options: Any) -> EngineClient:
    """The client for ``engine``; ``options`` go to its constructor (timeouts, knobs).

    ComfyUI: ``request_timeout_s``, ``stall_timeout_s``, ``poll_interval_s``,
    ``websocket``. Ollama: ``request_timeout_s``, ``run_timeout_s``.
    """
    if engine == Engine.comfyui:
        from gpufleet.engines.comfyui import ComfyUIEngine

        return ComfyUIEngine(http, **options)
    if engine == Engine.ollama:
        from gpufleet.engines.ollama import OllamaEngine

        return OllamaEngine(http, **options)
    raise ConfigError([f"engine: unknown engine {engine!r} (comfyui or ollama)"])


class WorkerEngines:
    """A worker's pool, engine kind and engine client, one client per kind built on first use.

    ``clients`` is the owner's own map (``Dispatcher.engines``, ``HealthChecker.engines``):
    clients given up front (tests) are used as they are, the rest are added to it."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient,
        clients: MutableMapping[str, EngineClient],
    ) -> None:
        self.settings = settings
        self.http = http
        self.clients = clients

    def __repr__(self) -> str:
        return f"<WorkerEngines clients={sorted(self.clients)}>"

    def pool(self, worker: Worker) -> PoolSpec | None:
        """The worker's pool as configured; None for a pool no longer in the config."""
        try:
            return self.settings.pool(worker.pool)
        except KeyError:
            return None

    def kind(self, worker: Worker) -> str | None:
        """The engine the worker runs: its record's, else its pool's; None if neither says."""
        if worker.engine:
            return worker.engine
        pool = self.pool(worker)
        return pool.engine.value if pool is not None else None

    def client(self, worker: Worker) -> EngineClient | None:
        """The client for the worker's engine; None if no engine is known for it."""
        kind = self.kind(worker)
        if kind is None:
            return None
        if kind not in self.clients:
            self.clients[kind] = build_engine(kind, self.http)
        return self.clients[kind]
