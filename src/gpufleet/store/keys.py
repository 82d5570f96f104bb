"""Every Redis key and channel the task queue uses: the prefix and one function per key.

The Lua scripts build the same names from the prefix (``store/lua/lib.lua``, the
``k_*`` functions); ``tests/integration/test_queue.py::test_key_layout_matches_lua``
checks that both agree. Nothing here talks to Redis.

Shapes and lifetimes (``P`` is the prefix):

- ``P:task:{id}`` HASH, one task. No TTL while queued or running (an accepted task is
  never lost); ``result_ttl_s`` once finished.
- ``P:task:{id}:events`` STREAM, the task's state changes, capped (MAXLEN ~64); same
  lifetime as the task.
- ``P:q:pool:{pool}:{model}`` / ``P:q:kind:{kind}:{model}`` ZSET of waiting task ids,
  one per requirement (``*`` = no model required); score
  ``(9 - priority) * 1e13 + seq``: higher priority first, FIFO within a priority.
- ``P:qs:pool:{pool}`` / ``P:qs:kind:{kind}`` SET of the non-empty queue keys above, so a
  lease finds a pool's queues without SCAN. Bounded by pools × models.
- ``P:q:fit:{a+b}:{model}`` ZSET, ``P:qs:fit:{a+b}`` SET: the same for tasks whose GPU
  requirement only the pools ``a`` and ``b`` fit (their "fit set", names sorted, joined by
  ``+``); ``P:fits:{kind}`` SET of the fit sets seen, so a lease finds those naming its pool.
- ``P:delayed`` ZSET of retries by due time (epoch s); moved back by lease/requeue.
- ``P:leases`` ZSET of running task ids by lease deadline: expired leases are a range.
- ``P:tasks`` and ``P:tasks:{status}`` ZSETs of task ids by ``seq`` for listing; finished
  entries leave with the task (``P:expiry``).
- ``P:expiry`` ZSET of finished task ids by the time their records may be deleted.
- ``P:deadlines`` ZSET of unfinished task ids by ``expires_at`` (submission + maximum queue
  age): housekeeping fails the ones still waiting then; a task leaves it when it finishes.
- ``P:depth`` / ``P:inflight`` HASH of counters (``all``, ``kind:K``, ``pool:P``,
  ``nopool:K``, ``fit:S`` (also counted in ``nopool:K``), ``model:M``) of queued (incl.
  delayed) and running tasks; zero fields are deleted, so both keys vanish when idle.
- ``P:seq`` STRING counter; ``P:idem:{owner}:{key}`` STRING idempotency key → task id,
  lives as long as its task.
- channels: ``P:wake`` (a task became runnable: the dispatcher/scaler hook),
  ``P:task-events`` (``"{id} {status}"`` on every state change), ``P:cancel`` (``{id}``
  of a running task that was cancelled, for lease holders).
"""

from __future__ import annotations

NO_MODEL = "*"


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str = "gpufleet") -> None:
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"<Keys {self.prefix}>"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def task_events(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}:events"

    def pool_queue(self, pool: str, model: str | None = None) -> str:
        return f"{self.prefix}:q:pool:{pool}:{model or NO_MODEL}"

    def kind_queue(self, kind: str, model: str | None = None) -> str:
        return f"{self.prefix}:q:kind:{kind}:{model or NO_MODEL}"

    def pool_queues(self, pool: str) -> str:
        return f"{self.prefix}:qs:pool:{pool}"

    def kind_queues(self, kind: str) -> str:
        return f"{self.prefix}:qs:kind:{kind}"

    def fit_queue(self, fit: str, model: str | None = None) -> str:
        return f"{self.prefix}:q:fit:{fit}:{model or NO_MODEL}"

    def fit_queues(self, fit: str) -> str:
        return f"{self.prefix}:qs:fit:{fit}"

    def fits(self, kind: str) -> str:
        return f"{self.prefix}:fits:{kind}"

    def delayed(self) -> str:
        return f"{self.prefix}:delayed"

    def leases(self) -> str:
        return f"{self.prefix}:leases"

    def tasks(self) -> str:
        return f"{self.prefix}:tasks"

    def tasks_by_status(self, status: str) -> str:
        return f"{self.prefix}:tasks:{status}"

    def expiry(self) -> str:
        return f"{self.prefix}:expiry"

    def deadlines(self) -> str:
        return f"{self.prefix}:deadlines"

    def depth(self) -> str:
        return f"{self.prefix}:depth"

    def inflight(self) -> str:
        return f"{self.prefix}:inflight"

    def seq(self) -> str:
        return f"{self.prefix}:seq"

    def idempotency(self, owner: str | None, key: str) -> str:
        return f"{self.prefix}:idem:{owner or '-'}:{key}"

    def wake(self) -> str:
        """Channel: a task became runnable (payload ``"{kind} {pool} {model}"``)."""
        return f"{self.prefix}:wake"

    def task_channel(self) -> str:
        """Channel: ``"{id} {status}"`` on every task state change."""
        return f"{self.prefix}:task-events"

    def cancel_channel(self) -> str:
        """Channel: ``{id}`` of a running task that was cancelled (tell its lease holder)."""
        return f"{self.prefix}:cancel"
