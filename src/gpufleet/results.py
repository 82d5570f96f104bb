"""gpufleet's own store for task output files (ComfyUI images, videos, ...).

Workers are deleted on scale-down, so an output must be copied here before its
task is marked succeeded. ``ResultStore`` is the small interface the engines
write through and the API reads from (``GET /api/v1/tasks/{id}/outputs/{file}``);
``DirectoryResultStore`` keeps files under ``<root>/<task_id>/<filename>``. An
S3-compatible store implements the same five methods.

Names are checked, never trusted: a task id or file name that could leave its
directory (``..``, ``/``, ``\\``, NUL, leading dot) is refused with ``ValueError``
by ``safe_name``. Engines pass worker-supplied names through ``safe_name`` first.

This module does no HTTP and knows nothing of engines; file I/O runs in a thread
(``asyncio.to_thread``) so the event loop never blocks on a disk.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import mimetypes
import re
import shutil
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Letters, digits and a few punctuation marks; 200 characters leaves room under the
# 255-byte file name limit of common file systems for a numeric de-duplication prefix.
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\- ]{0,199}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._\- ]+")


def safe_name(name: str) -> str:
    """Return ``name`` if it is a plain file name; raise ``ValueError`` otherwise."""
    if not _SAFE.match(name) or ".." in name:
        raise ValueError(f"unsafe file name: {name[:80]!r}")
    return name


def sanitize_name(name: str, *, default: str = "output") -> str:
    """Turn any worker-supplied name into a safe one (``a/../b.png`` → ``a_._b.png``)."""
    cleaned = _UNSAFE_CHARS.sub("_", name.replace("..", "_")).strip(" ._")
    return cleaned[:200] or default


def guess_content_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


@dataclass(frozen=True)
class OutputFile:
    """One stored output, as listed in a task's result."""

    filename: str
    size: int
    content_type: str
    node_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResultStore(ABC):
    """Where task outputs live once copied off a worker."""

    @abstractmethod
    async def put(
        self, task_id: str, filename: str, data: bytes, content_type: str | None = None
    ) -> OutputFile:
        """Store ``data`` as ``filename`` of ``task_id`` (replacing one of that name)."""

    @abstractmethod
    async def get(self, task_id: str, filename: str) -> bytes:
        """The bytes of one output; ``FileNotFoundError`` if there is none."""

    @abstractmethod
    async def open(self, task_id: str, filename: str) -> Path:
        """A local path to serve the output from (``FileResponse``); ``FileNotFoundError``."""

    @abstractmethod
    async def list(self, task_id: str) -> builtins.list[OutputFile]:
        """Every output of ``task_id``, sorted by name; empty if none."""

    @abstractmethod
    async def delete(self, task_id: str) -> int:
        """Remove every output of ``task_id``; returns how many files went. Idempotent."""


class DirectoryResultStore(ResultStore):
    """Outputs as files under ``root/<task_id>/``; content types derive from the name."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"<DirectoryResultStore {self.root}>"

    def _dir(self, task_id: str) -> Path:
        return self.root / safe_name(task_id)

    def _path(self, task_id: str, filename: str) -> Path:
        return self._dir(task_id) / safe_name(filename)

    async def put(
        self, task_id: str, filename: str, data: bytes, content_type: str | None = None
    ) -> OutputFile:
        path = self._path(task_id, filename)
        await asyncio.to_thread(_write_atomically, path, data)
        logger.info("task %s output %s stored (%d bytes)", task_id, filename, len(data))
        return OutputFile(filename, len(data), content_type or guess_content_type(filename))

    async def get(self, task_id: str, filename: str) -> bytes:
        return await asyncio.to_thread(self._path(task_id, filename).read_bytes)

    async def open(self, task_id: str, filename: str) -> Path:
        path = self._path(task_id, filename)
        if not await asyncio.to_thread(path.is_file):
            raise FileNotFoundError(filename)
        return path

    async def list(self, task_id: str) -> builtins.list[OutputFile]:
        return await asyncio.to_thread(self._list_sync, task_id)

    def _list_sync(self, task_id: str) -> builtins.list[OutputFile]:
        folder = self._dir(task_id)
        if not folder.is_dir():
            return []
        return [
            OutputFile(p.name, p.stat().st_size, guess_content_type(p.name))
            for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")
        ]

    async def delete(self, task_id: str) -> int:
        folder = self._dir(task_id)
        count = len(await self.list(task_id))
        await asyncio.to_thread(shutil.rmtree, folder, True)
        if count:
            logger.info("task %s outputs deleted (%d files)", task_id, count)
        return count


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a hidden temp name and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    tmp.replace(path)
