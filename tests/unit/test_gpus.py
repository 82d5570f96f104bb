"""GPU requirements: name matching, fits, product names, the 422 message, model exclusions."""

from __future__ import annotations

import pytest

from gpufleet.gpus import (
    GpuOffer,
    GpuRequirement,
    fits,
    name_matches,
    no_fit_message,
    parse_product_name,
)
from gpufleet.routing import gpu_unfit_message, pool_serves
from gpufleet.settings import load_settings


@pytest.mark.parametrize(
    ("wanted", "offered", "match"),
    [
        ("RTX 4090", "NVIDIA GeForce RTX 4090", True),
        ("rtx 4090", "RTX 4090 24GB", True),
        ("RTX-4090", "rtx 4090", True),
        ("A100", "A100 SXM4 80GB", True),
        ("a100", "NVIDIA A100-SXM4-80GB", True),
        ("4090", "RTX 4090", True),
        ("RTX 40", "RTX 4090", False),
        ("A100", "H100 SXM5", False),
        ("RTX 4090", "RTX 3090", False),
        ("NVIDIA", "NVIDIA A100", False),  # a vendor word alone names no GPU
    ],
)
def test_name_matching(wanted: str, offered: str, match: bool) -> None:
    assert name_matches(wanted, offered) is match


BIG = GpuOffer(gpu="A100 SXM4", memory_gb=80, cuda="12.4")


@pytest.mark.parametrize(
    ("need", "offer", "ok"),
    [
        (GpuRequirement(), None, True),
        (GpuRequirement(gpu_memory_gb=48), BIG, True),
        (GpuRequirement(gpu_memory_gb=81), BIG, False),
        (GpuRequirement(gpu=["RTX 4090", "a100"]), BIG, True),
        (GpuRequirement(gpu=["H100"]), BIG, False),
        (GpuRequirement(cuda="12.2"), BIG, True),
        (GpuRequirement(cuda="12.10"), BIG, False),  # versions compare as numbers
        (GpuRequirement(cuda="12.4"), GpuOffer(gpu="A100", memory_gb=80), False),  # unknown
        (GpuRequirement(gpu_memory_gb=1), None, False),  # unknown offer fits nothing
        (GpuRequirement(gpu_memory_gb=24), GpuOffer(gpu="RTX 4090"), False),
    ],
)
def test_fits(need: GpuRequirement, offer: GpuOffer | None, ok: bool) -> None:
    assert fits(offer, need) is ok


def test_product_names_give_gpu_and_memory_per_worker() -> None:
    assert parse_product_name("RTX 4090 24GB") == GpuOffer(gpu="RTX 4090", memory_gb=24)
    assert parse_product_name("A100 SXM4 80GB", gpu_num=2) == GpuOffer(
        gpu="A100 SXM4", memory_gb=160
    )
    assert parse_product_name("Mystery") == GpuOffer(gpu="Mystery", memory_gb=None)


def test_merged_requirement_is_the_stricter() -> None:
    own = GpuRequirement(gpu_memory_gb=24, cuda="12.1")
    model = GpuRequirement(gpu_memory_gb=48, cuda="11.8", gpu=["A100"])
    both = own.merged(model)
    assert both == GpuRequirement(gpu_memory_gb=48, cuda="12.1", gpu=["A100"])
    assert both.describe() == "gpu_memory_gb >= 48, gpu in [A100], cuda >= 12.1"


def test_no_fit_message_names_requirement_and_pools() -> None:
    offers = {"comfy": GpuOffer(gpu="RTX 4090", memory_gb=24), "other": None}
    msg = no_fit_message(GpuRequirement(gpu_memory_gb=80), ["comfy", "other"], offers)
    assert msg == (
        "no pool has gpu_memory_gb >= 80: pools comfy (RTX 4090, 24 GB), other (GPU unknown)"
    )


def _settings():
    return load_settings(
        env_file=None,
        pools=[
            {"name": "small", "provider": "static", "engine": "ollama", "urls": ["http://a"],
             "gpu": "RTX 4090", "gpu_memory_gb": 24},
            {"name": "big", "provider": "static", "engine": "ollama", "urls": ["http://b"],
             "gpu": "A100", "gpu_memory_gb": 80},
        ],
        models={"llama3.1:70b": {"gpu_memory_gb": 48}, "huge": {"gpu_memory_gb": 200}},
    )


def test_model_requirements_decide_which_pools_serve_a_model() -> None:
    settings = _settings()
    small, big = settings.pools
    assert set(settings.models) == {"llama3.1:70b", "huge:latest"}  # names normalized
    assert not pool_serves(small, "llama3.1:70b")
    assert pool_serves(big, "llama3.1:70b")
    assert pool_serves(small, "llama3.1:70b", gpu=False)
    assert pool_serves(small, "llama3:8b")
    assert pool_serves(big, "llama3:8b")
    assert gpu_unfit_message("llama3.1:70b", settings.models, settings.pools) is None
    assert gpu_unfit_message("llama3:8b", settings.models, settings.pools) is None
    msg = gpu_unfit_message("huge", settings.models, settings.pools)
    assert msg == (
        "model 'huge:latest': no pool has gpu_memory_gb >= 200: pools small (RTX 4090, 24 GB), "
        "big (A100, 80 GB)"
    )


def test_config_rejects_a_bad_cuda_version() -> None:
    from gpufleet.errors import ConfigError

    with pytest.raises(ConfigError, match="cuda"):
        load_settings(
            env_file=None,
            pools=[{"name": "s", "provider": "static", "engine": "ollama",
                    "urls": ["http://a"], "cuda": "twelve"}],
        )
