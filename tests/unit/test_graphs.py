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
        ({"1": {"class_type": "", "inputs": {}}}, "payload.1.class_type: required"),
        ({"1": {"class_type": 3, "inputs": {}}}, "payload.1.class_type: required"),
        ({"1": {"class_type": "X"}}, "payload.1.inputs: required"),
        (
            {"1": {"class_type": "X", "inputs": {}}, "2": {"class_type": "Y", "inputs": {
                "a": ["1", -1]}}},
            "payload.2.inputs.a: output index -1 is negative",
        ),
        ({"1": {"class_type": "X", "inputs": {"a": [7, 0]}}}, "links to node 7"),
        ("graph", "must be an object of nodes"),
        (None, "must be an object of nodes"),
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


def test_every_problem_is_reported_not_just_the_first() -> None:
    graph = {
        "1": {"class_type": "X"},
        "2": {"inputs": {"a": ["9", 0]}},
    }
    problems = graph_problems(graph)
    assert any(p.startswith("payload.1.inputs") for p in problems)
    assert any(p.startswith("payload.2.class_type") for p in problems)
    assert any(p.startswith("payload.2.inputs.a") for p in problems)


def test_a_link_is_a_pair_of_node_id_and_int_index() -> None:
    base = {"1": {"class_type": "X", "inputs": {}}}
    # Not links (values, not references): lists of other lengths, a float or bool index.
    for value in (["1"], ["1", 0, 0], ["1", 0.5], ["1", True], [True, 0]):
        graph = {**base, "2": {"class_type": "Y", "inputs": {"a": value}}}
        assert graph_problems(graph) == [], value
