"""``gpufleet demo`` in-process: it starts, its cheat sheet's key works, Ctrl-C stops it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import tomllib
from pathlib import Path

import httpx
import pytest

from gpufleet.demo import (
    NOVITA_POOL,
    OLLAMA_MODEL,
    SURF_POOL,
    SURF_WORKSPACES,
    Demo,
    DemoError,
    DemoOptions,
    DemoTimings,
    demo_overrides,
    port_is_free,
    run,
)
from gpufleet.engines.simulated.comfyui_app import SimulatedComfyUI
from gpufleet.examples import example_path
from gpufleet.graphs import graph_problems
from gpufleet.loopback import free_port

ROOT = Path(__file__).resolve().parents[2]


def options(tmp_path: Path, *, auth: bool | None = True) -> DemoOptions:
    return DemoOptions(port=free_port(), data_dir=tmp_path, timings=DemoTimings.fast(), auth=auth)


def sheet_key(sheet: str) -> str:
    match = re.search(r"admin API key \(shown once[^)]*\): (\S+)", sheet)
    assert match, sheet
    return match[1]


async def test_cheat_sheet_key_sees_both_pools(tmp_path: Path) -> None:
    async with Demo(options(tmp_path)) as demo:
        sheet = demo.cheat_sheet()
        key = sheet_key(sheet)
        assert f"{demo.url}/ui#key={key}" in sheet
        assert f"export GPUFLEET_URL={demo.url} GPUFLEET_API_KEY={key}" in sheet
        assert f"OLLAMA_HOST={demo.url} ollama run llama3.2:1b" in sheet
        assert str(example_path("txt2img.json")) in sheet
        async with httpx.AsyncClient(base_url=demo.url) as client:
            anonymous = await client.get("/api/v1/pools")
            assert anonymous.status_code == 401
            pools = await client.get("/api/v1/pools", headers={"Authorization": f"Bearer {key}"})
            assert pools.status_code == 200, pools.text
            by_name = {p["name"]: p for p in pools.json()}
            assert set(by_name) == {NOVITA_POOL, SURF_POOL}
            assert (by_name[NOVITA_POOL]["provider"], by_name[NOVITA_POOL]["engine"]) == (
                "novita", "comfyui")
            assert (by_name[SURF_POOL]["provider"], by_name[SURF_POOL]["engine"]) == (
                "surf", "ollama")
            assert by_name[NOVITA_POOL]["min_workers"] == 0
            assert by_name[NOVITA_POOL]["max_workers"] == 3
            # The real provider clients reach the simulated clouds over loopback.
            surf = await client.get("/api/v1/providers/surf/instances",
                                    headers={"X-API-Key": key})
            assert surf.status_code == 200, surf.text
            listed = sorted((i["name"], i["state"]) for i in surf.json()["instances"])
            assert listed == [(name, "paused") for name in SURF_WORKSPACES]
            products = await client.get("/api/v1/providers/novita/products",
                                        headers={"X-API-Key": key})
            assert products.status_code == 200
            assert {p["price_per_hour"] for p in products.json()["products"]} == {0.67, 1.60}
        ips = {ws.ip for ws in demo.surf.workspaces.values()}
        assert len(ips) == len(SURF_WORKSPACES)  # one address per workspace (Linux loopback)
        port = demo.options.port
    assert port_is_free("127.0.0.1", port)


async def test_each_run_prints_a_new_key(tmp_path: Path) -> None:
    async with Demo(options(tmp_path)) as first:
        key1 = first.api_key
    async with Demo(options(tmp_path)) as second:
        assert second.api_key
        assert second.api_key != key1
        async with httpx.AsyncClient(base_url=second.url) as client:
            answer = await client.get("/api/v1/pools", headers={"X-API-Key": second.api_key})
            assert answer.status_code == 200


async def test_no_auth_sheet_has_no_key(tmp_path: Path) -> None:
    async with Demo(options(tmp_path, auth=False)) as demo:
        sheet = demo.cheat_sheet()
        assert "auth is OFF" in sheet
        assert "gpf_" not in sheet
        async with httpx.AsyncClient(base_url=demo.url) as client:
            assert (await client.get("/api/v1/pools")).status_code == 200


def sheet_commands(sheet: str) -> list[str]:
    """The shell commands of the cheat sheet's "Try it" part (continuations joined)."""
    commands: list[str] = []
    pending = ""
    for line in sheet.split("Try it in another terminal:")[1].splitlines():
        text = line.strip()
        if not text or text.startswith("#") or text.startswith("Ctrl-C"):
            continue
        pending += text
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        commands.append(pending)
        pending = ""
    return commands


def programs(command: str) -> list[str]:
    """The programs a shell command line runs (first word of each simple command)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found, start = [], True
    for token in lexer:
        if token in ("&&", "||", ";", "|", "(", "do", "$"):
            start = True
        elif start and "=" not in token and token != ")":
            found.append(token)
            start = False
    return found


def base_dependencies() -> set[str]:
    """Import names of what `pip install -e .` installs (this tree's pyproject), no extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\[<>=!~ ;]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    return {name.lower().replace("-", "_") for name in names} | {"gpufleet"}


async def test_every_printed_command_needs_only_a_plain_install(tmp_path: Path) -> None:
    """After `pip install -e . && gpufleet demo`, each command runs: gpufleet and curl (and
    the shell); a tool that is not a gpufleet dependency comes with its `pip install` line
    or only in a comment that says how to get it."""
    installed = base_dependencies()
    shell = {"export", "for", "do", "done", "cat", "seq", "grep"}
    for auth in (True, False):
        async with Demo(options(tmp_path / str(auth), auth=auth)) as demo:
            commands = sheet_commands(demo.cheat_sheet())
        assert any(c.startswith("curl") and "/api/chat" in c for c in commands), commands
        for command in commands:
            for program in programs(command):
                assert program in {"gpufleet", "curl", "pip", "python", *shell}, command
            for module in re.findall(r"\bimport (\w+)", command):
                assert module in installed or f"pip install {module}" in command, (
                    f"{module!r} is not installed by `pip install -e .`: {command}")
            assert "ollama run" not in command  # the ollama CLI is no pip package


async def test_cheat_sheets_curl_commands_work(tmp_path: Path) -> None:
    """Run the sheet's curl lines as printed (with its export line) against the demo."""
    async with Demo(options(tmp_path)) as demo:
        commands = sheet_commands(demo.cheat_sheet())
        export = next(c for c in commands if c.startswith("export GPUFLEET_URL="))
        answers = {}
        for command in commands:
            if command.startswith("curl") and "/metrics" not in command:
                proc = await asyncio.create_subprocess_exec(
                    "bash", "-c", f"{export}; {command}", stdout=asyncio.subprocess.PIPE)
                out, _ = await asyncio.wait_for(proc.communicate(), 60)
                assert proc.returncode == 0, command
                answers[command] = json.loads(out)
        chat = next(a for c, a in answers.items() if "/api/chat" in c)
        assert chat["model"] == OLLAMA_MODEL
        assert "simulated Ollama" in chat["message"]["content"]
        task = next(a for c, a in answers.items() if "/api/v1/tasks" in c)
        assert task["kind"] == "comfyui"
        assert task["status"] in ("queued", "running", "succeeded")


async def test_environment_settings_apply_to_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPUFLEET_AUTH__ENABLED=false turns auth off as --no-auth does; other settings apply."""
    monkeypatch.chdir(tmp_path)
    port = free_port()
    monkeypatch.setenv("GPUFLEET_AUTH__ENABLED", "false")
    monkeypatch.setenv("GPUFLEET_SERVER__PORT", str(port))
    monkeypatch.setenv("GPUFLEET_SERVER__API_DOCS", "false")
    opts = DemoOptions(data_dir=tmp_path / "demo", timings=DemoTimings.fast())
    async with Demo(opts) as demo:
        sheet = demo.cheat_sheet()
        assert demo.url == f"http://127.0.0.1:{port}"
        assert demo.api_key == ""
        assert "auth is OFF ([auth] enabled = false in your configuration or environment)" in sheet
        assert "gpf_" not in sheet
        assert "api_docs = false" in sheet
        async with httpx.AsyncClient(base_url=demo.url) as client:
            assert (await client.get("/api/v1/pools")).status_code == 200
            assert (await client.get("/docs")).status_code == 404


async def test_command_line_options_beat_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPUFLEET_AUTH__ENABLED", "true")
    monkeypatch.setenv("GPUFLEET_SERVER__PORT", str(free_port()))
    opts = options(tmp_path / "demo", auth=False)
    async with Demo(opts) as demo:
        assert demo.url.endswith(f":{opts.port}")
        assert "auth is OFF (--no-auth)" in demo.cheat_sheet()
        async with httpx.AsyncClient(base_url=demo.url) as client:
            assert (await client.get("/api/v1/pools")).status_code == 200


async def test_settings_the_demo_owns_are_named_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's clouds, pools and Redis are its own: a real Redis URL or cloud key in the
    environment or config.toml is ignored, and the sheet says so."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPUFLEET_REDIS__URL", "redis://192.0.2.1:6379/0")  # unroutable
    monkeypatch.setenv("NOVITA_API_KEY", "a-real-key")
    monkeypatch.setenv("NOVITA_PRODUCT_ID", "real-product")
    monkeypatch.setenv("NOVITA_IMAGE_URL", "real/image")
    (tmp_path / "config.toml").write_text(
        '[queue]\ndefault_max_attempts = 5\n\n[[pools]]\nname = "mine"\nprovider = "static"\n'
        'engine = "ollama"\nurls = ["http://192.0.2.2:11434"]\n'
    )
    async with Demo(options(tmp_path / "demo")) as demo:
        sheet = demo.cheat_sheet()
        line = next(x for x in sheet.splitlines() if "ignored" in x)
        for name in ("GPUFLEET_REDIS__URL", "NOVITA_API_KEY", "NOVITA_PRODUCT_ID",
                     "config.toml: pools"):
            assert name in line, line
        assert demo.settings is not None
        assert demo.settings.queue.default_max_attempts == 5  # the rest of config.toml applies
        assert [p.name for p in demo.settings.pools] == [NOVITA_POOL, SURF_POOL]
        async with httpx.AsyncClient(base_url=demo.url,
                                     headers={"X-API-Key": demo.api_key}) as client:
            assert (await client.get("/ready")).status_code == 200  # its own Redis


def test_demo_overrides_reads_environment_dotenv_and_config(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CLOUD_API_TOKEN=t\nGPUFLEET_AUTH__ENABLED=false\n")
    config = tmp_path / "config.toml"
    config.write_text('[redis]\nurl = "redis://x"\n[server]\nport = 1\n')
    found = demo_overrides({"REDIS_URL": "redis://y", "GPUFLEET_PROVIDERS__SURF__API_TOKEN": "s",
                            "PORT": "9", "GPUFLEET_SERVER__HOST": "0.0.0.0"},
                           config_path=config, env_file=env_file)
    assert found == ["GPUFLEET_PROVIDERS__SURF__API_TOKEN", "REDIS_URL",
                     f"{env_file}: CLOUD_API_TOKEN", f"{config}: redis.url"]


async def test_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    async with Demo(options(tmp_path)) as running:
        clash = DemoOptions(port=running.options.port, data_dir=tmp_path / "other",
                            timings=DemoTimings.fast())
        with pytest.raises(DemoError, match="in use"):
            await Demo(clash).start()


async def test_sigint_stops_everything(tmp_path: Path) -> None:
    printed: list[str] = []
    opts = options(tmp_path)

    def out(text: str) -> None:
        printed.append(text)
        if len(printed) == 1:  # the cheat sheet: now press Ctrl-C
            asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGINT)

    await asyncio.wait_for(run(opts, out), timeout=30)
    assert sheet_key(printed[0])
    assert printed[-1].startswith("stopping")
    assert port_is_free("127.0.0.1", opts.port)
    assert not (tmp_path / "redis" / "redis.pid").exists() or not _alive(tmp_path)


def _alive(data_dir: Path) -> bool:
    try:
        pid = int((data_dir / "redis" / "redis.pid").read_text())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


def test_example_graph_is_a_valid_comfyui_graph() -> None:
    graph = json.loads(example_path("txt2img.json").read_text())
    assert graph_problems(graph) == []
    assert any(node["class_type"] == "SaveImage" for node in graph.values())


async def test_example_graph_runs_on_the_simulated_comfyui() -> None:
    graph = json.loads(example_path("txt2img.json").read_text())
    sim = SimulatedComfyUI()
    try:
        transport = httpx.ASGITransport(app=sim)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            answer = await client.post("/prompt", json={"prompt": graph})
            assert answer.status_code == 200, answer.text
            prompt_id = answer.json()["prompt_id"]
            for _ in range(200):
                history = (await client.get(f"/history/{prompt_id}")).json()
                if history:
                    break
                await asyncio.sleep(0.01)
        images = history[prompt_id]["outputs"]["9"]["images"]
        assert images[0]["filename"].startswith("gpufleet-demo")
    finally:
        await sim.aclose()
