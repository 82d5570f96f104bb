"""How long does one scaling decision take at fleet scale? One process, no I/O; then one
whole reconcile tick with I/O.

    python bench/reconcile_scale.py [--repeat 20] [--tick] [--instances 500] [--queued 20000]

``policy.plan`` over 2,000 workers in 20 pools (Novita and SURF, mixed states: booting, ready
busy and idle, draining, stopped, paused, failed), 100,000 queued tasks in 40 demand groups
each servable by 3 pools, and 100 provider instances of which a few are orphans. The number to
compare it with is the reconcile interval (``scaling.interval_s``, 5 s): the ratio printed is
the share of one tick the decision uses. It asserts nothing.

First run (2 shared cores):

    workers=2000 pools=20 queued=100000 actions=1639: median 8.8 ms, p90 9.1 ms
    (0.18% of a 5 s tick)

With the learned policy (issue 15; 2 cores shared with other jobs, so the p90 is noisy), the
same snapshot, then every pool on ``idle_timeout_s = "auto"`` with a week of history (3,000
service samples, 16 levels of idle gaps, a busy arrival rate: work-aware scale-up predicts up
to 400 waits per demand group, ski rental per level):

    fixed idle timeouts, no history: median 7.3 ms, p90 16.1 ms
    auto + a week of history, memoised: median 39.2 ms, p90 64.7 ms (0.78% of a 5 s tick)
    auto + a week of history, caches cleared each run: median 47.0 ms, p90 72.4 ms

``--tick`` times ``Reconciler.reconcile_once`` end to end: a real ``redis-server`` (the
embedded one), the real Novita client listing 500 running instances (5 pages) from the
simulated Novita cloud over ``httpx.ASGITransport``, 500 registered ready workers in 5 pools
at ``max_workers`` (so the tick decides Holds, the steady state of a saturated fleet), and
``--queued`` waiting tasks read through ``TaskQueue.stats()`` (counters: the tick's cost does
not grow with the number of tasks). Reported: median and p90 of the whole tick and its
observe / plan / apply parts. See the numbers recorded in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace

from gpufleet.domain import Engine, ProviderKind, WorkerState
from gpufleet.scaling import history as hist
from gpufleet.scaling import keepalive
from gpufleet.scaling.policy import plan
from gpufleet.scaling.snapshot import Demand, InstanceView, PoolView, Snapshot, WorkerView

NOW = 1_700_000_000.0
STATES = [
    (WorkerState.ready, 10),
    (WorkerState.booting, 2),
    (WorkerState.provisioning, 1),
    (WorkerState.draining, 1),
    (WorkerState.stopped, 3),
    (WorkerState.paused, 2),
    (WorkerState.failed, 1),
]


def build(n_workers: int = 2000, n_pools: int = 20, queued: int = 100_000) -> Snapshot:
    rng = random.Random(0)
    pools = tuple(
        PoolView(
            f"pool{i:02d}",
            ProviderKind.surf if i % 4 == 3 else ProviderKind.novita,
            Engine.ollama if i % 2 else Engine.comfyui,
            slots=1 + i % 4,
            max_workers=n_workers // n_pools + 20,
            price_per_hour=0.3 + 0.1 * (i % 7),
            parked_cost_per_hour=0.005,
        )
        for i in range(n_pools)
    )
    states, weights = zip(*STATES, strict=True)
    workers = []
    for i in range(n_workers):
        pool = pools[i % n_pools]
        state = rng.choices(states, weights)[0]
        ready = state in (WorkerState.ready, WorkerState.draining)
        workers.append(
            WorkerView(
                f"w{i:05d}",
                pool.name,
                state,
                pool.slots,
                busy_slots=rng.randint(0, pool.slots) if ready else 0,
                instance_id=f"i-{i:05d}",
                state_since=NOW - rng.uniform(0, 50_000),
                boot_started_at=NOW - rng.uniform(0, 900),
                ready_since=NOW - 5000 if ready else None,
                last_busy_at=NOW - rng.uniform(0, 2000) if ready else None,
            )
        )
    groups = 40
    demand = tuple(
        Demand(
            f"g{g}",
            tuple(pools[(g + k) % n_pools].name for k in (0, 2, 4)),
            queued=queued // groups,
            in_flight=rng.randint(0, 50),
        )
        for g in range(groups)
    )
    instances = tuple(
        InstanceView(
            f"i-{i:05d}" if i < 95 else f"orphan-{i}",
            ProviderKind.novita,
            pool=pools[i % n_pools].name,
            healthy=i % 2 == 0,
        )
        for i in range(100)
    )
    return Snapshot(NOW, pools, tuple(workers), demand, instances, frozenset({ProviderKind.novita}))


async def bench_tick(n_instances: int, queued: int, repeat: int) -> None:
    """One full reconcile tick against the simulated Novita cloud (see the module docstring)."""
    import tempfile
    from pathlib import Path

    import httpx
    import redis.asyncio as aioredis

    from gpufleet.domain import WorkerState
    from gpufleet.loopback import free_port
    from gpufleet.providers.base import RetryPolicy
    from gpufleet.providers.novita import NovitaProvider
    from gpufleet.providers.simulated import (
        FakeClock,
        SimNovitaConfig,
        SimProduct,
        create_novita_app,
    )
    from gpufleet.scaling.reconciler import Reconciler
    from gpufleet.settings import load_settings
    from gpufleet.store.connection import EmbeddedRedis
    from gpufleet.store.events import EventLog
    from gpufleet.store.leader import LeaderLock
    from gpufleet.store.pools import PoolStateStore
    from gpufleet.store.queue import TaskQueue
    from gpufleet.store.workers import WorkerRegistry
    from gpufleet.tasks import TaskSubmit

    n_pools = 5
    per_pool = n_instances // n_pools
    pools = [
        {"name": f"pool{i}", "provider": "novita", "engine": "comfyui", "product_id": "4090.sim",
         "image": "example/comfyui", "max_workers": per_pool, "price_per_hour": 0.67}
        for i in range(n_pools)
    ]
    settings = load_settings(
        env_file=None, redis={"url": "redis://unused", "key_prefix": "bench"},
        providers={"novita": {"api_key": "sim-novita-key", "base_url": "http://novita.sim"}},
        pools=pools,
    )
    clock = FakeClock()
    product = SimProduct("4090.sim", "RTX 4090 24GB", 0.67, capacity_gpus=10 * n_instances)
    app = create_novita_app(SimNovitaConfig(products=[product], create_s=1, pull_s=1), clock=clock)
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp), port=free_port(), appendfsync="everysec")
        server.start()
        redis = aioredis.Redis.from_url(server.url, decode_responses=True)
        provider = NovitaProvider(settings.providers.novita, pools=settings.pools,
                                  transport=httpx.ASGITransport(app=app),
                                  retry=RetryPolicy(sleep=clock.sleep))
        queue = TaskQueue(redis, settings.queue, key_prefix="bench", clock=clock)
        try:
            registry = WorkerRegistry(redis, prefix="bench", clock=clock)
            for i in range(n_instances):
                spec = settings.pools[i % n_pools]
                inst = await provider.create(spec, f"{spec.name}-{i:05d}")
                await registry.register(pool=spec.name, provider="novita", slots=1,
                                        state=WorkerState.ready, worker_id=inst.id,
                                        instance_id=inst.id, instance_name=inst.name,
                                        price_per_hour=0.67)
            clock.advance(5)
            graph = {"1": {"class_type": "KSampler", "inputs": {}}}
            for i in range(queued):
                await queue.enqueue(TaskSubmit(payload=graph, pool=f"pool{i % n_pools}"))
            reconciler = Reconciler(
                settings, redis, registry=registry, events=EventLog(redis, prefix="bench"),
                providers={"novita": provider}, queue=queue,
                pool_state=PoolStateStore(redis, prefix="bench", clock=clock),
                lock=LeaderLock(redis, prefix="bench", ttl_s=600), clock=clock,
            )
            await reconciler.reconcile_once()  # warm-up: first sync of every record
            rows = []
            for _ in range(repeat):
                clock.advance(1)
                started = time.perf_counter()
                report = await reconciler.reconcile_once()
                total = (time.perf_counter() - started) * 1000.0
                rows.append((total, report.observe_ms, report.plan_ms, report.apply_ms))
            snap = report.snapshot
            assert snap is not None
            median = [statistics.median(col) for col in zip(*rows, strict=True)]
            p90 = sorted(r[0] for r in rows)[int(0.9 * (len(rows) - 1))]
            print(
                f"tick: instances={len(snap.instances)} workers={len(snap.workers)} "
                f"queued={sum(d.queued for d in snap.demand)} actions={len(report.outcomes)}: "
                f"median {median[0]:.1f} ms (observe {median[1]:.1f}, plan {median[2]:.1f}, "
                f"apply {median[3]:.1f}), p90 {p90:.1f} ms "
                f"({median[0] / 5000 * 100:.1f}% of a 5 s tick)"
            )
            await reconciler.release()
        finally:
            await queue.aclose()
            await provider.aclose()
            await redis.aclose()
            server.stop()


def with_history(snap: Snapshot) -> Snapshot:
    """The same snapshot with every pool on idle_timeout_s = "auto" and a week of history:
    service and boot samples, 16 levels of idle gaps, a busy arrival rate."""
    rng = random.Random(1)
    book = hist.HistoryBook()
    for p in snap.pools:
        for i in range(3000):
            t = NOW - rng.uniform(0, 6 * 86400)
            book.service(p.name, t, rng.lognormvariate(3.0, 0.8))
            if i % 20 == 0:
                book.boot(p.name, t, "create" if i % 40 else "revive", rng.uniform(45, 300))
        level = 0
        for step in range(4000):
            level = max(0, min(24, level + rng.choice((-2, -1, 1, 2))))
            book.demand(p.name, NOW - 6 * 86400 + step * 120.0, level * p.slots, p.slots)
        for _ in range(200):
            book.arrival(p.name, NOW - rng.uniform(0, 600))
    pools = tuple(replace(p, idle_timeout_auto=True, idle_timeout_s=3600.0) for p in snap.pools)
    history = {p.name: book.summary(p.name, NOW) for p in pools}
    return replace(snap, pools=pools, history=history)


def clear_policy_caches() -> None:
    """Forget memoised ski rentals, so each run pays for learning from fresh histograms."""
    for fn in (keepalive._ski_rental, keepalive._learned_keep_alive, keepalive._gaps_for,
               keepalive._learned_park, hist.merged_levels):
        fn.cache_clear()


def time_plan(snap: Snapshot, repeat: int, cold: bool) -> tuple[float, float, int]:
    actions = plan(snap)
    timings = []
    for _ in range(repeat):
        if cold:
            clear_policy_caches()
        started = time.perf_counter()
        plan(snap)
        timings.append((time.perf_counter() - started) * 1000.0)
    p90 = sorted(timings)[int(0.9 * (len(timings) - 1))]
    return statistics.median(timings), p90, len(actions)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tick", action="store_true", help="also time one full reconcile tick")
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--queued", type=int, default=20_000)
    args = parser.parse_args()
    snap = build()
    rows = [
        ("fixed idle timeouts, no history", snap, False),
        ("auto + a week of history, memoised", with_history(snap), False),
        ("auto + a week of history, caches cleared each run", with_history(snap), True),
    ]
    for label, s, cold in rows:
        median, p90, n_actions = time_plan(s, args.repeat, cold)
        print(
            f"{label}: workers={len(s.workers)} pools={len(s.pools)} "
            f"queued={sum(d.queued for d in s.demand)} actions={n_actions}: "
            f"median {median:.1f} ms, p90 {p90:.1f} ms ({median / 5000 * 100:.2f}% of a 5 s tick)"
        )
    if args.tick:
        import asyncio

        asyncio.run(bench_tick(args.instances, args.queued, min(args.repeat, 10)))


if __name__ == "__main__":
    main()
