"""scripts/test on machines with and without chromium, with stand-ins for pip, make and apt.

Runs the real script with PATH holding only stubs (and the few tools it uses), so it sees
the machine the test describes: each stub records how it was called.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASH = shutil.which("bash") or "/bin/bash"


def machine(tmp_path: Path, *, uid: int, chromium: bool = False, apt: bool = False,
            sudo: bool = False, apt_gives_chromium: bool = True) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    for tool in ("dirname", "cat"):
        real = shutil.which(tool)
        assert real, tool
        (bin_dir / tool).symlink_to(real)

    def stub(name: str, body: str = "") -> None:
        path = bin_dir / name
        path.write_text(f'#!{BASH}\necho "{name} $*" >> {log}\n{body}\n')
        path.chmod(0o755)

    stub("python")
    stub("make")
    stub("id", f"echo {uid}")
    if chromium:
        stub("chromium")
    if apt:
        gives = f'[ "$1" = install ] && printf "#!{BASH}\\n" > {bin_dir}/chromium ' \
                f'&& chmod +x {bin_dir}/chromium' if apt_gives_chromium else ""
        stub("apt-get", gives + "\nexit 0")
    if sudo:
        stub("sudo", '"$@"')
    return bin_dir


def run(tmp_path: Path, bin_dir: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    done = subprocess.run([BASH, str(ROOT / "scripts" / "test")], env=env, text=True,
                          capture_output=True, timeout=60, check=False)
    log = tmp_path / "calls"
    return done, log.read_text().splitlines() if log.exists() else []


def test_without_chromium_or_apt_it_says_how_and_still_runs_the_checks(tmp_path: Path) -> None:
    done, calls = run(tmp_path, machine(tmp_path, uid=1000))
    assert done.returncode == 0, done.stderr
    assert calls[0] == "python -m pip install --quiet -e .[dev]"
    assert calls[-1] == "make check"
    assert "no headless Chromium" in done.stderr
    assert "tests/e2e/test_status_page.py fails" in done.stderr
    assert "apt-get install chromium" in done.stderr


def test_as_root_with_apt_it_installs_chromium(tmp_path: Path) -> None:
    done, calls = run(tmp_path, machine(tmp_path, uid=0, apt=True))
    assert done.returncode == 0, done.stderr
    assert "apt-get update -qq" in calls
    assert "apt-get install -y -qq chromium" in calls
    assert calls[-1] == "make check"
    assert "no headless Chromium" not in done.stderr


def test_not_root_it_uses_sudo(tmp_path: Path) -> None:
    done, calls = run(tmp_path, machine(tmp_path, uid=1000, apt=True, sudo=True))
    assert done.returncode == 0, done.stderr
    assert "sudo apt-get install -y -qq chromium" in calls
    assert calls[-1] == "make check"


@pytest.mark.parametrize("kwargs", [{"uid": 1000, "apt": True},  # no sudo
                                    {"uid": 0, "apt": True, "apt_gives_chromium": False}])
def test_when_the_install_cannot_happen_it_says_how(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    done, calls = run(tmp_path, machine(tmp_path, **kwargs))
    assert done.returncode == 0, done.stderr
    assert "no headless Chromium" in done.stderr
    assert calls[-1] == "make check"


def test_with_chromium_nothing_is_installed(tmp_path: Path) -> None:
    done, calls = run(tmp_path, machine(tmp_path, uid=1000, chromium=True, apt=True))
    assert done.returncode == 0, done.stderr
    assert not [c for c in calls if c.startswith("apt-get")]
    assert done.stderr == ""
    assert calls == ["python -m pip install --quiet -e .[dev]", "make check"]


def test_the_checks_exit_code_is_the_scripts(tmp_path: Path) -> None:
    bin_dir = machine(tmp_path, uid=1000, chromium=True)
    (bin_dir / "make").write_text(f"#!{BASH}\nexit 2\n")
    done, _ = run(tmp_path, bin_dir)
    assert done.returncode == 2
    assert os.access(ROOT / "scripts" / "test", os.X_OK)
