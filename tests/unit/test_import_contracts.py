"""The import contracts in pyproject.toml hold, and they would catch a break.

`make contracts` runs the same check; this test puts it in the suite CI runs. lint-imports runs
in a subprocess with this checkout's ``src`` first on ``PYTHONPATH``, so it reads these sources
even where another checkout of gpufleet is the installed one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root / "src"), env.get("PYTHONPATH", "")) if p
    )
    # The function behind the lint-imports console script, run by this interpreter.
    command = [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"]
    return subprocess.run(
        [*command, "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )


def test_the_contracts_hold():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
    # Each contract was checked, not skipped: six named contracts, all kept.
    assert done.stdout.count(" KEPT") == 6, done.stdout


def test_the_contracts_catch_a_break(tmp_path):
    """A copy of the sources with violations planted: each contract type reports them."""
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    pkg = tmp_path / "src" / "gpufleet"
    with (pkg / "scaling" / "actions.py").open("a") as f:
        f.write("\nimport time  # planted: the scaling core reads the clock\n")
    # history.py is matched whether or not it exists yet (another branch adds it).
    with (pkg / "scaling" / "history.py").open("a") as f:
        f.write("\nimport random  # planted: a pool's history draws random numbers\n")
    with (pkg / "store" / "keys.py").open("a") as f:
        f.write("\nimport gpufleet.api  # planted: the store reaches up into the API\n")
    with (pkg / "engines" / "ollama.py").open("a") as f:
        f.write("\nimport gpufleet.engines.comfyui  # planted: one engine knows another\n")

    done = lint_imports(tmp_path)

    assert done.returncode != 0, done.stdout
    out = done.stdout
    assert "3 broken" in out, out
    assert "gpufleet.scaling.actions is not allowed to import time" in out
    # Indirect imports count: policy reads the clock through actions.
    assert "gpufleet.scaling.policy is not allowed to import time" in out
    assert "gpufleet.scaling.history is not allowed to import random" in out
    assert "gpufleet.store is not allowed to import gpufleet.api" in out
    assert "gpufleet.engines.ollama is not allowed to import gpufleet.engines.comfyui" in out
