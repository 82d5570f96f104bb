"""What the scaler decided: one frozen value per provider or registry operation.

``policy.plan`` returns these; the reconciler applies them in order (each safe to repeat and
checked before it acts, e.g. ``Stop`` re-reads ``busy_slots``), and the simulator applies them
to its virtual fleet. Every action carries ``pool`` (a bounded metrics label) and a
human-readable ``reason``. ``Hold`` is the one no-op: a scale-up the policy wanted and refused
(budget, backoff, max_workers), so the refusal shows in status and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Create:
    """Create a new instance in ``pool`` (record first, then the provider call)."""

    pool: str
    reason: str


@dataclass(frozen=True, slots=True)
class Resume:
    """Resume a paused (SURF) worker."""

    pool: str
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Start:
    """Start a stopped (Novita) worker; it keeps its pulled image."""

    pool: str
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Drain:
    """Stop leasing new work to the worker (registry state ``draining``)."""

    pool: str
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the instance (Novita): billing drops to the disk, start is faster than create."""

    pool: str
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Pause:
    """Pause the workspace (SURF)."""

    pool: str
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete the instance and retire the record.

    ``worker_id`` is "" for an orphan the registry does not know; ``instance_id`` is "" for a
    record that never got an instance. "Not found" at the provider counts as done.
    """

    pool: str
    worker_id: str
    instance_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class MarkFailed:
    pool: str
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Adopt:
    """Register an instance with our prefix that the registry does not know."""

    pool: str
    instance_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Hold:
    """A refused scale-up; ``code`` is a bounded label: budget, balance, backoff or
    max_workers."""

    pool: str
    code: str
    reason: str


Action = Create | Resume | Start | Drain | Stop | Pause | Delete | MarkFailed | Adopt | Hold
SCALE_UP_ACTIONS = (Create, Resume, Start, Adopt)
