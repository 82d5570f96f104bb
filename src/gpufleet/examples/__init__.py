"""Example payloads shipped with gpufleet (``gpufleet demo`` prints commands that use them).

``txt2img.json``: ComfyUI's default text-to-image workflow in API format (a bare graph,
which ``gpufleet tasks submit`` accepts as is). It runs on the simulated ComfyUI of the
demo and on a real ComfyUI that has the SD 1.5 checkpoint it names.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

__all__ = ["example_path"]


def example_path(name: str) -> Path:
    """Filesystem path of a shipped example (the package is installed as plain files)."""
    with as_file(files(__name__) / name) as path:
        return Path(path)
