"""Value types and state machines shared by every layer. No I/O here.

Statuses are ``StrEnum``s with lowercase values: they go over the wire and into
Redis as-is. The named sets and the transition table are what the store checks
before it writes a new state.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from enum import StrEnum


class Engine(StrEnum):
    comfyui = "comfyui"
    ollama = "ollama"


class ProviderKind(StrEnum):
    novita = "novita"
    surf = "surf"
    static = "static"
    simulated = "simulated"


class TaskStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_TASK_STATUSES = frozenset({TaskStatus.succeeded, TaskStatus.failed, TaskStatus.cancelled})


class WorkerState(StrEnum):
    provisioning = "provisioning"
    booting = "booting"
    ready = "ready"
    draining = "draining"
    stopping = "stopping"
    stopped = "stopped"
    paused = "paused"
    deleted = "deleted"
    failed = "failed"


# Workers whose instance is coming up (created, started or resumed) and not yet ready.
BOOTING_WORKER_STATES = frozenset({WorkerState.provisioning, WorkerState.booting})
# Workers that are (or soon will be) up: they bill, are health-probed, and count as a pool
# being awake. The one definition: the scaler, the simulator, the health checker, the proxy
# and the API all use it.
LIVE_WORKER_STATES = BOOTING_WORKER_STATES | {WorkerState.ready, WorkerState.draining}
# Workers that are parked and can be revived (start / resume) faster than a create.
PARKED_WORKER_STATES = frozenset({WorkerState.stopped, WorkerState.paused})

WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.provisioning: frozenset(
        {WorkerState.booting, WorkerState.ready, WorkerState.stopping, WorkerState.deleted}
    ),
    WorkerState.booting: frozenset({WorkerState.ready, WorkerState.stopping, WorkerState.deleted}),
    WorkerState.ready: frozenset({WorkerState.draining, WorkerState.stopping, WorkerState.booting}),
    WorkerState.draining: frozenset({WorkerState.ready, WorkerState.stopping}),
    WorkerState.stopping: frozenset({WorkerState.stopped, WorkerState.paused, WorkerState.deleted}),
    WorkerState.stopped: frozenset({WorkerState.booting, WorkerState.deleted}),
    WorkerState.paused: frozenset({WorkerState.booting, WorkerState.deleted}),
    WorkerState.deleted: frozenset(),
    WorkerState.failed: frozenset({WorkerState.deleted, WorkerState.stopping}),
}


def can_transition(old: WorkerState, new: WorkerState) -> bool:
    """True if a worker may move from ``old`` to ``new``; ``failed`` is reachable from any state."""
    if new is WorkerState.failed:
        return old is not WorkerState.deleted
    return new in WORKER_TRANSITIONS[old]


@dataclass(frozen=True)
class Worker:
    """One instance in a pool, as the registry in Redis knows it."""

    id: str
    pool: str
    provider: str
    state: WorkerState
    slots: int
    busy_slots: int = 0
    instance_id: str = ""
    instance_name: str = ""
    base_url: str = ""
    engine: str = ""
    models_present: tuple[str, ...] = ()
    models_loaded: tuple[str, ...] = ()
    created_at: float = 0.0
    state_since: float = 0.0
    ready_since: float | None = None
    last_busy_at: float | None = None
    health_failures: int = 0
    price_per_hour: float = 0.0
    cost_usd: float = 0.0
    last_error: str = ""
    # The secret the worker's gate wants (``gpufleet.worker_auth``); never shown or logged.
    token: str = field(default="", repr=False, compare=False)

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.busy_slots) if self.state is WorkerState.ready else 0

    @property
    def takes_new_work(self) -> bool:
        """Ready, and its last contact did not fail: a worker that refused a connection or
        missed a probe gets no new task until a probe answers again (its running tasks
        stay; ``unhealthy_after`` decides when it leaves ``ready``)."""
        return self.state is WorkerState.ready and self.health_failures == 0

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.pool} {self.state} {self.busy_slots}/{self.slots}>"


@functools.lru_cache(maxsize=4096)  # once per proxied answer to a user key
def public_worker_id(worker_id: str) -> str:
    """The alias user-role keys see for a worker (API and proxy answers): stable, and
    reveals no instance id (a Novita worker's id is its instance id)."""
    return "w-" + hashlib.sha256(f"gpufleet-worker:{worker_id}".encode()).hexdigest()[:16]
