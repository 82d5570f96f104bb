"""The Redis layout has one home: ``store/keys.py`` (names) and ``store/lua/`` (scripts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpufleet.store import scripts
from gpufleet.store.keys import Keys

SRC = Path(__file__).resolve().parents[2] / "src" / "gpufleet"

# Modules that build their own names: none (the test fails for any module that starts).
PENDING: set[str] = set()

# An f-string that starts a key from a prefix: f"{prefix}:...", f"{self.prefix}:..."
_KEY_FSTRING = re.compile(r"""f["']\{[\w.]*prefix\}:""")


def test_stored_names_keep_their_values() -> None:
    """Existing data stays readable: each name is pinned to the string Redis holds."""
    k = Keys("P")
    day = 19_723  # 2024-01-01
    pairs = [
        (k.workers(), "P:workers"),
        (k.pool_workers("a"), "P:pool:a:workers"),
        (k.worker("w"), "P:worker:w"),
        (k.worker_slots("w"), "P:worker:w:slots"),
        (k.proxy_waiting("a"), "P:proxy:waiting:a"),
        (k.proxy_usage("k1"), "P:proxy:usage:k1"),
        (k.leader("reconciler"), "P:leader:reconciler"),
        (k.leader_epoch("reconciler"), "P:leader:reconciler:epoch"),
        (k.create_intents(), "P:scaling:creates"),
        (k.accounted_at(), "P:scaling:accounted_at"),
        (k.events(), "P:events"),
        (k.pool_state("a"), "P:poolstate:a"),
        (k.spend("2024-01-01"), "P:spend:2024-01-01"),
        (k.streams("b"), "P:streams:b"),
        (k.history_day("a", day), "P:history:a:day:2024-01-01"),
        (k.history_arrivals("a", 123), "P:history:a:arrivals:123"),
        (k.history_minutes("a", day), "P:history:a:minutes:2024-01-01"),
        (k.history_levels("a"), "P:history:a:levels"),
        (k.auth_secret(), "P:auth:secret"),
        (k.apikey("k1"), "P:apikey:k1"),
        (k.apikeys(), "P:apikeys"),
        (k.apikeys_by_digest(), "P:apikeys:by_digest"),
        (k.ratelimit("k1", 7), "P:ratelimit:k1:7"),
        (k.concurrent("k1"), "P:concurrent:k1"),
        (k.team_ratelimit("t", 7), "P:ratelimit:team:t:7"),
        (k.team_concurrent("t"), "P:concurrent:team:t"),
        (k.team("t"), "P:team:t"),
        (k.teams(), "P:teams"),
        (k.team_spend("t", "d:2024-01-01"), "P:teamspend:t:d:2024-01-01"),
        (k.usage_day("2024-01-01"), "P:usage:2024-01-01"),
        (k.wake(), "P:wake"),
        (k.task_channel(), "P:task-events"),
        (k.cancel_channel(), "P:cancel"),
    ]
    assert [got for got, _ in pairs] == [want for _, want in pairs]


def test_no_module_but_keys_builds_a_name() -> None:
    building = {
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if path.name != "keys.py" and _KEY_FSTRING.search(path.read_text())
    }
    assert building == PENDING


LUA = SRC / "store" / "lua"
_KEYS_USED = re.compile(r"KEYS\[(\d+)\]")
_HEADER_KEYS = re.compile(r"^-- KEYS: (.+?)\.", re.MULTILINE)


def test_every_lua_file_is_declared_with_its_keys() -> None:
    files = {path.stem for path in LUA.glob("*.lua")} - {"lib"}
    assert files == set(scripts.KEYS_OF)
    for name, declared in scripts.KEYS_OF.items():
        text = (LUA / f"{name}.lua").read_text()
        used = {int(n) for n in _KEYS_USED.findall(text)}
        # each script uses exactly the keys its caller passes: KEYS[1] .. KEYS[n], no more
        assert used == set(range(1, len(declared) + 1)), name
        header = _HEADER_KEYS.search(text)
        if declared:  # the header says what the caller passes, as many as declared
            assert header is not None, name
            assert len(header.group(1).split(",")) == len(declared), name
        assert "KEYS" not in scripts.source(name).replace(text, ""), name  # lib.lua uses none
        # every declared key is one ``Keys`` method: the script's keys live in store/keys.py
        assert all(callable(getattr(Keys, key, None)) for key in declared), name


def test_every_declared_script_is_registered_by_a_store() -> None:
    source = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    registered = set(re.findall(r'scripts\.register\(\w+, "(\w+)"\)', source))
    assert registered | set(scripts.QUEUE_SCRIPTS) == set(scripts.KEYS_OF)
    assert "scripts.QUEUE_SCRIPTS" in (SRC / "store" / "queue.py").read_text()
    # and no module outside store/scripts.py loads Lua of its own
    own = {
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "register_script(" in p.read_text() and p.name != "scripts.py"
    }
    assert own == set()


def test_an_undeclared_script_is_refused() -> None:
    with pytest.raises(KeyError, match="nope"):
        scripts.source("nope")
