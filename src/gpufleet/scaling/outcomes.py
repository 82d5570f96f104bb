"""What the reconciler's decisions leave behind: an event, a log line and a metric each, and the
fleet gauges.

Every applied action ends in an ``Outcome``; ``Recorder.record`` turns it into one ``scale``
event (``EventLog``: ``GET /api/v1/events``, ``GET /pools``' last actions), one log line and
one ``gpufleet_scale_actions_total`` sample. Outcomes that repeat tick after tick while nothing
changes (``QUIET_OUTCOMES``) are logged and recorded once, counted every time. ``set_gauges``
sets the per-pool fleet gauges from a tick's ``Snapshot``; ``clear_fleet_gauges`` empties them
when this replica stops leading, so only the leader reports the fleet.

It decides nothing and calls no provider; its consumers are ``scaling/observe.py`` (sync and
recovery events), ``scaling/apply.py`` (outcomes) and ``scaling/reconciler.py`` (gauges).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpufleet.domain import LIVE_WORKER_STATES
from gpufleet.domain import WorkerState as WS
from gpufleet.metrics import (
    BURN_RATE,
    COST_PER_TASK,
    QUEUE_DEPTH,
    QUEUE_OLDEST_WAIT,
    SCALE_ACTIONS,
    SLOTS,
    WORKERS,
)
from gpufleet.scaling.actions import Action
from gpufleet.scaling.snapshot import Snapshot
from gpufleet.store.events import EventLog
from gpufleet.store.leader import LeaderLock

logger = logging.getLogger(__name__)

# Outcomes that repeat tick after tick while nothing changes; logged and recorded once.
QUIET_OUTCOMES = frozenset({"hold", "deferred", "skipped"})


@dataclass(frozen=True)
class Outcome:
    action: Action
    outcome: str  # ok, error, refused (fenced), skipped, deferred, hold
    detail: str = ""
    worker_id: str = ""
    instance_id: str = ""


class Recorder:
    """Outcome → event + log line + metric; stamps each event with the lock's fencing token."""

    def __init__(self, events: EventLog, lock: LeaderLock) -> None:
        self.events = events
        self.lock = lock
        self._quiet: dict[tuple[str, str, str], str] = {}

    def __repr__(self) -> str:
        return f"<Recorder replica={self.lock.replica_id} quiet={len(self._quiet)}>"

    async def record(self, result: Outcome) -> None:
        action = result.action
        name = action_name(action)
        SCALE_ACTIONS.labels(action.pool, name, result.outcome).inc()
        worker = result.worker_id or getattr(action, "worker_id", "")
        instance = result.instance_id or getattr(action, "instance_id", "")
        key = (action.pool, name, worker or instance)
        if result.outcome in QUIET_OUTCOMES:
            if self._quiet.get(key) == result.detail:
                return
            self._quiet[key] = result.detail
        else:
            self._quiet.pop(key, None)
        log = logger.warning if result.outcome in ("error", "refused") else logger.info
        log(
            "scale %s pool=%s worker=%s instance=%s -> %s%s: %s",
            name,
            action.pool,
            worker or "-",
            instance or "-",
            result.outcome,
            f" ({result.detail})" if result.detail else "",
            action.reason,
        )
        await self.event(
            name,
            action.pool,
            result.outcome,
            action.reason,
            worker=worker,
            instance=instance,
            detail=result.detail,
        )

    async def event(self, action: str, pool: str, outcome: str, reason: str, **fields: Any) -> None:
        """One ``scale`` event; empty fields are left out. Never raises."""
        try:
            await self.events.emit(
                "scale",
                pool=pool,
                action=action,
                outcome=outcome,
                reason=reason,
                token=self.lock.token,
                replica=self.lock.replica_id,
                **{k: v for k, v in fields.items() if v},
            )
        except Exception as exc:  # an event lost is not worth a failed tick
            logger.warning("reconciler: event not recorded (%s)", exc)


def set_gauges(snapshot: Snapshot, cost_per_task: Mapping[str, float]) -> None:
    """The fleet gauges from one tick's snapshot (the leader's view)."""
    clear_fleet_gauges()
    pools = {p.name: p for p in snapshot.pools}
    counts = Counter((w.pool, w.state.value) for w in snapshot.workers)
    for (pool_name, state), n in counts.items():
        WORKERS.labels(pool_name, state).set(n)
    for name, view in pools.items():
        ready = [w for w in snapshot.workers if w.pool == name and w.state is WS.ready]
        busy = sum(min(w.busy_slots, w.slots) for w in ready)
        SLOTS.labels(name, "busy").set(busy)
        SLOTS.labels(name, "free").set(sum(w.slots for w in ready) - busy)
        live = sum(1 for w in snapshot.workers if w.pool == name and w.state in LIVE_WORKER_STATES)
        BURN_RATE.labels(name).set(live * view.price_per_hour)
    for name, usd in cost_per_task.items():
        COST_PER_TASK.labels(name).set(usd)
    depth: Counter[str] = Counter()
    oldest: dict[str, float] = {}
    for d in snapshot.demand:  # unpooled work several pools may take: "<engine>/*"
        label = d.pools[0] if len(d.pools) == 1 else d.key
        depth[label] += d.queued
        oldest[label] = max(oldest.get(label, 0.0), d.oldest_wait_s)
    for label, n in depth.items():
        QUEUE_DEPTH.labels(label).set(n)
        QUEUE_OLDEST_WAIT.labels(label).set(oldest[label])


def clear_fleet_gauges() -> None:
    for gauge in (WORKERS, SLOTS, BURN_RATE, QUEUE_DEPTH, QUEUE_OLDEST_WAIT, COST_PER_TASK):
        gauge.clear()


def action_name(action: Action) -> str:
    """``Create`` → ``create``: the action label of events, logs and metrics."""
    return type(action).__name__.lower()


def why(exc: BaseException) -> str:
    """An exception as an outcome detail: its type and message, at most 300 characters."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
