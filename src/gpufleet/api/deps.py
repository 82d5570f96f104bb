"""FastAPI dependencies: the components the lifespan built, fetched per request.

``create_app`` stores one ``Components`` on ``app.state.components``; routers ask
for it (or a part of it) through these functions and never build clients of
their own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request

from gpufleet.settings import Settings
from gpufleet.store.events import EventLog
from gpufleet.store.workers import WorkerRegistry


@dataclass
class Components:
    """Everything the lifespan opened. Later parts add their fields here."""

    settings: Settings
    redis: aioredis.Redis
    registry: WorkerRegistry | None = None
    events: EventLog | None = None
    # provider name ("novita", "surf", "static") -> gpufleet.providers.base.Provider
    providers: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    loops: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def get_components(request: Request) -> Components:
    components: Components = request.app.state.components
    return components


def get_settings(request: Request) -> Settings:
    return get_components(request).settings


def get_redis(request: Request) -> aioredis.Redis:
    return get_components(request).redis


def get_registry(request: Request) -> WorkerRegistry:
    registry = get_components(request).registry
    assert registry is not None, "create_app builds the registry"
    return registry


def get_events(request: Request) -> EventLog:
    events = get_components(request).events
    assert events is not None, "create_app builds the event log"
    return events
