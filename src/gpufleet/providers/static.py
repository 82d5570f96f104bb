"""Static endpoints: self-hosted Ollama / ComfyUI servers listed by URL in a pool.

Always running, never created, stopped or paused. An instance's id is
``<pool>-<index>`` (stable while the pool's ``urls`` keep their order) and its name the
same; ``base_url`` is the configured URL. Health is the engine's business, not this one's.
"""

from __future__ import annotations

import builtins

from gpufleet import errors
from gpufleet.domain import ProviderKind
from gpufleet.providers.base import Capability, Instance, InstanceState, Provider
from gpufleet.settings import PoolSpec


class StaticProvider(Provider):
    name = "static"
    capabilities = frozenset({Capability.list, Capability.get})

    def __init__(self, pools: builtins.list[PoolSpec] | tuple[PoolSpec, ...] = ()) -> None:
        super().__init__([p for p in pools if p.provider is ProviderKind.static])

    def _instances(self, pool: PoolSpec) -> builtins.list[Instance]:
        return [
            Instance(
                id=f"{pool.name}-{index}",
                name=f"{pool.name}-{index}",
                state=InstanceState.running,
                provider=self.name,
                provider_status="static",
                base_url=url.rstrip("/"),
                price_per_hour=pool.price_per_hour or 0.0,
            )
            for index, url in enumerate(pool.urls)
        ]

    async def list(self, pool: PoolSpec | None = None) -> builtins.list[Instance]:
        pools = [pool] if pool is not None else builtins.list(self.pools)
        return [inst for p in pools for inst in self._instances(p)]

    async def get(self, instance_id: str) -> Instance:
        for inst in await self.list():
            if inst.id == instance_id:
                return inst
        raise errors.NotFound(f"static: no endpoint {instance_id!r}", provider=self.name)
