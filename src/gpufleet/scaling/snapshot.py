"""What the scaler sees: one frozen picture of pools, workers, demand and instances.

The reconciler (live) and the simulator (virtual clock) build a ``Snapshot`` each tick and hand
it to ``policy.plan``; nothing in here reads a clock, Redis or a provider. Every time is epoch
seconds (float), every price is USD, every rate is per hour, and the unit is in the name.

Building one (the reconciler's job, see docs/scaling.md):

- ``PoolView`` = the pool's ``PoolSpec`` with run-time overrides applied, plus the run-time
  state in Redis (backoff deadline, spend) and the policy knobs that have no PoolSpec field yet;
  ``PoolView.from_spec`` does the mapping.
- ``WorkerView`` = one registry record (``domain.Worker``) that is not ``deleted``, with
  ``busy_slots`` counting leases *and* proxy streams.
- ``Demand`` = one group of work that the same set of pools can serve (same engine and model),
  with the names of those pools.
- ``InstanceView`` = one instance the provider lists with gpufleet's name prefix; a provider
  whose list call failed this tick is left out of ``listed_providers``, so its absence from the
  list is not read as "vanished".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpufleet.domain import Engine, ProviderKind, WorkerState
from gpufleet.scaling.history import PoolHistory

# Provider kinds whose instances the scaler creates and deletes; others (SURF workspaces,
# static URLs) are a fixed set it can only revive or leave alone.
CREATABLE_PROVIDERS = frozenset({ProviderKind.novita, ProviderKind.simulated})


@dataclass(frozen=True, slots=True)
class PoolView:
    """A pool as the policy sees it: config, run-time state and policy knobs."""

    name: str
    provider: ProviderKind
    engine: Engine
    slots: int = 1
    models: tuple[str, ...] = ()
    min_workers: int = 0
    max_workers: int = 1
    # A fixed idle timeout, used as it is unless ``idle_timeout_auto``; with auto it is only
    # the ceiling of the learned one (and what the proxy's keep_alive is derived from).
    idle_timeout_s: float = 600.0
    # True: the policy learns the idle timeout from the pool's idle gaps (``idle_timeout_s =
    # "auto"`` in config, the default); False: ``idle_timeout_s`` as configured.
    idle_timeout_auto: bool = False
    # The wait objective: the scaler starts a worker whenever the work already waiting (plus
    # the arrivals it expects) would otherwise wait longer than this, if a start shortens it.
    target_wait_s: float = 60.0
    boot_timeout_s: float = 600.0
    price_per_hour: float = 0.0
    # What a parked (stopped / paused) worker still bills per hour: Novita charges the root
    # disk of a stopped instance, e.g. 50 GB x $0.0001/GB-h = $0.005/h.
    parked_cost_per_hour: float = 0.0
    # None: the policy picks it from cost (keepalive.park_timeout_s); a number fixes it.
    park_timeout_s: float | None = None
    # Expected boot of a fresh create and of a start/resume of a parked worker; their
    # difference is the cold-start penalty that parking avoids.
    create_boot_s: float = 180.0
    revive_boot_s: float = 60.0
    # What one second of a user waiting is worth, as USD per hour of waiting. Default: the
    # GPU's own price, i.e. a minute of a user's wait weighs like a minute of GPU rent.
    wait_cost_per_hour: float | None = None
    max_step_per_tick: int = 10
    backoff_until: float | None = None
    backoff_reason: str = ""
    spend_today_usd: float = 0.0
    max_spend_per_hour: float | None = None
    max_spend_per_day: float | None = None

    @property
    def can_create(self) -> bool:
        return self.provider in CREATABLE_PROVIDERS

    @property
    def price_per_slot_hour(self) -> float:
        return self.price_per_hour / self.slots

    @classmethod
    def from_spec(cls, spec: Any, **runtime: Any) -> PoolView:
        """Build from a ``settings.PoolSpec`` (overrides already applied) plus run-time fields."""
        return cls(
            name=spec.name,
            provider=ProviderKind(spec.provider),
            engine=Engine(spec.engine),
            slots=spec.slots,
            models=tuple(spec.models),
            min_workers=spec.min_workers,
            max_workers=spec.max_workers,
            idle_timeout_s=spec.idle_timeout_ceiling_s,
            idle_timeout_auto=spec.idle_timeout_s == "auto",
            target_wait_s=spec.target_wait_s,
            wait_cost_per_hour=spec.wait_cost_per_hour,
            boot_timeout_s=spec.boot_timeout_s,
            price_per_hour=spec.price_per_hour or 0.0,
            **runtime,
        )


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One registry record. ``busy_slots`` counts leased tasks and open proxy streams."""

    id: str
    pool: str
    state: WorkerState
    slots: int = 1
    busy_slots: int = 0
    instance_id: str = ""
    state_since: float = 0.0
    # When the current boot began: ``created_at`` for a new worker, the moment a start or
    # resume was asked for a revived one. None when not booting.
    boot_started_at: float | None = None
    ready_since: float | None = None
    last_busy_at: float | None = None
    provider_state: str = ""

    @property
    def idle_since(self) -> float | None:
        """When this worker last became idle; None while busy or never ready.

        The idle clock starts only once the worker has been ready, so a slow boot never counts
        as idle time.
        """
        if self.busy_slots > 0 or self.ready_since is None:
            return None
        return max(self.ready_since, self.last_busy_at or self.ready_since)

    def __repr__(self) -> str:
        return f"<WorkerView {self.id} {self.pool} {self.state} {self.busy_slots}/{self.slots}>"


@dataclass(frozen=True, slots=True)
class Demand:
    """Work that the pools in ``pools`` can all serve (same engine, model available)."""

    key: str
    pools: tuple[str, ...]
    queued: int = 0
    waiting: int = 0  # proxy requests waiting for a slot
    in_flight: int = 0
    oldest_wait_s: float = 0.0

    @property
    def total(self) -> int:
        return self.queued + self.waiting + self.in_flight


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One provider instance carrying gpufleet's name prefix."""

    instance_id: str
    provider: ProviderKind
    name: str = ""
    pool: str = ""  # parsed from the name; "" if it names no configured pool
    healthy: bool = False  # running and the engine answers
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class GlobalBudget:
    max_spend_per_hour: float | None = None
    max_spend_per_day: float | None = None
    spend_today_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    pools: tuple[PoolView, ...]
    workers: tuple[WorkerView, ...] = ()
    demand: tuple[Demand, ...] = ()
    instances: tuple[InstanceView, ...] = ()
    listed_providers: frozenset[ProviderKind] = field(default_factory=frozenset)
    budget: GlobalBudget = GlobalBudget()
    # What each pool's past says (``scaling.history``); a pool missing here has no history
    # and the policy uses its documented defaults.
    history: Mapping[str, PoolHistory] = field(default_factory=dict)
    # Each cloud account's available balance (USD) by provider kind ("novita"), as the observe
    # step last read it; a provider missing here is unknown and holds nothing.
    balances_usd: Mapping[str, float] = field(default_factory=dict)
