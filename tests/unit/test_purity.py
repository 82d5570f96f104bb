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


@pytest.mark.parametrize("module", ["policy.py", "snapshot.py", "actions.py", "history.py"])
def test_policy_modules_are_pure(module):
    roots = imported_roots(SCALING / module)
    assert roots, "parsed no imports at all: wrong file?"
    assert not roots & BANNED


def test_the_check_would_catch_a_clock(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from time import time\nimport asyncio.tasks\n")
    assert imported_roots(bad) & BANNED == {"time", "asyncio"}
