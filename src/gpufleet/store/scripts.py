"""Every Lua script gpufleet runs lives in ``store/lua/`` (package data) and loads here.

``KEYS_OF`` names, per script, the keys its caller passes in ``KEYS`` (in order; the header
comment of each ``.lua`` file says the same and what ``ARGV`` holds). The task queue's
scripts take none: they build their names from the prefix in ``ARGV[1]`` with the ``k_*``
functions of ``lib.lua``, which is prepended to them. ``tests/unit/test_store_layout.py``
checks that every file is declared here, that each script uses exactly the keys declared,
and that every declared script is registered by some module.
"""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

# The queue's scripts (``store/queue.py``): ``lib.lua`` first, no KEYS.
QUEUE_SCRIPTS = (
    "enqueue",
    "lease",
    "heartbeat",
    "ack",
    "fail",
    "release",
    "cancel",
    "progress",
    "requeue_expired",
    "stats",
    "keynames",
)

KEYS_OF: dict[str, tuple[str, ...]] = {
    **{name: () for name in QUEUE_SCRIPTS},
    # store/workers.py
    "worker_acquire": ("worker", "worker_slots"),
    "worker_release": ("worker", "worker_slots"),
    "worker_renew": ("worker", "worker_slots"),
    "worker_transition": ("worker",),
    "add_cost": ("worker",),
    # store/leader.py
    "leader_acquire": ("leader", "leader_epoch"),
    "leader_check": ("leader",),
    "leader_release": ("leader",),
    # store/apikeys.py
    "key_rate": ("ratelimit",),
    "key_place": ("concurrent",),
    "team_admit": ("ratelimit", "team_ratelimit", "team_spend", "team_spend"),
    "team_place": ("concurrent", "team_concurrent"),
    # store/streams.py
    "stream_take": ("streams",),
    "stream_renew": ("streams",),
}


def source(name: str) -> str:
    """The text of ``store/lua/{name}.lua`` (with ``lib.lua`` before a queue script)."""
    if name not in KEYS_OF:
        raise KeyError(f"no Lua script {name!r} declared in store/scripts.py")
    lua = resources.files("gpufleet.store") / "lua"
    text = (lua / f"{name}.lua").read_text()
    return (lua / "lib.lua").read_text() + "\n" + text if name in QUEUE_SCRIPTS else text


def register(redis: aioredis.Redis, name: str) -> AsyncScript:
    """``redis.register_script`` of one script of ``store/lua/``."""
    return redis.register_script(source(name))
