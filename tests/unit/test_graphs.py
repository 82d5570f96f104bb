from __future__ import annotations

from typing import Any

import pytest

from gpufleet.graphs import graph_problems

GOOD = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "x"}},
}


def test_a_valid_graph_has_no_problems() -> None:
    assert graph_problems(GOOD) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ([], "must be an object of nodes"),
        ({}, "no nodes"),
        ({"1": "node"}, "payload.1: a node must be an object"),
        ({"1": {"inputs": {}}}, "payload.1.class_type: required"),
        ({"1": {"class_type": "X", "inputs": []}}, "payload.1.inputs: must be an object"),
        (
            {"1": {"class_type": "X", "inputs": {"a": ["7", 0]}}},
            "payload.1.inputs.a: links to node '7'",
        ),
    ],
)
def test_problems_name_the_place(graph: Any, expected: str) -> None:
    assert any(expected in p for p in graph_problems(graph)), graph_problems(graph)


def test_links_may_use_int_ids_like_comfyui_accepts() -> None:
    graph = {
        "1": {"class_type": "X", "inputs": {}},
        "2": {"class_type": "Y", "inputs": {"a": [1, 0]}},
    }
    assert graph_problems(graph) == []
    # ComfyUI reads any [id, index] pair as a link, so [512, 512] names a missing node.
    assert graph_problems({"1": {"class_type": "X", "inputs": {"size": [512, 512]}}})
