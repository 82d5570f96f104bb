"""Every Prometheus collector gpufleet exports, and nothing else.

Names follow ``gpufleet_<noun>_<unit>``; counters end in ``_total``; labels are
bounded (pool, provider, engine, status, …) — never a task id or an API key.
The default registry also carries prometheus-client's process and platform
collectors (CPU, memory, open fds, Python version).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    Metric,
    disable_created_metrics,
)
from prometheus_client.registry import Collector

from gpufleet import __version__

# No ``*_created`` gauge beside every counter and histogram series: Prometheus does not need
# them for rate()/histogram_quantile(), they would be a third of the series stored per scrape,
# and rendering them a third of a scrape's time.
disable_created_metrics()  # type: ignore[no-untyped-call]


class DeferredUpdates(Collector):
    """Counter increments and histogram observations the proxy's hot path queues instead
    of making, applied whenever the registry is collected, before any metric is read.

    A proxied answer touches seven series (requests, duration, time to first byte, tokens
    in and out, the route's HTTP count, the team's GPU seconds); through prometheus-client
    each is a label lookup, two checks and a lock (~33 k instructions per answer together,
    ``bench/proxy_overhead.py --icount``), run cold on every request. Queued, each is one
    ``deque.append``; the next collection (a ``/metrics`` scrape, ``get_sample_value``)
    applies the queue in one warm pass, the increments summed per series. Registered
    before every gpufleet metric, so a collection sees every update queued before it:
    readers of the registry cannot tell the difference. ``deque.append`` and ``popleft``
    are atomic, so a collection on another thread (tests) loses nothing. Past
    ``MAX_QUEUED`` updates (about 70 answers) the queue is applied on the spot, between
    scrapes too: the queued tuples die young, before the garbage collector's older
    generations would walk them (a queue of 100,000 made every full collection longer and
    cost more than it saved, ``bench/proxy_overhead.py``).
    """

    MAX_QUEUED = 512

    def __init__(self) -> None:
        self._incs: deque[tuple[Counter, tuple[str, ...], float]] = deque()
        self._observations: deque[tuple[Histogram, tuple[str, ...], float]] = deque()

    def __repr__(self) -> str:
        return f"<DeferredUpdates queued={self.queued}>"

    @property
    def queued(self) -> int:
        return len(self._incs) + len(self._observations)

    def inc(self, metric: Counter, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """``metric.labels(*labels).inc(amount)``, at the next collection."""
        self._incs.append((metric, labels, amount))
        if len(self._incs) > self.MAX_QUEUED:
            self.apply()

    def observe(self, metric: Histogram, labels: tuple[str, ...], value: float) -> None:
        """``metric.labels(*labels).observe(value)``, at the next collection."""
        self._observations.append((metric, labels, value))
        if len(self._observations) > self.MAX_QUEUED:
            self.apply()

    def apply(self) -> None:
        """Make every queued update now (whichever thread asks)."""
        sums: dict[tuple[Counter, tuple[str, ...]], float] = {}
        incs, pop = self._incs, self._incs.popleft
        while incs:
            try:
                metric, labels, amount = pop()
            except IndexError:  # emptied by another thread meanwhile
                break
            series = (metric, labels)
            sums[series] = sums.get(series, 0.0) + amount
        for (metric, labels), total in sums.items():
            labelled(metric, *labels).inc(total)
        observations, take = self._observations, self._observations.popleft
        while observations:
            try:
                histogram, labels, value = take()
            except IndexError:
                break
            labelled(histogram, *labels).observe(value)

    def describe(self) -> Iterable[Metric]:
        return ()  # no series of its own (and no collection when it is registered)

    def collect(self) -> Iterable[Metric]:
        self.apply()
        return ()


# Before any metric below: the registry collects in registration order.
DEFERRED = DeferredUpdates()
REGISTRY.register(DEFERRED)

BUILD_INFO = Info("gpufleet_build", "Version of the running gpufleet.")
BUILD_INFO.info({"version": __version__})

UP = Gauge("gpufleet_up", "1 while this replica's API is serving.")

HTTP_REQUESTS = Counter(
    "gpufleet_http_requests_total",
    "HTTP requests answered by gpufleet's own API, by route template and status class.",
    ["route", "status_class"],
)

# -- tasks and queue -----------------------------------------------------------------------
# Fleet-wide gauges (queue depth, workers, slots, burn rate) are set only by the replica that
# holds the reconciler lock, from the snapshot it already reads each tick, and cleared when it
# loses the lock: `sum()` over replicas then never double counts. Counters and histograms are
# per replica (each counts what it did), so `sum(rate(...))` is the fleet total.

TASKS_SUBMITTED = Counter(
    "gpufleet_tasks_submitted_total", "Tasks accepted (202) by kind.", ["kind"]
)
TASKS_FINISHED = Counter(
    "gpufleet_tasks_finished_total",
    "Tasks that reached a final state, by kind and outcome (succeeded, failed, cancelled).",
    ["kind", "outcome"],
)
TASK_ATTEMPTS_FAILED = Counter(
    "gpufleet_task_attempts_failed_total",
    "Task attempts that failed, by kind and whether they will be retried.",
    ["kind", "retry"],
)
QUEUE_DEPTH = Gauge(
    "gpufleet_queue_depth",
    "Tasks waiting, per pool (leader only). Tasks that name no pool and that several pools "
    "could take are counted under pool=\"<engine>/*\".",
    ["pool"],
)
QUEUE_OLDEST_WAIT = Gauge(
    "gpufleet_queue_oldest_wait_seconds",
    "Age of the oldest waiting task, per pool as in gpufleet_queue_depth (leader only).",
    ["pool"],
)
TASK_QUEUE_WAIT = Histogram(
    "gpufleet_task_queue_wait_seconds",
    "Time from enqueue to start of an attempt.",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800),
)
TASK_RUN = Histogram(
    "gpufleet_task_run_seconds",
    "Time one attempt ran on a worker.",
    ["kind"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)

# -- fleet ---------------------------------------------------------------------------------

WORKERS = Gauge("gpufleet_workers", "Workers per pool and state (leader only).", ["pool", "state"])
SLOTS = Gauge("gpufleet_slots", "Slots per pool, busy or free (leader only).", ["pool", "status"])
SCALE_ACTIONS = Counter(
    "gpufleet_scale_actions_total",
    "Scaling actions applied, by pool, action and outcome (ok, error, refused).",
    ["pool", "action", "outcome"],
)
BOOT_SECONDS = Histogram(
    "gpufleet_boot_seconds",
    "Create/start/resume to ready, per pool (observed by the leader's reconciler; a worker "
    "that went unhealthy and came back is not a boot).",
    ["pool"],
    buckets=(5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900),
)
COLD_STARTS = Counter(
    "gpufleet_cold_starts_total",
    "Work that had to wait for a worker to boot, per pool of the worker it ran on: a proxy "
    "request that found no ready worker and waited for one, or a queued task whose pool had "
    "no ready worker when it was queued (every ready worker of the pool became ready after it).",
    ["pool"],
)
COLD_START_WAIT = Histogram(
    "gpufleet_cold_start_wait_seconds",
    "How long cold-started work waited: proxy request start, or the task's enqueue, to the "
    "moment it got a slot on the worker.",
    ["pool"],
    buckets=(1, 5, 10, 20, 30, 60, 120, 300, 600),
)
ORPHANS = Counter(
    "gpufleet_orphan_instances_total",
    "Provider instances with gpufleet's prefix the registry did not know, and what was done "
    "(adopted, deleted).",
    ["provider", "action"],
)
IS_LEADER = Gauge("gpufleet_is_leader", "1 if this replica runs the reconciler.")

# -- money ---------------------------------------------------------------------------------

SPEND = Counter("gpufleet_spend_dollars_total", "Dollars spent on workers, per pool.", ["pool"])
BURN_RATE = Gauge(
    "gpufleet_burn_rate_dollars_per_hour",
    "What the running workers cost per hour now (leader only).",
    ["pool"],
)
PROVIDER_BALANCE = Gauge(
    "gpufleet_provider_balance_usd",
    "The cloud account's available balance (USD) as last read by the leader (at most once a "
    "minute); absent while unknown (SURF, a failed read).",
    ["provider"],
)
COST_PER_TASK = Gauge(
    "gpufleet_cost_per_succeeded_task_dollars",
    "The pool's spend divided by the queued tasks that succeeded on its workers, both counted "
    "in Redis since the pool's state began (leader only; absent until a task succeeded; proxy "
    "requests are not tasks).",
    ["pool"],
)
# Counted by the replica that finished the work. ``team`` is a configured team's name, or
# "none" for keys in no team (teams are a bounded, configured set: never a free-form label).
TEAM_SPEND = Counter(
    "gpufleet_team_spend_usd",
    "Dollars attributed to a team's work: worker price x slot time / slots.",
    ["team"],
)
TEAM_GPU_SECONDS = Counter(
    "gpufleet_team_gpu_seconds",
    "Seconds a team's work held a worker slot, per pool.",
    ["team", "pool"],
)

# -- providers -----------------------------------------------------------------------------

PROVIDER_CALLS = Counter(
    "gpufleet_provider_calls_total",
    "Cloud API calls by provider, operation and outcome (ok or the error class).",
    ["provider", "operation", "outcome"],
)
PROVIDER_CALL_SECONDS = Histogram(
    "gpufleet_provider_call_seconds",
    "Cloud API call latency.",
    ["provider", "operation"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)

# -- proxy ---------------------------------------------------------------------------------
# `model` is bounded: only models a pool is configured to serve are used as label values;
# anything else is counted as "other".

PROXY_REQUESTS = Counter(
    "gpufleet_proxy_requests_total", "Proxied requests by model and outcome.", ["model", "outcome"]
)
PROXY_TTFB = Histogram(
    "gpufleet_proxy_time_to_first_byte_seconds",
    "Proxy request start to first upstream byte.",
    ["model"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
PROXY_DURATION = Histogram(
    "gpufleet_proxy_request_seconds",
    "Whole proxied request, including any wait for a slot.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
PROXY_TOKENS = Counter(
    "gpufleet_proxy_tokens_total", "Tokens through the proxy (in, out).", ["model", "direction"]
)


def observe_cold_start(pool: str, waited_s: float) -> None:
    """Count one cold start (see ``gpufleet_cold_starts_total``) and its wait."""
    COLD_STARTS.labels(pool).inc()
    COLD_START_WAIT.labels(pool).observe(max(0.0, waited_s))


def is_cold_task_start(queued_at: float, attempt: int, pool_ready_since: float | None) -> bool:
    """A task's first attempt starts cold when no worker of the pool it runs on was ready when
    the task was queued: ``pool_ready_since`` is the earliest ``ready_since`` among the pool's
    ready workers (the one the task runs on included), None if unknown."""
    return attempt <= 1 and pool_ready_since is not None and pool_ready_since > queued_at


@functools.lru_cache(maxsize=4096)
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: the hot path (a proxied request touches
    five or six children) skips prometheus-client's lock and label checks each time. Label
    values must be bounded, as for any label."""
    return metric.labels(*values)
