"""The task as clients submit it (``TaskSubmit``) and as gpufleet reports it (``Task``).

Pure value types, no I/O. ``gpufleet.store.queue`` stores and loads them; the REST
router (``gpufleet.api.tasks``) validates request bodies with ``TaskSubmit``.
The older ComfyLess body ``{"workflow_id": ..., "priority": 5, "payload": {graph}}``
is a valid ``TaskSubmit`` as is (``kind`` defaults to ``comfyui``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gpufleet.domain import TERMINAL_TASK_STATUSES, Engine, TaskStatus
from gpufleet.gpus import CUDA_VERSION, GpuRequirement
from gpufleet.graphs import graph_problems

OLLAMA_APIS = ("chat", "generate", "embed")
MAX_TIMEOUT_S = 7 * 24 * 3600


class TaskSubmit(BaseModel):
    """A request to run one piece of work (the body of ``POST /api/v1/tasks``)."""

    # Unknown fields are ignored, not refused: older ComfyLess clients send their own extras.
    model_config = ConfigDict(extra="ignore")

    kind: Engine = Field(Engine.comfyui, description="Engine that runs it.")
    payload: dict[str, Any] = Field(
        description="ComfyUI API-format graph, or for ollama "
        '{"api": "chat"|"generate"|"embed", "body": {...}}.'
    )
    workflow_id: str | None = Field(None, max_length=200, description="Free-form label.")
    priority: int = Field(5, ge=0, le=9, description="0-9, higher runs first; FIFO within one.")
    pool: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Run only in this pool."
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^\S+$",
        description="Run only on a worker serving this model (ollama: defaults to body.model).",
    )
    max_attempts: int | None = Field(
        None, ge=1, le=100, description="Attempts before the task fails (default from config)."
    )
    timeout_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, description="Longest one attempt may run (seconds)."
    )
    max_queue_age_s: float | None = Field(
        None,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Fail the task if it is still waiting this long after submission "
        "(seconds); default and upper bound: [queue] max_queue_age_s (24 h).",
    )
    # GPU requirements (issue 17): the task runs only in pools whose GPUs fit; none fits: 422.
    gpu_memory_gb: float | None = Field(
        None, gt=0, le=4096, description="Least GPU memory of the worker (GB)."
    )
    gpu: list[str] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description='Acceptable GPU names, e.g. ["RTX 4090", "A100"] (case-insensitive; '
        '"NVIDIA" and the like ignored).',
    )
    cuda: str | None = Field(None, pattern=CUDA_VERSION, description="Least CUDA version.")

    @property
    def gpu_requirement(self) -> GpuRequirement:
        return GpuRequirement(gpu_memory_gb=self.gpu_memory_gb, gpu=self.gpu, cuda=self.cuda)

    @field_validator("gpu")
    @classmethod
    def _check_gpu_names(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and any(not n.strip() or len(n) > 100 for n in names):
            raise ValueError("each GPU name must be 1-100 characters")
        return names

    @field_validator("payload")
    @classmethod
    def _check_payload(cls, payload: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        kind = info.data.get("kind", Engine.comfyui)
        if kind == Engine.ollama:
            api = payload.get("api")
            if api not in OLLAMA_APIS:
                raise ValueError(f"payload.api must be one of {', '.join(OLLAMA_APIS)}")
            body = payload.get("body")
            if not isinstance(body, dict):
                raise ValueError("payload.body must be an object (the Ollama request body)")
            model = body.get("model")
            if not isinstance(model, str) or not model.strip():
                raise ValueError("payload.body.model is required")
            return payload
        problems = graph_problems(payload)
        if problems:
            raise ValueError("; ".join(problems[:20]))
        return payload

    @model_validator(mode="after")
    def _ollama_model(self) -> TaskSubmit:
        if self.kind == Engine.ollama and self.model is None:
            self.model = str(self.payload["body"]["model"])
        return self


class Task(BaseModel):
    """A task as stored: what was asked, where it stands, and its timeline (epoch seconds)."""

    id: str
    kind: Engine
    status: TaskStatus
    priority: int
    pool: str | None = None
    model: str | None = None
    workflow_id: str | None = None
    owner: str | None = Field(
        None, description="Who owns it: 'team:<name>' for a team's key, else the key's id."
    )
    submitted_by: str | None = Field(None, description="Id of the API key that submitted it.")
    payload: dict[str, Any] | None = Field(None, description="Left out of listings.")
    max_attempts: int
    attempts: int = Field(0, description="Attempts started so far.")
    timeout_s: float | None = None
    created_at: float
    queued_at: float | None = None
    started_at: float | None = Field(None, description="Start of the latest attempt.")
    finished_at: float | None = None
    next_attempt_at: float | None = Field(None, description="When a waiting retry is due.")
    expires_at: float | None = Field(
        None, description="If still waiting then, the task fails (code 'expired')."
    )
    worker: str | None = Field(None, description="Worker of the latest attempt.")
    lease_deadline: float | None = None
    result: Any = None
    error: dict[str, Any] | None = Field(None, description="Error of the latest failed attempt.")
    errors: list[dict[str, Any]] = Field(
        default_factory=list, description="Every failed attempt's error, oldest first."
    )
    requires: dict[str, Any] | None = Field(
        None,
        description="GPU requirement it runs under (its own and its model's, from config): "
        "gpu_memory_gb, gpu, cuda.",
    )

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_TASK_STATUSES

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.kind} {self.status} p{self.priority} #{self.attempts}>"

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> Task:
        """Build from the Redis hash the Lua scripts write (all values are strings)."""

        def opt_float(name: str) -> float | None:
            value = data.get(name)
            return float(value) if value else None

        def opt_json(name: str) -> Any:
            value = data.get(name)
            return json.loads(value) if value else None

        payload = data.get("payload")
        return cls(
            id=data["id"],
            kind=Engine(data["kind"]),
            status=TaskStatus(data["status"]),
            priority=int(data["priority"]),
            pool=data.get("pool") or None,
            model=data.get("model") or None,
            workflow_id=data.get("workflow_id") or None,
            owner=data.get("owner") or None,
            submitted_by=data.get("submitted_by") or None,
            payload=json.loads(payload) if payload else None,
            max_attempts=int(data["max_attempts"]),
            attempts=int(data.get("attempts") or 0),
            timeout_s=opt_float("timeout_s"),
            created_at=float(data["created_at"]),
            queued_at=opt_float("queued_at"),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            next_attempt_at=opt_float("next_attempt_at"),
            expires_at=opt_float("expires_at"),
            worker=data.get("worker") or None,
            lease_deadline=opt_float("lease_deadline"),
            result=opt_json("result"),
            error=opt_json("error"),
            errors=opt_json("errors") or [],
            requires=opt_json("requires"),
        )


class LeaseOutcome(StrEnum):
    """What heartbeat / ack / fail found."""

    ok = "ok"  # done as asked
    retry = "retry"  # fail(): the task waits for another attempt
    failed = "failed"  # fail(): the task failed for good
    cancelled = "cancelled"  # the task was cancelled: stop working on it
    lost = "lost"  # the lease expired and someone else holds the task (or nobody)


@dataclass(frozen=True)
class Lease:
    """A task handed to one worker until ``deadline`` unless it heartbeats with ``token``."""

    task: Task
    token: str
    deadline: float

    @property
    def task_id(self) -> str:
        return self.task.id

    def __repr__(self) -> str:
        return f"<Lease {self.task.id} {self.token} until {self.deadline:.3f}>"


@dataclass(frozen=True)
class TaskEvent:
    """One state change from a task's event stream."""

    id: str  # Redis stream id, usable as SSE Last-Event-ID
    task_id: str
    status: TaskStatus
    ts: float
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task_id": self.task_id,
            "status": str(self.status),
            "ts": self.ts,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True)
class QueueStats:
    """What the scaler reads. ``queued*`` include retries waiting for their backoff.

    Keys of the ``*_by_*`` maps: pool name, engine kind, or model name.
    ``queued_by_pool`` counts tasks that name that pool; ``queued_unpooled`` counts, per
    engine, tasks that name no pool (any pool of that engine may take them).
    ``oldest_by_pool`` / ``oldest_unpooled`` hold ``queued_at`` (epoch s) of the oldest
    runnable waiting task of the same two groups.
    """

    queued: int
    running: int
    delayed: int
    queued_by_pool: dict[str, int]
    queued_unpooled: dict[str, int]
    queued_by_engine: dict[str, int]
    queued_by_model: dict[str, int]
    running_by_pool: dict[str, int]
    running_by_engine: dict[str, int]
    running_by_model: dict[str, int]
    oldest_by_pool: dict[str, float]
    oldest_unpooled: dict[str, float]
    queued_by_owner: dict[str, int]  # API key id -> waiting tasks (the max_queued limit)
    running_by_owner: dict[str, int]  # API key id -> running tasks (for max_concurrent)
    # Runnable waiting tasks (retries in their backoff left out) by requirement: pool name
    # (tasks naming a pool) or engine (tasks naming none) -> model ("*": none) -> count.
    # The scaler uses it to count a task only for pools that serve its model.
    runnable_by_pool_model: dict[str, dict[str, int]] = field(default_factory=dict)
    runnable_unpooled_by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    # Tasks whose GPU requirement only some pools fit ("fit set": the pool names joined by
    # "+"). They also count as unpooled above (queued_unpooled, running_by_engine); these
    # say how many of those belong to each fit set: queued, running, runnable by model, and
    # queued_at of the oldest runnable one.
    queued_by_fit: dict[str, int] = field(default_factory=dict)
    running_by_fit: dict[str, int] = field(default_factory=dict)
    runnable_fit_by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest_by_fit: dict[str, float] = field(default_factory=dict)

    def oldest_age_s(self, now: float) -> float:
        """Age of the oldest waiting task anywhere (0 when none waits)."""
        times = [
            *self.oldest_by_pool.values(),
            *self.oldest_unpooled.values(),
            *self.oldest_by_fit.values(),
        ]
        return max(0.0, now - min(times)) if times else 0.0


ListStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
