"""What does ``gpufleet serve`` cost while nobody calls it? CPU and wakeups of the idle
process tree (python + its embedded redis-server), side by side with another checkout.

    python bench/idle_cpu.py [--seconds 20] [--reps 3] [--before CHECKOUT]

The server runs as deployed, the same as ``bench/proxy_overhead.py``'s main row (its
defaults: auth on, metrics on, embedded redis-server with ``appendfsync always``, every
background loop) with one static Ollama pool in front of that bench's fast simulated
backend, which its health probes call. Everything is pinned to core 0, the backend to core
1. Once the server answers a chat, the first measurement waits ``--settle`` seconds; then
for ``--seconds`` it reads ``/proc/<pid>/task/<tid>/schedstat`` of every thread of the tree:
the nanoseconds each ran (exact, not the tick-sampled utime) and how many times each was put
on the CPU (its wakeups). Repetitions of this checkout and ``--before`` interleave;
medians. Prints a table; asserts nothing.

Why it matters: an idle control plane should cost next to nothing, and a wakeup is what
it pays for. On this shared
2-core cloud VM a wakeup of an idle Python process costs about 1 ms of CPU (cold caches),
whatever little it then does, so the count of wakeups, not the work per tick, is what to
cut.

One run, 2026-12-05, ``--seconds 15 --reps 3 --before`` e8918a0 (medians):

| checkout | process | % of a core | wakeups/s | ms CPU per wakeup |
|---|---|---|---|---|
| before | python | 3.29 | 22.6 | 1.45 |
| before | redis-server | 0.57 | 17.8 | 0.32 |
| before | tree | 3.86 | | |
| after | python | 1.07 | 6.4 | 1.66 |
| after | redis-server | 0.13 | 6.6 | 0.20 |
| after | tree | 1.19 (0.31x) | | |

Under steady traffic this changes little: ``proxy_overhead.py --quick --before`` the same
day gave 1.66 (before) and 1.62 ms (after) of tree CPU per request at 100 req/s, because
the process is awake for the requests anyway and the ticks ride along.

Before: python about 25 wakeups/s and 3.9-4.1 % of a core, redis-server
18-19 wakeups/s and 0.8-1.1 %. The wakeups were uvicorn's 10/s housekeeping tick, two
pub/sub subscriptions polling for shutdown twice a second each, redis-server's 10/s
``hz`` timer, and six background loops each on its own timer (dispatch every 1 s, the
history flush every 1 s, four more every 5 s) with the Redis round trips of each.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_overhead import (  # the sibling bench script, by path
    DEPLOYED_CONF,
    clean_env,
    create_key,
    free_port,
    process,
    tree,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent


def schedstat(pid: int) -> dict[str, tuple[int, int]]:
    """Per command name: (ns on CPU, times put on the CPU), summed over the threads."""
    found: dict[str, tuple[int, int]] = {}
    for p in tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            comm = Path(f"/proc/{p}/comm").read_text().strip()
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    fields = (task / "schedstat").read_text().split()
                    ran, slices = int(fields[0]), int(fields[2])
                    old = found.get(comm, (0, 0))
                    found[comm] = (old[0] + ran, old[1] + slices)
    return found


def measure(pid: int, seconds: float) -> dict[str, tuple[float, float]]:
    """Per command name: (% of a core, wakeups per second) over ``seconds``."""
    before = schedstat(pid)
    time.sleep(seconds)
    after = schedstat(pid)
    return {
        comm: ((ran - before.get(comm, (0, 0))[0]) / 1e7 / seconds,
               (slices - before.get(comm, (0, 0))[1]) / seconds)
        for comm, (ran, slices) in after.items()
    }


@contextlib.contextmanager
def served(src: Path, backend: str, tmp: Path, name: str) -> Iterator[int]:
    port = free_port()
    config = tmp / f"{name}.toml"
    config.write_text(DEPLOYED_CONF.format(port=port, data=tmp / f"{name}/redis",
                                           backend=backend))
    env = clean_env(src)
    cmd = [sys.executable, "-m", "gpufleet", "serve", "--config", str(config)]
    with process(cmd, 0, port, env=env, start_timeout_s=60, log=tmp / f"{name}.log") as proc:
        key = create_key(config, env)
        wait_ready(f"http://127.0.0.1:{port}/api/chat", {"Authorization": f"Bearer {key}"})
        yield proc.pid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--before", type=Path, metavar="CHECKOUT")
    args = parser.parse_args()

    runs = {"after (this checkout)": ROOT}
    if args.before is not None:
        runs = {"before": args.before.resolve(), **runs}
    me = [sys.executable, str(ROOT / "bench" / "proxy_overhead.py")]
    samples: dict[str, list[dict[str, tuple[float, float]]]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        tmp = Path(d)
        bport = free_port()
        stack.enter_context(process([*me, "backend", "--port", str(bport)], 1, bport))
        backend = f"http://127.0.0.1:{bport}"
        pids = {name: stack.enter_context(served(src, backend, tmp, f"s{i}"))
                for i, (name, src) in enumerate(runs.items())}
        time.sleep(args.settle)
        for rep in range(args.reps):
            for name, pid in pids.items():
                samples[name].append(measure(pid, args.seconds))
                print(f"  rep {rep + 1} {name}: " + ", ".join(
                    f"{comm} {pct:.2f} % {wakes:.1f}/s"
                    for comm, (pct, wakes) in samples[name][-1].items()), file=sys.stderr)

    print(f"\nidle gpufleet serve, {args.seconds:.0f} s x {args.reps}, medians")
    print("| checkout | process | % of a core | wakeups/s | ms CPU per wakeup |")
    print("|---|---|---|---|---|")
    totals: dict[str, float] = {}
    for name, reps in samples.items():
        comms = sorted({c for r in reps for c in r}, key=lambda c: c != "python")
        for comm in comms:
            pct = statistics.median(r.get(comm, (0.0, 0.0))[0] for r in reps)
            wakes = statistics.median(r.get(comm, (0.0, 0.0))[1] for r in reps)
            per = 10 * pct / wakes if wakes else 0.0
            print(f"| {name} | {comm} | {pct:.2f} | {wakes:.1f} | {per:.2f} |")
        totals[name] = statistics.median(sum(v[0] for v in r.values()) for r in reps)
        print(f"| {name} | **tree** | **{totals[name]:.2f}** | | |")
    if len(totals) == 2:
        before, after = totals.values()
        print(f"after / before: {after / before:.2f}x")


if __name__ == "__main__":
    main()
