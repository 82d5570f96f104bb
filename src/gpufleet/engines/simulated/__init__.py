"""Simulated GPU workers: ASGI apps that speak the ComfyUI and Ollama wire protocols.

They serve the simulated clouds (``gpufleet demo``), the tests and the benchmarks.
Every delay is a knob of the config dataclass (default 0, so tests run in
milliseconds), failures are injected by knobs, and a ``Recorder`` counts what the
worker saw so a test can check that gpufleet never exceeded a worker's slots::

    sim = SimulatedOllama(OllamaConfig(models=("llama3.2",), tokens_per_s=50))
    async with serve(sim) as url: ...            # tests/servers.py, real socket
    httpx.AsyncClient(transport=httpx.ASGITransport(app=sim))   # buffered, no socket
    assert sim.recorder.max_concurrent <= slots

Nothing under ``gpufleet/`` imports this package except the CLI's demo (STYLE.md
import contracts); the real engine clients must not know these exist.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ComfyUIConfig",
    "OllamaConfig",
    "Recorder",
    "SimulatedComfyUI",
    "SimulatedOllama",
    "tiny_png",
]


@dataclass
class Recorder:
    """What a simulated worker saw: requests, bodies, work in flight and its maximum.

    ``current``/``max_concurrent`` count units of work at once (Ollama: inference
    requests being answered; ComfyUI: prompts queued or running). ``disconnects``
    counts clients that went away before their answer was complete.
    """

    current: int = 0
    max_concurrent: int = 0
    total: int = 0
    disconnects: int = 0
    refused: int = 0  # calls without the configured worker token (answered 401/403)
    requests: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def request(self, method: str, path: str) -> None:
        self.requests.append((method, path))

    def count(self, path: str) -> int:
        return sum(1 for _, p in self.requests if p == path)

    def enter(self) -> None:
        self.current += 1
        self.total += 1
        self.max_concurrent = max(self.max_concurrent, self.current)

    def exit(self) -> None:
        self.current -= 1

    @contextmanager
    def working(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.exit()


def tiny_png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (255, 255, 255),
             text: dict[str, str] | None = None) -> bytes:
    """A real, valid RGB PNG (decodable by any viewer), with optional tEXt chunks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width  # filter type 0, then the pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    extra = b"".join(
        chunk(b"tEXt", k.encode("latin-1") + b"\x00" + v.encode("latin-1", "replace"))
        for k, v in (text or {}).items()
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def __getattr__(name: str) -> Any:
    # Lazy: importing the package for tiny_png must not pull in starlette.
    if name in ("ComfyUIConfig", "SimulatedComfyUI"):
        from gpufleet.engines.simulated import comfyui_app

        return getattr(comfyui_app, name)
    if name in ("OllamaConfig", "SimulatedOllama"):
        from gpufleet.engines.simulated import ollama_app

        return getattr(ollama_app, name)
    raise AttributeError(name)
