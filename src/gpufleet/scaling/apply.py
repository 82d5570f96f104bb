"""Apply: carry out the actions ``policy.plan`` returned, in order, each safe to repeat.

One method per action kind: ``_create`` (an intent is written first, so an instance whose
answer was lost is recognised by ``observe``), ``_adopt``, ``_delete`` / ``_delete_stray`` (a
delete of a gone instance is done), ``_mark_failed``, ``_drain``, ``_park`` (``Stop`` /
``Pause``) and ``_revive`` (``Start`` / ``Resume``). ``Stop``/``Pause``/``Delete`` re-check the
worker's busy slots right before the provider call.

Fencing: ``Fence`` is the one check that this replica still holds the reconciler lock. Every
mutation (provider call or registry write) is preceded by it, as late as possible (after the
read-only re-checks, right before the call), and ``apply`` is the one place that catches
``Fenced``: from then on every later action of the tick is refused, not attempted.

Before an action reaches a provider, ``_gate`` holds back what must not happen this tick
(static pools, a provider that is down, a pool backed off during this apply). A provider error
backs off the pool (capacity, quota) or the provider (rate limit, outage, auth). Every action
ends in one ``Outcome``, recorded by ``outcomes.Recorder``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import redis.asyncio as aioredis
import tenacity
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpufleet import errors
from gpufleet.domain import BOOTING_WORKER_STATES, ProviderKind, Worker
from gpufleet.domain import WorkerState as WS
from gpufleet.metrics import ORPHANS
from gpufleet.providers.base import Capability, Instance, InstanceState, Provider
from gpufleet.scaling import policy
from gpufleet.scaling.accounting import Accountant
from gpufleet.scaling.actions import (
    Action,
    Adopt,
    Create,
    Delete,
    Drain,
    Hold,
    MarkFailed,
    Pause,
    Resume,
    Start,
    Stop,
)
from gpufleet.scaling.observe import (
    PROVIDER_BACKOFF_BASE_S,
    PROVIDER_BACKOFF_MAX_S,
    Observed,
    ProviderBackoff,
    register,
)
from gpufleet.scaling.outcomes import Outcome, Recorder, action_name, why
from gpufleet.scaling.snapshot import Snapshot
from gpufleet.settings import PoolSpec
from gpufleet.store.leader import LeaderLock
from gpufleet.store.pools import PoolStateStore
from gpufleet.store.workers import WorkerRegistry

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The registry state an adopted instance starts in, from what its provider reports.
_ADOPT_STATES = {
    InstanceState.pending: WS.provisioning,
    InstanceState.booting: WS.provisioning,
    InstanceState.running: WS.booting,
    InstanceState.stopping: WS.stopping,
    InstanceState.stopped: WS.stopped,
    InstanceState.paused: WS.paused,
}


class Fenced(Exception):
    """This replica no longer holds the reconciler lock: the action must not happen."""


class Fence:
    """``await fence()`` raises ``Fenced`` unless this replica still holds the lock."""

    def __init__(self, lock: LeaderLock) -> None:
        self.lock = lock

    def __repr__(self) -> str:
        return f"<Fence replica={self.lock.replica_id} token={self.lock.token}>"

    async def __call__(self) -> None:
        if not await self.lock.check():
            raise Fenced(f"replica {self.lock.replica_id} no longer holds the reconciler lock")


class Applier:
    """Applies one tick's actions; see the module docstring."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        registry: WorkerRegistry,
        providers: Mapping[str, Provider],
        pool_state: PoolStateStore,
        accountant: Accountant,
        backoff: ProviderBackoff,
        recorder: Recorder,
        fence: Fence,
        intents_key: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.registry = registry
        self.providers = providers
        self.pool_state = pool_state
        self.accountant = accountant
        self.backoff = backoff
        self.recorder = recorder
        self.fence = fence
        self.intents_key = intents_key
        self.clock = clock

    def __repr__(self) -> str:
        return f"<Applier providers={sorted(self.providers)}>"

    async def apply(
        self, actions: list[Action], snapshot: Snapshot, seen: Observed
    ) -> list[Outcome]:
        """Apply ``actions`` in order; each gets an outcome, an event, a metric and a log line."""
        outcomes: list[Outcome] = []
        fenced = False
        for action in actions:
            spec = seen.specs.get(action.pool)
            gated = self._gate(action, spec, seen)
            if fenced:
                result = Outcome(action, "refused", "not the leader any more")
            elif gated is not None:
                result = gated
            else:
                try:
                    if spec is None:
                        assert isinstance(action, Delete)
                        result = await self._delete_stray(action, seen)
                    else:
                        result = await self._apply_one(action, spec, seen)
                except Fenced as exc:
                    fenced = True
                    result = Outcome(action, "refused", str(exc))
                except errors.ProviderError as exc:
                    result = Outcome(action, "error", why(exc))
                    if spec is not None:
                        await self._after_error(action, spec, exc, seen)
                except Exception as exc:
                    logger.exception("reconciler: %s failed", action_name(action))
                    result = Outcome(action, "error", why(exc))
            outcomes.append(result)
            if result.outcome == "ok" and isinstance(action, Create | Start | Resume):
                # ready before the next tick or not, its boot is timed from now
                source = "create" if isinstance(action, Create) else "revive"
                self.accountant.note_started(result.worker_id, source)
            await self.recorder.record(result)
        return outcomes

    def _gate(self, action: Action, spec: PoolSpec | None, seen: Observed) -> Outcome | None:
        """The outcome of an action that must not reach a provider this tick, else None."""
        if isinstance(action, Hold):
            return Outcome(action, "hold", action.code)
        if spec is None:
            if isinstance(action, Delete) and not action.worker_id:
                return None  # an orphan of a pool no longer configured
            return Outcome(action, "skipped", "no such pool")
        if spec.provider is ProviderKind.static:
            return Outcome(action, "skipped", "static pools are managed by the health checker")
        if spec.provider.value in seen.down and not isinstance(action, Drain | MarkFailed):
            return Outcome(action, "deferred", f"{spec.provider.value} is not answering")
        if isinstance(action, Create | Start | Resume) and action.pool in seen.backed_off:
            return Outcome(action, "hold", "backoff: the pool was backed off this tick")
        return None

    async def _after_error(
        self, action: Action, spec: PoolSpec, exc: errors.ProviderError, seen: Observed
    ) -> None:
        if isinstance(exc, errors.InsufficientCapacity | errors.QuotaOrBalance) and isinstance(
            action, Create | Start | Resume
        ):
            await self.pool_state.back_off(
                spec.name, why(exc), base_s=policy.BACKOFF_BASE_S, cap_s=policy.BACKOFF_MAX_S
            )
            seen.backed_off.add(spec.name)
        elif isinstance(exc, errors.RateLimited | errors.ProviderUnavailable | errors.AuthFailed):
            kind = spec.provider.value
            failures, _ = self.backoff.state(kind)
            delay = policy.backoff_delay_s(
                failures + 1, PROVIDER_BACKOFF_BASE_S, PROVIDER_BACKOFF_MAX_S
            )
            if isinstance(exc, errors.RateLimited) and exc.retry_after:
                delay = max(delay, min(exc.retry_after, PROVIDER_BACKOFF_MAX_S))
            self.backoff.failed(kind, failures + 1, self.clock() + delay)
            seen.down.add(kind)

    async def _apply_one(self, action: Action, spec: PoolSpec, seen: Observed) -> Outcome:
        provider = self.providers.get(spec.provider.value)
        if provider is None:
            return Outcome(action, "error", f"no {spec.provider.value} provider configured")
        if isinstance(action, Create):
            return await self._create(action, spec, provider)
        if isinstance(action, Adopt):
            return await self._adopt(action, spec, seen)
        if isinstance(action, Delete):
            return await self._delete(action, spec, provider, seen)
        if isinstance(action, Hold):
            return Outcome(action, "hold", action.code)
        worker = seen.workers.get(action.worker_id)
        if worker is None:
            return Outcome(action, "skipped", "worker is not in the registry", action.worker_id)
        if isinstance(action, MarkFailed):
            outcome = await self._mark_failed(action, spec, worker)
            if outcome.outcome == "ok":
                seen.backed_off.add(spec.name)
            return outcome
        if isinstance(action, Drain):
            return await self._drain(action, worker)
        if isinstance(action, Stop | Pause):
            return await self._park(action, provider, worker)
        return await self._revive(action, provider, worker)

    async def _drain(self, action: Drain, worker: Worker) -> Outcome:
        await self.fence()
        if await self.registry.transition(worker.id, WS.draining, action.reason):
            return Outcome(action, "ok", "", worker.id, worker.instance_id)
        return Outcome(action, "skipped", "not ready any more", worker.id, worker.instance_id)

    async def _mark_failed(self, action: MarkFailed, spec: PoolSpec, worker: Worker) -> Outcome:
        await self.fence()
        if not await self.registry.transition(worker.id, WS.failed, action.reason):
            return Outcome(action, "skipped", "state changed meanwhile", worker.id)
        until = await self.pool_state.back_off(
            spec.name, action.reason, base_s=policy.BACKOFF_BASE_S, cap_s=policy.BACKOFF_MAX_S
        )
        detail = f"pool backed off until {until:.0f}"
        return Outcome(action, "ok", detail, worker.id, worker.instance_id)

    async def _park(self, action: Stop | Pause, provider: Provider, worker: Worker) -> Outcome:
        """Stop / pause an idle worker; a lease that landed since observe cancels it."""
        instance_id = worker.instance_id or worker.id
        busy = await self.registry.busy(worker.id)
        if busy:
            return Outcome(action, "skipped", f"{busy} slots busy", worker.id, instance_id)
        await self.fence()
        if isinstance(action, Stop):
            await provider.stop(instance_id)
        else:
            await provider.pause(instance_id)
        await _redis_retry(lambda: self.registry.transition(worker.id, WS.stopping, action.reason))
        return Outcome(action, "ok", "", worker.id, instance_id)

    async def _revive(self, action: Start | Resume, provider: Provider, worker: Worker) -> Outcome:
        instance_id = worker.instance_id or worker.id
        await self.fence()
        if isinstance(action, Start):
            await provider.start(instance_id)
        else:
            await provider.resume(instance_id)
        await _redis_retry(lambda: self.registry.transition(worker.id, WS.booting, action.reason))
        return Outcome(action, "ok", "", worker.id, instance_id)

    async def _create(self, action: Create, spec: PoolSpec, provider: Provider) -> Outcome:
        name = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        intent = json.dumps({"pool": spec.name, "at": self.clock()})
        await self.fence()
        await self.redis.hset(self.intents_key, name, intent)
        try:
            inst = await provider.create(spec, name)
        except errors.ProviderError:
            if await provider_lost_answer(provider, name) is None:
                await self.redis.hdel(self.intents_key, name)
            raise
        worker = await _redis_retry(lambda: register(self.registry, spec, inst, WS.provisioning))
        await _redis_retry(lambda: self.redis.hdel(self.intents_key, name))
        return Outcome(action, "ok", f"created {inst.name}", worker.id, inst.id)

    async def _adopt(self, action: Adopt, spec: PoolSpec, seen: Observed) -> Outcome:
        inst = seen.instances.get((spec.provider.value, action.instance_id))
        if inst is None:
            return Outcome(action, "skipped", "instance not listed", "", action.instance_id)
        if inst.state is InstanceState.failed:
            return Outcome(action, "skipped", f"instance failed: {inst.last_error}", "", inst.id)
        if await self.registry.find(inst.id) is not None:
            return Outcome(action, "skipped", "already registered", inst.id, inst.id)
        await self.fence()
        state = _ADOPT_STATES.get(inst.state, WS.provisioning)
        worker = await register(self.registry, spec, inst, state)
        seen.workers[worker.id] = worker
        ORPHANS.labels(spec.provider.value, "adopted").inc()
        return Outcome(action, "ok", f"registered as {worker.state.value}", worker.id, inst.id)

    async def _delete(
        self, action: Delete, spec: PoolSpec, provider: Provider, seen: Observed
    ) -> Outcome:
        worker = seen.workers.get(action.worker_id) if action.worker_id else None
        instance_id = action.instance_id or (worker.instance_id if worker else "")
        if worker is not None and worker.state not in (WS.failed, *BOOTING_WORKER_STATES):
            busy = await self.registry.busy(worker.id)
            if busy:
                return Outcome(action, "skipped", f"{busy} slots busy", worker.id, instance_id)
        await self.fence()
        detail = ""
        if instance_id:
            if Capability.delete in provider.capabilities:
                await provider.delete(instance_id)
                detail = "instance deleted"
            elif Capability.pause in provider.capabilities:
                inst = seen.instances.get((spec.provider.value, instance_id))
                if inst is not None and inst.state in (InstanceState.running,):
                    with contextlib.suppress(errors.InvalidState, errors.NotFound):
                        await provider.pause(instance_id)
                    detail = "workspace paused (it cannot be deleted)"
        if worker is not None:
            await _redis_retry(lambda: self.registry.remove(worker.id))
            seen.workers.pop(worker.id, None)
        else:
            ORPHANS.labels(spec.provider.value, "deleted").inc()
        return Outcome(action, "ok", detail, action.worker_id, instance_id)

    async def _delete_stray(self, action: Delete, seen: Observed) -> Outcome:
        """An instance with our prefix that names no configured pool (a pool since removed)."""
        kind = next((k for (k, i) in seen.instances if i == action.instance_id), "")
        provider = self.providers.get(kind)
        if provider is None or kind in seen.down:
            return Outcome(action, "deferred", f"{kind or 'its provider'} is not answering")
        if Capability.delete not in provider.capabilities:
            return Outcome(action, "skipped", f"{kind} instances are never deleted")
        await self.fence()
        await provider.delete(action.instance_id)
        ORPHANS.labels(kind, "deleted").inc()
        return Outcome(action, "ok", "instance deleted", "", action.instance_id)


async def provider_lost_answer(provider: Provider, name: str) -> Instance | None:
    """After a failed create: did the cloud make the instance anyway? (None if unsure.)"""
    try:
        return await provider.find_by_name(name)
    except Exception:
        return None


async def _redis_retry(call: Callable[[], Awaitable[T]]) -> T:
    """Ride out a Redis blip (connection reset, timeout) with three quick attempts.

    Used for the registry writes that follow a provider call (each is a CAS or an overwrite,
    safe to repeat), never around the provider call itself: a create must not be sent twice
    because the bookkeeping after it failed. Provider errors are not retried here; the
    provider clients already retry transient ones.
    """
    async for attempt in tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential(multiplier=0.1, max=1.0),
        retry=tenacity.retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity re-raises the last error")
