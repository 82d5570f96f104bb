"""The reconciler's bookkeeping: what the fleet spent since the last tick, and how long boots took.

Spend: each tick bills every live worker (and every ``stopping`` one: its instance still runs)
at its pool's ``price_per_hour``, and every parked one at the pool's parked cost (a stopped
Novita instance still bills its root disk), for the time since the last tick. The worker's
``cost_usd`` goes through ``WorkerRegistry.add_costs`` (``store/lua/add_cost.lua``), the
pool's spend through ``PoolStateStore.add_spend``; ``gpufleet_spend_usd_total`` counts it.
The time of the last billing is kept in Redis (``{prefix}:scaling:accounted_at``), so a new
leader bills from where the old one stopped, never twice.

Boot times: ``note_started`` (the apply step, after a create/start/resume that worked) and
``note_ready`` (the observe step, every tick) turn "booting since t, ready at t'" into one
``gpufleet_boot_seconds`` sample and one history boot of its source (``create`` or ``revive``),
which ``HistoryStore`` keeps for the policy's boot estimates.

It decides nothing (the policy does) and calls no provider.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Container, Iterable

import redis.asyncio as aioredis

from gpufleet.domain import (
    BOOTING_WORKER_STATES,
    LIVE_WORKER_STATES,
    PARKED_WORKER_STATES,
    ProviderKind,
)
from gpufleet.domain import WorkerState as WS
from gpufleet.metrics import BOOT_SECONDS, SPEND
from gpufleet.scaling.snapshot import Snapshot, WorkerView
from gpufleet.settings import PoolSpec
from gpufleet.store.history import HistoryStore
from gpufleet.store.keys import Keys
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.workers import WorkerRegistry

# What a stopped Novita instance still bills: its root disk. Novita lists no price for it;
# $0.0001 per GB-hour (50 GB -> $0.005/h) is the figure docs/scaling.md works with.
NOVITA_DISK_USD_PER_GB_HOUR = 0.0001
# A spend interval longer than this (a leader away, a stalled loop) is not billed in one go.
MAX_ACCOUNT_GAP_S = 300.0


def parked_cost_per_hour(spec: PoolSpec) -> float:
    """What one parked (stopped/paused) worker of ``spec`` still bills per hour."""
    if spec.provider is ProviderKind.novita:
        return spec.rootfs_gb * NOVITA_DISK_USD_PER_GB_HOUR
    return 0.0


class Accountant:
    """Spend and boot-time bookkeeping for one reconciler (its boot marks live in memory:
    a boot that a previous leader started is measured from the worker's own timestamps)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        registry: WorkerRegistry,
        pool_state: PoolStateStore,
        history: HistoryStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.registry = registry
        self.pool_state = pool_state
        self.history = history
        self.clock = clock
        self.accounted_key = Keys(prefix).accounted_at()
        self._booting: dict[str, float] = {}  # worker id -> boot start, from the last tick
        self._boot_source: dict[str, str] = {}  # worker id -> "create" | "revive" (history)

    def __repr__(self) -> str:
        return f"<Accountant booting={len(self._booting)}>"

    # -- boot times ----------------------------------------------------------------------------

    def note_started(self, worker_id: str, source: str) -> None:
        """A create (``source="create"``) or start/resume (``"revive"``) this leader asked
        for worked: the worker is booting from now, even if it is ready before the next tick."""
        self._booting[worker_id] = self.clock()
        self._boot_source[worker_id] = source

    def note_ready(self, views: Iterable[WorkerView]) -> None:
        """Boot-time metric for workers that became ready since the last tick: fresh ones, and
        revived ones whose start/resume this leader asked for (seeded by ``note_started``); a
        ready worker that went back to booting after failed probes is not a boot. The boots
        go to the history with the next ``HistoryStore.flush``."""
        booting: dict[str, float] = {}
        sources: dict[str, str] = {}
        for w in views:
            if w.boot_started_at is not None and w.state in BOOTING_WORKER_STATES:
                if w.ready_since is None or w.id in self._booting:
                    booting[w.id] = w.boot_started_at
                    # never ready before: a fresh instance; else a start / resume
                    sources[w.id] = "create" if w.ready_since is None else "revive"
            elif w.state is WS.ready and w.id in self._booting and w.ready_since is not None:
                seconds = max(0.0, w.ready_since - self._booting[w.id])
                BOOT_SECONDS.labels(w.pool).observe(seconds)
                source = self._boot_source.get(w.id)
                if source is not None:
                    self.history.note_boot(w.pool, source, seconds)
        self._booting = booting
        self._boot_source = sources

    # -- spend ---------------------------------------------------------------------------------

    async def bill(self, snapshot: Snapshot, known: Container[str]) -> None:
        """Add what live and parked workers cost since the last tick to pools and workers.
        ``known``: the worker ids still in the registry after this tick's apply."""
        now = snapshot.now
        last = await self.redis.getset(self.accounted_key, repr(now))
        if last is None:
            return
        dt = min(max(0.0, now - float(last)), MAX_ACCOUNT_GAP_S)
        if dt <= 0:
            return
        pools = {p.name: p for p in snapshot.pools}
        per_pool: dict[str, float] = defaultdict(float)
        per_worker: dict[str, float] = {}
        for w in snapshot.workers:
            pool = pools.get(w.pool)
            if pool is None or w.id not in known:
                continue
            if w.state in LIVE_WORKER_STATES or w.state is WS.stopping:
                rate = pool.price_per_hour
            elif w.state in PARKED_WORKER_STATES:
                rate = pool.parked_cost_per_hour
            else:
                continue
            usd = rate * dt / 3600.0
            if usd > 0:
                per_pool[w.pool] += usd
                per_worker[w.id] = usd
        await self.registry.add_costs(per_worker)
        for pool_name, usd in per_pool.items():
            await self.pool_state.add_spend(pool_name, usd)
            SPEND.labels(pool_name).inc(usd)
