"""The cloud accounts' balances, read at most once a ``refresh_s`` for the scaler.

``AccountWatcher.balances(kinds)`` answers ``{provider: available USD}`` for the providers of
the configured pools that report a balance (Novita). It is the reconciler's observe step's
source for ``Snapshot.balances_usd``, from which the pure policy holds a scale-up that the
balance would not cover for an hour. A read is one call bounded by ``timeout_s``; a
provider that fails is left out (unknown: the policy holds nothing for it) and asked again
after ``refresh_s``, so a balance endpoint that is down never blocks scaling. Providers that
have no balance (SURF, static) are asked once. The gauge ``gpufleet_provider_balance_usd``
follows each read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from gpufleet.metrics import PROVIDER_BALANCE
from gpufleet.providers.base import Provider, Unsupported

logger = logging.getLogger(__name__)

# Novita's balance moves by cents a minute at fleet scale: a minute-old figure decides as well.
REFRESH_S = 60.0
# The read happens inside a reconcile tick: it must never hold one up for long.
TIMEOUT_S = 5.0


class AccountWatcher:
    def __init__(
        self,
        providers: Mapping[str, Provider],
        *,
        clock: Callable[[], float] = time.time,
        refresh_s: float = REFRESH_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.providers = providers
        self.clock = clock
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self._known: dict[str, float] = {}
        self._read_at: dict[str, float] = {}
        self._unsupported: set[str] = set()

    def __repr__(self) -> str:
        return f"<AccountWatcher {self._known}>"

    async def balances(self, kinds: Iterable[str]) -> dict[str, float]:
        """Available USD per provider of ``kinds`` whose balance is known (cached)."""
        now = self.clock()
        wanted = set(kinds)
        for kind in sorted(wanted):
            provider = self.providers.get(kind)
            if provider is None or kind in self._unsupported:
                continue
            last = self._read_at.get(kind)
            if last is not None and now - last < self.refresh_s:
                continue
            self._read_at[kind] = now
            await self._read(kind, provider)
        return {k: v for k, v in self._known.items() if k in wanted}

    async def _read(self, kind: str, provider: Provider) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                balance = await provider.balance()
        except Unsupported:
            self._unsupported.add(kind)
            return
        except Exception as exc:  # unknown, not zero: a failed read must not hold scaling
            self._known.pop(kind, None)
            if kind in _labels():
                PROVIDER_BALANCE.remove(kind)
            logger.warning(
                "%s balance not read (%s); scaling goes on without it", kind, exc or type(exc)
            )
            return
        self._known[kind] = balance.available_usd
        PROVIDER_BALANCE.labels(kind).set(balance.available_usd)


def _labels() -> set[str]:
    """Providers that have a balance gauge now."""
    return {
        sample.labels["provider"]
        for metric in PROVIDER_BALANCE.collect()
        for sample in metric.samples
    }
