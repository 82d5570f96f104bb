"""FastAPI dependencies: the ``Services`` the lifespan built, one typed getter per field.

``create_app`` stores one frozen ``Services`` (``gpufleet.wiring``) on
``app.state.services``; routers ask for it (or one field of it) through these functions
and never build clients or stores of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import redis.asyncio as aioredis
from fastapi import Request

from gpufleet.api.cursors import CursorCodec
from gpufleet.providers.base import Provider
from gpufleet.providers.catalog import GpuCatalog
from gpufleet.results import ResultStore
from gpufleet.settings import Settings
from gpufleet.store.apikeys import ApiKeyStore
from gpufleet.store.demand import DemandReader
from gpufleet.store.events import EventLog
from gpufleet.store.history import HistoryStore
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.queue import TaskQueue
from gpufleet.store.streams import StreamPlaces
from gpufleet.store.teams import TeamStore
from gpufleet.store.usage import UsageStore
from gpufleet.store.workers import WorkerRegistry
from gpufleet.wiring import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_settings(request: Request) -> Settings:
    return get_services(request).settings


def get_redis(request: Request) -> aioredis.Redis:
    return get_services(request).redis


def get_registry(request: Request) -> WorkerRegistry:
    return get_services(request).registry


def get_events(request: Request) -> EventLog:
    return get_services(request).events


def get_providers(request: Request) -> Mapping[str, Provider]:
    return get_services(request).providers


def get_history(request: Request) -> HistoryStore:
    return get_services(request).history


def get_teams(request: Request) -> TeamStore:
    return get_services(request).teams


def get_usage(request: Request) -> UsageStore:
    return get_services(request).usage


def get_queue(request: Request) -> TaskQueue:
    return get_services(request).queue


def get_results(request: Request) -> ResultStore:
    return get_services(request).results


def get_gpus(request: Request) -> GpuCatalog:
    return get_services(request).gpus


def get_apikeys(request: Request) -> ApiKeyStore:
    return get_services(request).apikeys


def get_cursors(request: Request) -> CursorCodec:
    """The page-cursor codec, keyed by ``Services.cursor_key`` (the same on every replica)."""
    return CursorCodec(get_services(request).cursor_key)


def get_stream_places(request: Request) -> StreamPlaces:
    return get_services(request).stream_places


def get_pool_state(request: Request) -> PoolStateStore:
    return get_services(request).pool_state


def get_demand(request: Request) -> DemandReader:
    return get_services(request).demand


def get_scale_wake(request: Request) -> asyncio.Event:
    return get_services(request).scale_wake
