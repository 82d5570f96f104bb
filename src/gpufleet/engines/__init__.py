"""Engines: how gpufleet drives a worker's ComfyUI or Ollama over HTTP.

``build_engine(Engine.ollama, http)`` returns the client for one engine kind; the
module of each engine is imported only when it is asked for. The interface and
its contract (errors, cancellation, events) are in ``engines/base.py``.
"""

from __future__ import annotations

from typing import Any

import httpx

from gpufleet.domain import Engine
from gpufleet.engines.base import EngineClient, Health, Inventory, cancelled_result, is_cancelled
from gpufleet.errors import ConfigError

__all__ = [
    "EngineClient",
    "Health",
    "Inventory",
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
