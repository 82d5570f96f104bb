"""GPU requirements and what a pool's GPUs offer: pure values and the matching rule.

A task (``TaskSubmit``) or a proxied model (``[models."<name>"]`` in config) may require
``gpu_memory_gb`` (at least), ``gpu`` (acceptable GPU names) and ``cuda`` (at least that
version). A pool offers ``GpuOffer``: from its config (``gpu``, ``gpu_memory_gb``, ``cuda``)
or, for a Novita pool that leaves them out, parsed from its product's name
(``"RTX 4090 24GB"``; ``gpufleet.providers.catalog`` reads the product list). ``fits`` is
the one rule everything uses: the submit check (422), the queue's routing (the task waits
only in the pools that fit), the scaler's demand groups and the proxy.

A pool whose offer is unknown (a Novita product not listed yet, nothing in config) fits no
requirement: gpufleet never guesses that a GPU is large enough. No I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

CUDA_VERSION = r"^\d{1,3}(\.\d{1,3}){0,2}$"
# Words that vendors put before the model name; "NVIDIA GeForce RTX 4090" is an "RTX 4090".
_VENDOR_WORDS = frozenset({"nvidia", "geforce", "amd", "radeon", "tesla", "quadro", "intel"})
_MEMORY_WORD = re.compile(r"^\d+(\.\d+)?\s*(gb|g|gib)$")
_MEMORY_IN_NAME = re.compile(r"(\d+(?:\.\d+)?)\s*(?:GB|G|GiB)\b", re.IGNORECASE)


class GpuRequirement(BaseModel):
    """What a task or a model needs of a GPU; every field optional (None: no requirement)."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_gb: float | None = Field(
        None, gt=0, le=4096, description="Least GPU memory per worker (GB, all its GPUs)."
    )
    gpu: list[str] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description='Acceptable GPU names, e.g. ["RTX 4090", "A100"]; case-insensitive, '
        'vendor words ("NVIDIA", "GeForce") ignored, a name matches a longer one by whole '
        'words ("A100" matches "A100 SXM4 80GB").',
    )
    cuda: str | None = Field(
        None, pattern=CUDA_VERSION, description='Least CUDA version, e.g. "12.4".'
    )

    @property
    def empty(self) -> bool:
        return self.gpu_memory_gb is None and not self.gpu and self.cuda is None

    def merged(self, other: GpuRequirement | None) -> GpuRequirement:
        """Both requirements at once (the stricter memory and CUDA; names must satisfy both:
        a task's own list narrows a model's)."""
        if other is None or other.empty:
            return self
        if self.empty:
            return other
        memory = [m for m in (self.gpu_memory_gb, other.gpu_memory_gb) if m is not None]
        cudas = [c for c in (self.cuda, other.cuda) if c is not None]
        return GpuRequirement(
            gpu_memory_gb=max(memory) if memory else None,
            gpu=self.gpu or other.gpu,
            cuda=max(cudas, key=version) if cudas else None,
        )

    def describe(self) -> str:
        """``gpu_memory_gb >= 80, gpu in [A100, H100], cuda >= 12.4`` (what the 422 names)."""
        parts = []
        if self.gpu_memory_gb is not None:
            parts.append(f"gpu_memory_gb >= {self.gpu_memory_gb:g}")
        if self.gpu:
            parts.append(f"gpu in [{', '.join(self.gpu)}]")
        if self.cuda is not None:
            parts.append(f"cuda >= {self.cuda}")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class GpuOffer:
    """What one worker of a pool has: GPU name, memory (GB, all its GPUs), CUDA version.
    A field left None is unknown, and fits no requirement on it."""

    gpu: str | None = None
    memory_gb: float | None = None
    cuda: str | None = None

    def describe(self) -> str:
        parts = [p for p in (self.gpu, _gb(self.memory_gb)) if p]
        if self.cuda:
            parts.append(f"CUDA {self.cuda}")
        return ", ".join(parts) or "GPU unknown"


def _gb(value: float | None) -> str:
    return f"{value:g} GB" if value is not None else ""


def version(text: str) -> tuple[int, ...]:
    """``"12.4"`` -> ``(12, 4)``; what is not a number compares as 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in text.strip().split("."))


def gpu_words(name: str) -> tuple[str, ...]:
    """A GPU name as lowercase words without vendor words or a memory size:
    ``"NVIDIA GeForce RTX-4090 24GB"`` -> ``("rtx", "4090")``."""
    words = re.split(r"[\s_\-/]+", name.lower().strip())
    return tuple(w for w in words if w and w not in _VENDOR_WORDS and not _MEMORY_WORD.match(w))


def name_matches(wanted: str, offered: str) -> bool:
    """True if ``offered`` contains ``wanted``'s words in order, as whole words."""
    want, have = gpu_words(wanted), gpu_words(offered)
    if not want:
        return False
    return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def fits(offer: GpuOffer | None, need: GpuRequirement | None) -> bool:
    """True if a worker with ``offer`` meets every part of ``need``."""
    if need is None or need.empty:
        return True
    if offer is None:
        return False
    if need.gpu_memory_gb is not None and (
        offer.memory_gb is None or offer.memory_gb < need.gpu_memory_gb
    ):
        return False
    if need.gpu and (offer.gpu is None or not any(name_matches(n, offer.gpu) for n in need.gpu)):
        return False
    return not (
        need.cuda is not None and (offer.cuda is None or version(offer.cuda) < version(need.cuda))
    )


def parse_product_name(name: str, gpu_num: int = 1) -> GpuOffer:
    """A Novita product name (``"RTX 4090 24GB"``, ``"A100 SXM4 80GB"``) as an offer for a
    worker with ``gpu_num`` of them; the name without the size is the GPU name."""
    match = _MEMORY_IN_NAME.search(name)
    memory = float(match.group(1)) * gpu_num if match else None
    gpu = _MEMORY_IN_NAME.sub("", name).strip() or None
    return GpuOffer(gpu=gpu, memory_gb=memory)


def offer_from_config(
    gpu: str | None, gpu_memory_gb: float | None, cuda: str | None
) -> GpuOffer | None:
    """A pool's configured offer; None when config says nothing about its GPU."""
    if gpu is None and gpu_memory_gb is None and cuda is None:
        return None
    return GpuOffer(gpu=gpu, memory_gb=gpu_memory_gb, cuda=cuda)


def fill_offer(configured: GpuOffer | None, product: GpuOffer | None) -> GpuOffer | None:
    """The configured offer, its gaps filled from the product listing."""
    if configured is None:
        return product
    if product is None:
        return configured
    return GpuOffer(
        gpu=configured.gpu or product.gpu,
        memory_gb=configured.memory_gb if configured.memory_gb is not None else product.memory_gb,
        cuda=configured.cuda or product.cuda,
    )


def fitting(
    names: Iterable[str], offers: Mapping[str, GpuOffer | None], need: GpuRequirement | None
) -> list[str]:
    """The pools among ``names`` whose offer fits ``need``, in the given order."""
    return [n for n in names if fits(offers.get(n), need)]


def no_fit_message(
    need: GpuRequirement, names: Iterable[str], offers: Mapping[str, GpuOffer | None]
) -> str:
    """``no pool has gpu_memory_gb >= 80: pools comfy (RTX 4090, 24 GB), big (GPU unknown)``."""
    listed = [f"{n} ({(offers.get(n) or GpuOffer()).describe()})" for n in names]
    where = f": pools {', '.join(listed)}" if listed else ""
    return f"no pool has {need.describe()}{where}"
