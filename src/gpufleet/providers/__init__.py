"""Cloud providers behind one interface (``base.Provider``); this module maps names to classes.

Each provider module is imported only when a configuration needs it (the saq ``from_url``
pattern), so a deployment with only static endpoints never imports the cloud clients.
``build_providers(settings)`` is what the app's lifespan calls; the caller closes what it
gets (``await provider.aclose()``).
"""

from __future__ import annotations

import httpx

from gpufleet.domain import ProviderKind
from gpufleet.providers.base import (
    Capability,
    Instance,
    InstanceState,
    Product,
    Provider,
    RetryPolicy,
    Unsupported,
)
from gpufleet.settings import Settings

__all__ = [
    "PROVIDER_NAMES",
    "Capability",
    "Instance",
    "InstanceState",
    "Product",
    "Provider",
    "RetryPolicy",
    "Unsupported",
    "build_providers",
    "provider_class",
]

PROVIDER_NAMES = ("novita", "surf", "static")


def provider_class(name: str) -> type[Provider]:
    """The class for a provider name; its module is imported here, on first use."""
    if name == "novita":
        from gpufleet.providers.novita import NovitaProvider

        return NovitaProvider
    if name == "surf":
        from gpufleet.providers.surf import SurfProvider

        return SurfProvider
    if name == "static":
        from gpufleet.providers.static import StaticProvider

        return StaticProvider
    raise KeyError(f"unknown provider {name!r} (known: {', '.join(PROVIDER_NAMES)})")


def build_providers(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    retry: RetryPolicy | None = None,
) -> dict[str, Provider]:
    """One provider per kind that some pool uses or that has credentials configured."""
    kinds = {p.provider for p in settings.pools}
    out: dict[str, Provider] = {}
    novita = settings.providers.novita
    if ProviderKind.novita in kinds or novita.api_key is not None:
        from gpufleet.providers.novita import NovitaProvider

        out["novita"] = NovitaProvider(
            novita, pools=settings.pools, transport=transport, retry=retry
        )
    surf = settings.providers.surf
    if ProviderKind.surf in kinds or surf.api_token is not None:
        from gpufleet.providers.surf import SurfProvider

        out["surf"] = SurfProvider(surf, pools=settings.pools, transport=transport, retry=retry)
    if ProviderKind.static in kinds:
        from gpufleet.providers.static import StaticProvider

        out["static"] = StaticProvider(settings.pools)
    return out
