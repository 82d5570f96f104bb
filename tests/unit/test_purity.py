"""The policy modules import no clock, randomness, I/O or logging (STYLE.md habit 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gpufleet.scaling

SCALING = Path(gpufleet.scaling.__file__).parent
BANNED = {"time", "random", "asyncio", "redis", "httpx", "logging", "datetime", "os", "socket"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    "module", ["policy.py", "keepalive.py", "snapshot.py", "actions.py", "history.py"]
)
def test_policy_modules_are_pure(module):
    roots = imported_roots(SCALING / module)
    assert roots, "parsed no imports at all: wrong file?"
    assert not roots & BANNED


def test_the_check_would_catch_a_clock(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from time import time\nimport asyncio.tasks\n")
    assert imported_roots(bad) & BANNED == {"time", "asyncio"}


def scaling_imports(path: Path) -> set[str]:
    """The ``gpufleet.scaling`` modules a file imports by name (``from gpufleet.scaling.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["gpufleet", "scaling"] and len(parts) > 2:
                files = (f"{parts[2]}.py", f"{parts[2]}/__init__.py")
                found |= {f for f in files if (SCALING / f).exists()}
    return found


def test_every_scaling_module_policy_reaches_is_pure():
    """Whatever policy.py pulls in from scaling/ (snapshot, actions, history, ...) is pure too."""
    seen: set[str] = set()
    todo = ["policy.py"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(scaling_imports(SCALING / module) - seen)
    assert {"policy.py", "snapshot.py", "actions.py"} <= seen, seen
    impure = {m: sorted(imported_roots(SCALING / m) & BANNED) for m in sorted(seen)}
    assert not {m: roots for m, roots in impure.items() if roots}
