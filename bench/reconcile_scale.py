"""How long does one scaling decision take at fleet scale? One process, no I/O.

    python bench/reconcile_scale.py [--repeat 20]

``policy.plan`` over 2,000 workers in 20 pools (Novita and SURF, mixed states: booting, ready
busy and idle, draining, stopped, paused, failed), 100,000 queued tasks in 40 demand groups
each servable by 3 pools, and 100 provider instances of which a few are orphans. The number to
compare it with is the reconcile interval (``scaling.interval_s``, 5 s): the ratio printed is
the share of one tick the decision uses. It asserts nothing.

First run (2 shared cores):

    workers=2000 pools=20 queued=100000 actions=1639: median 8.8 ms, p90 9.1 ms
    (0.18% of a 5 s tick)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from gpufleet.domain import Engine, ProviderKind, WorkerState
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    snap = build()
    actions = plan(snap)
    timings = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        plan(snap)
        timings.append((time.perf_counter() - started) * 1000.0)
    median = statistics.median(timings)
    p90 = sorted(timings)[int(0.9 * (len(timings) - 1))]
    print(
        f"workers={len(snap.workers)} pools={len(snap.pools)} "
        f"queued={sum(d.queued for d in snap.demand)} actions={len(actions)}: "
        f"median {median:.1f} ms, p90 {p90:.1f} ms ({median / 5000 * 100:.2f}% of a 5 s tick)"
    )


if __name__ == "__main__":
    main()
