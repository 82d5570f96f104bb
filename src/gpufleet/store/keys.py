"""Every Redis key and channel gpufleet uses: the prefix and one method per key.

One ``Keys`` per prefix (``[redis] key_prefix``); each store builds it from its ``prefix``
and asks it for names, so the layout lives here and nowhere else. The queue's Lua scripts
build the same names from the prefix (``store/lua/lib.lua``, the ``k_*`` functions);
``tests/integration/test_queue.py::test_key_layout_matches_lua`` checks that both agree, and
``tests/unit/test_store_layout.py`` that every store module asks this one. The string values
are the stored layout: changing one orphans existing data. Nothing here talks to Redis.

Shapes and lifetimes of the task queue (``P`` is the prefix):

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

The rest of the fleet (each store module's docstring says more):

- workers (``store/workers.py``): ``P:workers`` SET of every worker id,
  ``P:pool:{pool}:workers`` SET per pool, ``P:worker:{id}`` HASH (the record),
  ``P:worker:{id}:slots`` ZSET of slot holder tokens by lease deadline.
- the proxy's waiting requests (``store/waiting.py``): ``P:proxy:waiting:{pool}`` ZSET of
  request ids by deadline; ``P:proxy:usage:{key}`` HASH of an API key's proxied usage.
- the leader lock (``store/leader.py``): ``P:leader:{name}`` HASH (holder, epoch; TTL = the
  lease), ``P:leader:{name}:epoch`` STRING fencing counter.
- the reconciler: ``P:scaling:creates`` HASH of create intents (instance name → JSON),
  ``P:scaling:accounted_at`` STRING, the time spend was last billed.
- ``P:events`` STREAM of scale decisions (``store/events.py``), ``P:poolstate:{pool}`` HASH
  and ``P:spend:{YYYY-MM-DD}`` HASH pool → USD (``store/pools.py``),
  ``P:streams:{bucket}`` ZSET of open event streams (``store/streams.py``).
- history (``store/history.py``): ``P:history:{pool}:day:{YYYY-MM-DD}`` HASH,
  ``P:history:{pool}:arrivals:{minute}`` STRING, ``P:history:{pool}:minutes:{YYYY-MM-DD}``
  HASH, ``P:history:{pool}:levels`` HASH.
- API keys (``store/apikeys.py``): ``P:auth:secret``, ``P:apikey:{id}``, ``P:apikeys``,
  ``P:apikeys:by_digest``, ``P:ratelimit:{id}:{window}``, ``P:concurrent:{id}``.
"""

from __future__ import annotations

import time

NO_MODEL = "*"
DAY_S = 86400


def iso_day(day: int) -> str:
    """``YYYY-MM-DD`` of a UTC day number (epoch seconds // 86400)."""
    return time.strftime("%Y-%m-%d", time.gmtime(day * DAY_S))


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

    # -- workers (store/workers.py) ------------------------------------------------------------

    def workers(self) -> str:
        """SET of every worker id."""
        return f"{self.prefix}:workers"

    def pool_workers(self, pool: str) -> str:
        """SET of one pool's worker ids."""
        return f"{self.prefix}:pool:{pool}:workers"

    def worker(self, worker_id: str) -> str:
        """HASH: the worker record."""
        return f"{self.prefix}:worker:{worker_id}"

    def worker_slots(self, worker_id: str) -> str:
        """ZSET: slot holder token -> lease deadline (epoch s)."""
        return f"{self.prefix}:worker:{worker_id}:slots"

    # -- the proxy -----------------------------------------------------------------------------

    def proxy_waiting(self, pool: str) -> str:
        """ZSET of the proxy's requests waiting for a slot of ``pool``, scored by deadline."""
        return f"{self.prefix}:proxy:waiting:{pool}"

    def proxy_usage(self, key_id: str) -> str:
        """HASH of one API key's proxied usage (``<model>|requests`` ...)."""
        return f"{self.prefix}:proxy:usage:{key_id}"

    # -- leadership and the reconciler ---------------------------------------------------------

    def leader(self, name: str) -> str:
        """HASH: the lease lock (``holder``, ``epoch``), expiring with the lease."""
        return f"{self.prefix}:leader:{name}"

    def leader_epoch(self, name: str) -> str:
        """STRING: the lock's fencing counter (only grows)."""
        return f"{self.prefix}:leader:{name}:epoch"

    def create_intents(self) -> str:
        """HASH: instance name -> JSON intent of a create the provider may not list yet."""
        return f"{self.prefix}:scaling:creates"

    def accounted_at(self) -> str:
        """STRING: epoch s of the last spend billing (any leader's)."""
        return f"{self.prefix}:scaling:accounted_at"

    # -- events, pool state, spend, event streams ----------------------------------------------

    def events(self) -> str:
        """STREAM of scale decisions (capped)."""
        return f"{self.prefix}:events"

    def pool_state(self, pool: str) -> str:
        """HASH: a pool's run-time knobs and backoff."""
        return f"{self.prefix}:poolstate:{pool}"

    def spend(self, day: str) -> str:
        """HASH pool -> USD spent on the UTC day ``day`` (``YYYY-MM-DD``)."""
        return f"{self.prefix}:spend:{day}"

    def streams(self, bucket: str) -> str:
        """ZSET of open event-stream tokens of one bucket, by lease deadline (epoch ms)."""
        return f"{self.prefix}:streams:{bucket}"

    # -- history (store/history.py) ------------------------------------------------------------

    def history_day(self, pool: str, day: int) -> str:
        """HASH of one UTC day's histograms (``day`` = ``history.day_of(t)``)."""
        return f"{self.prefix}:history:{pool}:day:{iso_day(day)}"

    def history_arrivals(self, pool: str, minute: int) -> str:
        """STRING counter of one epoch minute's arrivals."""
        return f"{self.prefix}:history:{pool}:arrivals:{minute}"

    def history_minutes(self, pool: str, day: int) -> str:
        """HASH of one UTC day's arrivals per minute of the day (``0`` .. ``1439``)."""
        return f"{self.prefix}:history:{pool}:minutes:{iso_day(day)}"

    def history_levels(self, pool: str) -> str:
        """HASH: ``level`` and ``open:{k}`` of the pool's idle-gap clocks (leader only)."""
        return f"{self.prefix}:history:{pool}:levels"

    # -- API keys (store/apikeys.py) -----------------------------------------------------------

    def auth_secret(self) -> str:
        """STRING: the server secret, when none is configured (made once)."""
        return f"{self.prefix}:auth:secret"

    def apikey(self, key_id: str) -> str:
        """HASH: one API key's record."""
        return f"{self.prefix}:apikey:{key_id}"

    def apikeys(self) -> str:
        """The index of every API key id."""
        return f"{self.prefix}:apikeys"

    def apikeys_by_digest(self) -> str:
        """HASH: key digest -> key id."""
        return f"{self.prefix}:apikeys:by_digest"

    def ratelimit(self, key_id: str, window: int) -> str:
        """Counter of one key's requests in one rate window."""
        return f"{self.prefix}:ratelimit:{key_id}:{window}"

    def concurrent(self, key_id: str) -> str:
        """ZSET of one key's requests in flight."""
        return f"{self.prefix}:concurrent:{key_id}"

    def team_ratelimit(self, team: str, window: int) -> str:
        """Counter of one team's requests (all its keys) in one rate window."""
        return f"{self.prefix}:ratelimit:team:{team}:{window}"

    def team_concurrent(self, team: str) -> str:
        """ZSET of one team's requests in flight (all its keys)."""
        return f"{self.prefix}:concurrent:team:{team}"

    # -- teams and usage (store/teams.py, store/usage.py) --------------------------------------

    def team(self, name: str) -> str:
        """HASH: one team's record (limits, budgets)."""
        return f"{self.prefix}:team:{name}"

    def teams(self) -> str:
        """The index of every team name."""
        return f"{self.prefix}:teams"

    def team_spend(self, name: str, period: str) -> str:
        """Counter of one team's attributed dollars in ``period`` (``d:<day>`` / ``m:<month>``,
        in ``[usage] timezone``)."""
        return f"{self.prefix}:teamspend:{name}:{period}"

    def usage_day(self, day: str) -> str:
        """HASH of one day's usage aggregates (``team|key|pool|model|measure`` -> amount)."""
        return f"{self.prefix}:usage:{day}"
