"""The health checker: probes every live worker's engine and moves it in and out of ``ready``.

``check_once`` (what tests call; the loop runs it every ``health_interval_s``) probes
every worker in ``provisioning``/``booting`` with a base URL, ``ready`` or ``draining``,
all at once, each bounded by ``health_timeout_s``. A worker whose previous probe is still
running (a first-ready model pull can take minutes) is skipped, so probes never pile up.

- **Up**: a probe is ``engine.health(inventory=True)`` — ComfyUI ``/system_stats``,
  Ollama ``/api/version`` plus ``/api/tags`` and ``/api/ps`` — never an inference call.
  Only an answer from the engine itself counts (a cloud gateway's 502 does not), and only
  then does ``provisioning``/``booting`` become ``ready``. Models present/loaded go into
  the worker record on every successful probe (the dispatcher leases Ollama tasks by
  them; the proxy routes by them).
- **First ready of an Ollama worker** (``pull_models_on_ready``): the pool's configured
  models it lacks are pulled before it is marked ready, with progress in the event log.
  A failed pull is recorded and the worker still goes ready: it serves what it has.
- **Down**: ``unhealthy_after`` consecutive failed probes take a ``ready`` worker to
  ``booting``. Of the moves ``domain.py`` allows from ``ready`` (``draining``,
  ``stopping``, ``booting``), ``booting`` says what is true — the machine is there but
  its engine does not answer — and it is the one this checker can undo by itself: the
  next good probe makes it ``ready`` again (a static endpoint that restarts comes back
  without anyone's help). ``draining`` would keep its tasks on a dead worker, and
  ``stopping``/``failed`` are the reconciler's calls (it owns provider actions and
  ``boot_timeout_s``, which also ends a worker stuck in ``booting``). The dispatcher
  sees the worker leave ``ready`` and hands its running tasks back to the queue.
  A ``draining`` worker's failures are counted but it is left to finish or be stopped.

Every state change is one line in the event log (``kind="worker"``).

``register_static_workers`` writes one ``booting`` worker per URL of each static pool at
startup (id = the static provider's instance id ``<pool>-<index>``, the convention every
provider follows), so this checker brings them up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from gpufleet.domain import (
    BOOTING_WORKER_STATES,
    LIVE_WORKER_STATES,
    Engine,
    ProviderKind,
    Worker,
    WorkerState,
)
from gpufleet.engines import EngineClient, Health, WorkerEngines
from gpufleet.errors import EngineError
from gpufleet.routing import normalize_model
from gpufleet.settings import PoolSpec, Settings
from gpufleet.store.events import EventLog
from gpufleet.store.workers import WorkerRegistry

logger = logging.getLogger(__name__)

# check_once waits this much longer than a probe's timeout for its probes to end; a probe
# still running then (a model pull) goes on in the background and is skipped next time.
WAIT_MARGIN_S = 1.0


class HealthChecker:
    """Probes workers' engines; one per process (probes are idempotent across replicas)."""

    def __init__(
        self,
        settings: Settings,
        registry: WorkerRegistry,
        http: httpx.AsyncClient,
        *,
        events: EventLog | None = None,
        engines: Mapping[str, EngineClient] | None = None,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.http = http
        self.events = events
        self.engines: dict[str, EngineClient] = dict(engines or {})
        self._lookup = WorkerEngines(settings, http, self.engines)
        self.on_change = on_change
        self.clock = clock
        self.timeout_s = settings.workers.health_timeout_s
        self._probes: dict[str, asyncio.Task[bool]] = {}

    def __repr__(self) -> str:
        return f"<HealthChecker probing={len(self.probing)}>"

    @property
    def probing(self) -> list[str]:
        """Ids of workers whose probe is running now."""
        return [wid for wid, task in self._probes.items() if not task.done()]

    async def check_once(self) -> dict[str, bool]:
        """Probe every live worker once; worker id → healthy, for probes that ended in time."""
        workers = await self.registry.list_workers()
        started: dict[str, asyncio.Task[bool]] = {}
        for worker in workers:
            if worker.state not in LIVE_WORKER_STATES or not worker.base_url:
                continue
            previous = self._probes.get(worker.id)
            if previous is not None and not previous.done():
                logger.debug("worker %s: previous probe still running; skipped", worker.id)
                continue
            task = asyncio.create_task(self._probe(worker), name=f"probe-{worker.id}")
            self._probes[worker.id] = started[worker.id] = task
        if started:
            await asyncio.wait(started.values(), timeout=self.timeout_s + WAIT_MARGIN_S)
        for wid in [w for w, t in self._probes.items() if t.done()]:
            task = self._probes.pop(wid)
            if not task.cancelled() and task.exception() is not None:
                logger.error("worker %s: probe failed: %r", wid, task.exception())
        return {
            wid: task.result()
            for wid, task in started.items()
            if task.done() and not task.cancelled() and task.exception() is None
        }

    async def aclose(self) -> None:
        """Let running probes end, then cancel what is left (a model pull) at shutdown."""
        tasks = list(self._probes.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.timeout_s + WAIT_MARGIN_S)
            for task in pending:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()

    # -- one worker ----------------------------------------------------------------------

    async def _probe(self, worker: Worker) -> bool:
        engine = self._engine(worker)
        if engine is None:
            return False
        try:
            health = await asyncio.wait_for(
                engine.health(worker.base_url, inventory=True), self.timeout_s
            )
        except TimeoutError:
            health = Health(ok=False, detail=f"no answer within {self.timeout_s:g} s")
        except EngineError as exc:  # the inventory call failed after /version answered
            health = Health(ok=False, detail=str(exc))
        if health.ok:
            await self._healthy(worker, engine, health)
        else:
            await self._unhealthy(worker, health)
        return health.ok

    async def _healthy(self, worker: Worker, engine: EngineClient, health: Health) -> None:
        await self.registry.update(
            worker.id,
            models_present=health.models_present,
            models_loaded=health.models_loaded,
            health_failures=0,
        )
        if worker.state not in BOOTING_WORKER_STATES:
            return
        pool = self._lookup.pool(worker)
        first_ready = worker.ready_since is None
        if (
            first_ready
            and pool is not None
            and pool.engine is Engine.ollama
            and self.settings.workers.pull_models_on_ready
        ):
            await self._pull_missing(worker, engine, pool, health)
        reason = f"engine answered ({health.version or 'ok'})"
        if await self.registry.transition(worker.id, WorkerState.ready, reason):
            # gpufleet_boot_seconds is observed by the reconciler, which knows when a boot began.
            await self._emit(worker, WorkerState.ready, reason)

    async def _pull_missing(
        self, worker: Worker, engine: EngineClient, pool: PoolSpec, health: Health
    ) -> None:
        present = {normalize_model(m) for m in health.models_present}
        missing = [m for m in pool.models if normalize_model(m) not in present]
        for model in missing:

            async def progress(event: dict[str, Any], model: str = model) -> None:
                await self._emit_raw(worker, "pull", model=model, status=event.get("status"),
                                     completed=event.get("completed"), total=event.get("total"))

            try:
                await engine.pull(worker.base_url, model, on_event=progress)
            except EngineError as exc:
                logger.warning("worker %s: pull of %s failed: %s", worker.id, model, exc)
                await self._emit_raw(worker, "pull", model=model, status="failed",
                                     error=str(exc))
        if missing:
            try:
                inventory = await engine.inventory(worker.base_url)
            except EngineError as exc:
                logger.warning("worker %s: inventory after pull failed: %s", worker.id, exc)
            else:
                await self.registry.update(worker.id, models_present=inventory.models_present,
                                           models_loaded=inventory.models_loaded)

    async def _unhealthy(self, worker: Worker, health: Health) -> None:
        failures = await self.registry.record_health(worker.id, ok=False)
        logger.info("worker %s: health probe failed (%d in a row): %s",
                    worker.id, failures, health.detail)
        limit = self.settings.workers.unhealthy_after
        if worker.state is not WorkerState.ready or failures < limit:
            return
        reason = f"{failures} failed health probes: {health.detail[:200]}"
        if await self.registry.transition(worker.id, WorkerState.booting, reason):
            await self._emit(worker, WorkerState.booting, reason)

    async def _emit(self, worker: Worker, state: WorkerState, reason: str) -> None:
        await self._emit_raw(worker, "worker", state=state.value, reason=reason,
                             previous=worker.state.value)
        if self.on_change is not None:
            self.on_change()

    async def _emit_raw(self, worker: Worker, what: str, **fields: Any) -> None:
        if self.events is None:
            return
        try:
            await self.events.emit(what, worker=worker.id, pool=worker.pool, **fields)
        except Exception as exc:  # an event is a record, never a reason to fail a probe
            logger.warning("worker %s: event not recorded (%s)", worker.id, exc)

    # -- engines and pools ---------------------------------------------------------------

    def _engine(self, worker: Worker) -> EngineClient | None:
        engine = self._lookup.client(worker)
        if engine is None:
            logger.warning("worker %s: no engine known for pool %r", worker.id, worker.pool)
        return engine


async def register_static_workers(
    settings: Settings, registry: WorkerRegistry, events: EventLog | None = None
) -> list[Worker]:
    """One ``booting`` worker per URL of each static pool; idempotent across restarts.

    A worker already known keeps its state (the health checker decides it); its URL,
    slots and price follow the configuration.
    """
    workers: list[Worker] = []
    for pool in settings.pools:
        if pool.provider is not ProviderKind.static:
            continue
        for index, url in enumerate(pool.urls):
            worker_id = f"{pool.name}-{index}"
            fields: dict[str, Any] = {
                "base_url": url.rstrip("/"),
                "engine": pool.engine.value,
                "price_per_hour": pool.price_per_hour or 0.0,
                "slots": pool.slots,
            }
            known = await registry.find(worker_id)
            if known is not None:
                await registry.update(worker_id, **fields)
                workers.append(await registry.get(worker_id))
                continue
            worker = await registry.register(
                pool=pool.name,
                provider=ProviderKind.static.value,
                state=WorkerState.booting,
                worker_id=worker_id,
                instance_id=worker_id,
                instance_name=worker_id,
                **fields,
            )
            workers.append(worker)
            if events is not None:
                await events.emit("worker", worker=worker_id, pool=pool.name,
                                  state=WorkerState.booting.value, reason="static endpoint")
    return workers
