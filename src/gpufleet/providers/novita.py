"""Novita AI GPU instances (OpenAPI v1): create, start/stop, delete; billed per second running.

Every instance gpufleet creates is named ``<name_prefix><caller's name>``; ``list`` returns only
those. Reads and start/stop/delete retry transient failures (``base.retrying``). Create never
retries blindly: each attempt first looks the name up, so a create whose answer was lost (a
timeout after the cloud accepted it) is found, not made twice. Wire details live in
``novita_models``; the reference is shared/reference/provider-apis.md §1.
"""

from __future__ import annotations

import builtins
import logging
from typing import Any

import httpx

from gpufleet import errors
from gpufleet.providers import novita_models as wire
from gpufleet.providers.base import (
    AccountBalance,
    ApiClient,
    Capability,
    Instance,
    InstanceState,
    Product,
    Provider,
    RetryPolicy,
    retrying,
)
from gpufleet.settings import NovitaSettings, PoolSpec
from gpufleet.worker_auth import new_token

logger = logging.getLogger(__name__)

# Items per list page; the sim and (as far as anyone reports) the API accept 100.
PAGE_SIZE = 100
# A list that needs more pages than this is a pagination bug, not a fleet.
MAX_PAGES = 200


class NovitaProvider(Provider):
    name = "novita"
    capabilities = frozenset(
        {
            Capability.list,
            Capability.get,
            Capability.create,
            Capability.start,
            Capability.stop,
            Capability.delete,
            Capability.products,
        }
    )

    def __init__(
        self,
        settings: NovitaSettings,
        *,
        pools: builtins.list[PoolSpec] | tuple[PoolSpec, ...] = (),
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        super().__init__(pools)
        if settings.api_key is None:
            raise errors.ConfigError(["providers.novita.api_key: required (set NOVITA_API_KEY)"])
        self.name_prefix = settings.name_prefix
        self.retry = retry or RetryPolicy()
        self.page_size = page_size
        self._prices: dict[str, float] = {}
        self.balance_url = wire.balance_url(settings.base_url)
        self.api = ApiClient(
            self.name,
            settings.base_url,
            headers={
                "Authorization": f"Bearer {settings.api_key.get_secret_value()}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            timeout_s=settings.timeout_s,
            parse_error=wire.parse_error,
            classify=wire.classify,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.api.aclose()

    def full_name(self, name: str) -> str:
        return name if name.startswith(self.name_prefix) else self.name_prefix + name

    async def _call(self, method: str, path: str, operation: str, **kw: Any) -> Any:
        return await retrying(
            self.retry, lambda: self.api.request(method, path, operation=operation, **kw)
        )

    def _instance(self, data: Any, pool: PoolSpec | None = None) -> Instance:
        if pool is None and isinstance(data, dict):
            pool = self.pool_for_name(str(data.get("name") or ""), self.name_prefix)
        price = pool.price_per_hour if pool else None
        if price is None and isinstance(data, dict):
            per_gpu = self._prices.get(str(data.get("productId") or ""))
            if per_gpu is not None:
                price = per_gpu * max(1, wire._int(data.get("gpuNum"), 1))
        return wire.parse_instance(
            data, port=pool.engine_port if pool else None, price_per_hour=price
        )

    # -- reads ---------------------------------------------------------------------------------

    async def _list_raw(self, name: str | None = None) -> builtins.list[dict[str, Any]]:
        """Every instance on every page, de-duplicated by id.

        Whether ``pageNum`` is 0- or 1-based is unconfirmed, so paging starts at 0: a 0-based
        server answers page one, a 1-based one reads 0 as 1 (and the repeat at 1 is
        de-duplicated) or answers it empty (then page 1 is asked for).
        """
        seen: dict[str, dict[str, Any]] = {}
        stale_pages = 0
        for page in range(MAX_PAGES):
            params: dict[str, Any] = {"pageSize": self.page_size, "pageNum": page}
            if name:
                params["name"] = name
            body = await self._call("GET", "/gpu/instances", "list", params=params)
            items = body.get("instances") if isinstance(body, dict) else None
            if not isinstance(items, builtins.list):
                raise errors.ProviderBadResponse(
                    "novita: list answer has no 'instances' list", provider=self.name
                )
            total = wire._int(body.get("total"), -1)
            if not items:
                if page == 0 and total != 0:
                    continue
                break
            new = [i for i in items if isinstance(i, dict) and str(i.get("id")) not in seen]
            for item in new:
                seen[str(item.get("id"))] = item
            stale_pages = 0 if new else stale_pages + 1
            if (total >= 0 and len(seen) >= total) or stale_pages >= 2:
                break
            if total < 0 and len(items) < self.page_size:
                break
        else:
            logger.warning("novita list stopped after %d pages", MAX_PAGES)
        return builtins.list(seen.values())

    async def list(self, pool: PoolSpec | None = None) -> builtins.list[Instance]:
        """gpufleet's instances (name prefix; with ``pool``, that pool's), deleted ones left out."""
        stem = self.name_prefix + (pool.name if pool else "")
        out: builtins.list[Instance] = []
        for item in await self._list_raw(stem):
            name = str(item.get("name") or "")
            if not name.startswith(self.name_prefix):
                continue  # the server's name filter is fuzzy
            if pool is not None:
                owner = self.pool_for_name(name, self.name_prefix)
                if (owner.name if owner else None) != pool.name and not (
                    owner is None and (name == stem or name.startswith(stem + "-"))
                ):
                    continue
            inst = self._instance(item, pool)
            if inst.state is not InstanceState.deleted:
                out.append(inst)
        return out

    async def get(self, instance_id: str) -> Instance:
        data = await self._call("GET", "/gpu/instance", "get", params={"instanceId": instance_id})
        return self._instance(data)

    async def find_by_name(self, name: str) -> Instance | None:
        full = self.full_name(name)
        for item in await self._list_raw(full):
            if item.get("name") == full:
                inst = self._instance(item)
                if inst.state is not InstanceState.deleted:
                    return inst
        return None

    async def products(self) -> builtins.list[Product]:
        body = await self._call("GET", "/products", "products")
        data = body.get("data") if isinstance(body, dict) else None
        products = [wire.parse_product(p) for p in data or [] if isinstance(p, dict)]
        self._prices.update({p.id: p.price_per_hour for p in products})
        return products

    async def balance(self) -> AccountBalance:
        """The account's credit (``GET /openapi/v1/billing/balance/detail``, one call, no
        retry: the caller asks again later)."""
        body = await self.api.request("GET", self.balance_url, operation="balance")
        return wire.parse_balance(body)

    async def clusters(self) -> builtins.list[dict[str, Any]]:
        body = await self._call("GET", "/clusters", "clusters")
        data = body.get("data") if isinstance(body, dict) else None
        return [c for c in data or [] if isinstance(c, dict)]

    # -- lifecycle -----------------------------------------------------------------------------

    async def create(self, pool: PoolSpec, name: str) -> Instance:
        """Create one instance named ``name_prefix + name``; an existing one is returned as is.

        Each attempt first lists by name (so a retry after a lost answer finds the instance
        the lost call made), then posts once. Only transient errors are retried.
        """
        full = self.full_name(name)
        # Every instance gets its own secret (a pool's fixed token, if set, instead): the
        # worker gate in the image refuses calls without it (gpufleet.worker_auth).
        token = pool.token.get_secret_value() if pool.token else new_token()
        body = wire.create_body(pool, full, token)

        async def attempt() -> Instance:
            existing = await self.find_by_name(full)
            if existing is not None:
                logger.info("novita create %s: found %s, not creating again", full, existing.id)
                return existing
            answer = await self.api.request(
                "POST", "/gpu/instance/create", operation="create", json_body=body
            )
            instance_id = answer.get("id") if isinstance(answer, dict) else None
            if not instance_id:
                raise errors.ProviderBadResponse(
                    "novita: create answer has no id", provider=self.name
                )
            logger.info("novita instance %s created as %s", instance_id, full)
            return Instance(
                id=str(instance_id),
                name=full,
                state=InstanceState.pending,
                provider=self.name,
                provider_status="toCreate",
                price_per_hour=pool.price_per_hour,
                worker_token=token,
            )

        return await retrying(self.retry, attempt)

    async def _action(self, action: str, instance_id: str) -> None:
        await self._call(
            "POST", f"/gpu/instance/{action}", action, json_body={"instanceId": instance_id}
        )

    async def start(self, instance_id: str) -> Instance | None:
        """Start a stopped (``exited``) instance; ``InvalidState`` if it is not stopped."""
        await self._action("start", instance_id)
        return None

    async def stop(self, instance_id: str) -> Instance | None:
        """Stop a running instance; ``InvalidState`` if it is not running."""
        await self._action("stop", instance_id)
        return None

    async def delete(self, instance_id: str) -> None:
        """Release the instance from any state; an instance already gone counts as deleted."""
        try:
            await self._action("delete", instance_id)
        except errors.NotFound:
            logger.info("novita delete %s: already gone", instance_id)
