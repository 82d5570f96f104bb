"""SURF Research Cloud workspaces: pre-made machines gpufleet pauses and resumes.

gpufleet does not create SURF workspaces; a pool names the ones it may use with
``name_filter`` (a substring of the workspace name). The token goes bare in the
``authorization`` header (no ``Bearer``), the CSRF header only if configured. A client-side
sliding-window limiter keeps every provider instance under ``requests_per_minute`` (SURF
allows 1,000 per minute per key). A resume that fails (no GPU free) puts the workspace back
in ``paused`` with a failed ``resume`` entry in ``workspace_actions``; ``get``/``list``
report its ``result.error`` as ``last_error``. Reference: provider-apis.md §2.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections import deque
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx

from gpufleet import errors
from gpufleet.providers.base import (
    ApiClient,
    Capability,
    Clock,
    Instance,
    InstanceState,
    Provider,
    RetryPolicy,
    Sleep,
    retrying,
)
from gpufleet.settings import PoolSpec, SurfSettings

STATUS_MAP: dict[str, InstanceState] = {
    "running": InstanceState.running,
    "paused": InstanceState.paused,
    "pausing": InstanceState.stopping,
    "stopping": InstanceState.stopping,
    "deleting": InstanceState.deleted,
    "deleted": InstanceState.deleted,
    "creating": InstanceState.booting,
    "resuming": InstanceState.booting,
    "rebooting": InstanceState.booting,
    "updating": InstanceState.booting,
    "failed": InstanceState.failed,
    "unhealthy": InstanceState.failed,
}
PAGE_LIMIT = 100
MAX_PAGES = 100


def parse_error(response: httpx.Response, body: Any) -> tuple[str, str]:
    """SURF errors: ``{"code", "status", "message": [...] | str}`` or DRF's ``{"detail"}``."""
    if not isinstance(body, dict):
        return "", str(body)
    message = body.get("message", body.get("detail", ""))
    if isinstance(message, builtins.list):
        message = "; ".join(str(m) for m in message)
    return str(body.get("status") or ""), str(message)


def classify(status: int, reason: str, message: str) -> type[errors.ProviderError] | None:
    if status == 400 and "not allowed" in message.lower():
        return errors.InvalidState
    return None


class RateLimiter:
    """At most ``per_minute`` acquisitions in any 60 s window of ``clock``."""

    def __init__(self, per_minute: int, *, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.sleep = sleep
        self._times: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self.clock()
                while self._times and self._times[0] <= now - 60.0:
                    self._times.popleft()
                if len(self._times) < self.per_minute:
                    self._times.append(now)
                    return
                await self.sleep(self._times[0] + 60.0 - now)


def _timestamp(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def failed_resume(workspace: dict[str, Any]) -> str:
    """Why the newest action, a resume, failed; ``""`` if the newest action is not that."""
    actions = [a for a in workspace.get("workspace_actions") or [] if isinstance(a, dict)]
    if not actions:
        return ""
    newest = max(actions, key=lambda a: (str(a.get("time_created") or ""), actions.index(a)))
    if newest.get("type") != "resume" or newest.get("status") != "failed":
        return ""
    result = newest.get("result") if isinstance(newest.get("result"), dict) else {}
    return f"resume failed: {(result or {}).get('error') or 'no reason given'}"


class SurfProvider(Provider):
    name = "surf"
    capabilities = frozenset(
        {Capability.list, Capability.get, Capability.pause, Capability.resume}
    )

    def __init__(
        self,
        settings: SurfSettings,
        *,
        pools: builtins.list[PoolSpec] | tuple[PoolSpec, ...] = (),
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(pools)
        if settings.api_token is None:
            raise errors.ConfigError(["providers.surf.api_token: required (set CLOUD_API_TOKEN)"])
        headers = {
            "authorization": settings.api_token.get_secret_value(),
            "accept": "application/json;Compute",
        }
        if settings.csrf_token is not None:
            headers["X-CSRFTOKEN"] = settings.csrf_token.get_secret_value()
        self.retry = retry or RetryPolicy()
        self.limiter = RateLimiter(settings.requests_per_minute, clock=clock, sleep=sleep)
        base = settings.base_url.rstrip("/")
        self.api = ApiClient(self.name, base, headers=headers, timeout_s=settings.timeout_s,
                             parse_error=parse_error, classify=classify, transport=transport)

    async def aclose(self) -> None:
        await self.api.aclose()

    async def _call(self, method: str, path: str, operation: str, **kw: Any) -> Any:
        async def once() -> Any:
            await self.limiter.acquire()
            return await self.api.request(method, path, operation=operation, **kw)

        return await retrying(self.retry, once)

    def _pool_of(self, name: str) -> PoolSpec | None:
        return next((p for p in self.pools if p.name_filter and p.name_filter in name), None)

    def _instance(self, data: Any, pool: PoolSpec | None = None) -> Instance:
        if not isinstance(data, dict) or not data.get("id"):
            raise errors.ProviderBadResponse("surf: workspace without id", provider=self.name)
        name = str(data.get("name") or "")
        pool = pool or self._pool_of(name)
        status = str(data.get("status") or "")
        if not status:  # seen missing; "active" is the on/off flag then
            status = "running" if data.get("active") else "unknown"
        state = STATUS_MAP.get(status, InstanceState.pending)
        meta = data.get("resource_meta") if isinstance(data.get("resource_meta"), dict) else {}
        ip = str((meta or {}).get("ip") or "")
        base_url = None
        if state is InstanceState.running and ip and pool is not None:
            base_url = f"http://{ip}:{pool.engine_port}"
        flavours = (data.get("meta") or {}).get("flavours") if isinstance(
            data.get("meta"), dict) else None
        gpu = next((str(f.get("name")) for f in flavours or []
                    if isinstance(f, dict) and f.get("category") == "size"), "")
        return Instance(
            id=str(data["id"]), name=name, state=state, provider=self.name,
            provider_status=status, base_url=base_url,
            endpoints={pool.engine_port: base_url} if base_url and pool else {},
            gpu_name=gpu or str((meta or {}).get("flavor_name") or ""),
            price_per_hour=pool.price_per_hour if pool else None,
            created_at=_timestamp(data.get("time_created")),
            last_error=failed_resume(data) if state is InstanceState.paused else "",
        )

    async def list(self, pool: PoolSpec | None = None) -> builtins.list[Instance]:
        """Workspaces matching ``pool.name_filter`` (or any configured pool's), not deleted."""
        pools = [pool] if pool is not None else builtins.list(self.pools)
        filters = [p.name_filter for p in pools if p.name_filter]
        if not filters:
            return []
        params: dict[str, Any] = {"application_type": "Compute", "deleted": "false",
                                  "limit": PAGE_LIMIT, "offset": 0}
        if len(filters) == 1:
            params["name"] = filters[0]
        seen: dict[str, Instance] = {}
        for _ in range(MAX_PAGES):
            body = await self._call("GET", "/workspaces/", "list", params=params)
            results = body.get("results") if isinstance(body, dict) else None
            if not isinstance(results, builtins.list):
                raise errors.ProviderBadResponse("surf: list answer has no 'results'",
                                                 provider=self.name)
            for item in results:
                name = str(item.get("name") or "") if isinstance(item, dict) else ""
                owner = next((p for p in pools if p.name_filter and p.name_filter in name), None)
                if owner is not None:
                    inst = self._instance(item, owner)
                    if inst.state is not InstanceState.deleted:
                        seen.setdefault(inst.id, inst)
            nxt = body.get("next")
            if not results or not nxt:
                break
            query = parse_qs(urlparse(str(nxt)).query)
            params = {k: v[-1] for k, v in query.items()}
        return builtins.list(seen.values())

    async def get(self, instance_id: str) -> Instance:
        return self._instance(await self._call("GET", f"/workspaces/{instance_id}/", "get"))

    async def _action(self, action: str, instance_id: str) -> Instance:
        body = await self._call(
            "POST", f"/workspaces/{instance_id}/actions/{action}/", action, json_body={},
            headers={"Content-Type": "application/json"},
        )
        return self._instance(body)

    async def pause(self, instance_id: str) -> Instance | None:
        """Pause a running workspace; ``InvalidState`` if it is not running."""
        return await self._action("pause", instance_id)

    async def resume(self, instance_id: str) -> Instance | None:
        """Resume a paused workspace; a resume that later fails shows in ``get().last_error``."""
        return await self._action("resume", instance_id)
