"""What each pool's GPUs offer: config first, a Novita pool's gaps from its product's name.

``GpuCatalog.offers()`` answers ``{pool name: GpuOffer | None}``. Pools whose config says
``gpu`` and ``gpu_memory_gb`` (all SURF and static pools that declare them) never cause a
call; a Novita pool that leaves either out is looked up in ``GET /products`` (the name
carries the GPU and its memory: ``"RTX 4090 24GB"``). The product list is read only when a
requirement needs it, kept ``ttl_s`` (an hour: products do not change GPUs), and after a
failed read not asked again for ``retry_s``; until it is read those pools count as "GPU
unknown" and fit no requirement. Each new answer is applied to the settings' pools
(``Settings.apply_gpu_offers``), so routing (the proxy, the scaler) sees it too.

Consumers: the task router (submit check), the app's lifespan (a first read in the
background when ``[models]`` has requirements).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from gpufleet import errors
from gpufleet.domain import ProviderKind
from gpufleet.gpus import GpuOffer, fill_offer, parse_product_name
from gpufleet.providers.base import Capability, Provider
from gpufleet.settings import Settings

logger = logging.getLogger(__name__)

PRODUCTS_TTL_S = 3600.0
RETRY_S = 60.0


class GpuCatalog:
    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        *,
        clock: Callable[[], float] = time.monotonic,
        ttl_s: float = PRODUCTS_TTL_S,
        retry_s: float = RETRY_S,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.clock = clock
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self._products: dict[str, str] = {}  # Novita product id -> name
        self._read_at: float | None = None
        self._failed_at: float | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<GpuCatalog products={len(self._products)}>"

    def _needs_products(self) -> bool:
        return any(
            p.provider is ProviderKind.novita and (p.gpu is None or p.gpu_memory_gb is None)
            for p in self.settings.pools
        )

    def known(self) -> dict[str, GpuOffer | None]:
        """Each pool's offer from what is known now (no call)."""
        out: dict[str, GpuOffer | None] = {}
        for pool in self.settings.pools:
            product = None
            if pool.provider is ProviderKind.novita and pool.product_id in self._products:
                product = parse_product_name(self._products[pool.product_id], pool.gpu_num)
            out[pool.name] = fill_offer(pool.gpu_offer, product)
        return out

    def _due(self) -> bool:
        now = self.clock()
        if self._failed_at is not None and now - self._failed_at < self.retry_s:
            return False
        return self._read_at is None or now - self._read_at >= self.ttl_s

    async def offers(self) -> dict[str, GpuOffer | None]:
        """Each pool's offer, reading the product list first if it is needed and due."""
        if self._needs_products() and self._due():
            async with self._lock:
                if self._due():
                    await self._read_products()
        return self.known()

    async def _read_products(self) -> None:
        provider = self.providers.get(ProviderKind.novita.value)
        if provider is None or Capability.products not in provider.capabilities:
            self._failed_at = self.clock()
            return
        try:
            products = await provider.products()
        except errors.ProviderError as exc:
            self._failed_at = self.clock()
            logger.warning(
                "GPU catalog: Novita products not read (%s); pools without gpu and "
                "gpu_memory_gb in config count as 'GPU unknown' for now",
                exc,
            )
            return
        self._products = {p.id: p.name for p in products}
        self._read_at, self._failed_at = self.clock(), None
        self.settings.apply_gpu_offers(self.known())

    def start(self) -> None:
        """Read the product list in the background if ``[models]`` needs it (app start)."""
        if self.settings.models and self._needs_products() and self._task is None:
            self._task = asyncio.create_task(self.offers_quietly(), name="gpufleet-gpu-catalog")

    async def offers_quietly(self) -> None:
        try:
            await self.offers()
        except Exception as exc:  # a background read must not crash anything
            logger.warning("GPU catalog: read failed (%s)", exc)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
