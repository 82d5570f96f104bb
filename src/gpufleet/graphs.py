"""Shape checks for ComfyUI API-format graphs, before anything is queued. Pure, no I/O.

A graph is ``{node_id: {"class_type": str, "inputs": {name: value | [node_id, output]}}}``.
A link is a two-item list ``[source_node_id, output_index]`` and must name a node
of the same graph. Whether a class exists is the worker's call (``/object_info``
differs per image); gpufleet only refuses what no ComfyUI could run.
"""

from __future__ import annotations

from typing import Any

MAX_NODES = 5_000


def graph_problems(graph: Any) -> list[str]:
    """Every shape problem of ``graph``, as ``path: message`` lines; empty if it is fine."""
    if not isinstance(graph, dict):
        return ["payload: a ComfyUI graph must be an object of nodes"]
    if not graph:
        return ["payload: the graph has no nodes"]
    if len(graph) > MAX_NODES:
        return [f"payload: {len(graph)} nodes is more than {MAX_NODES}"]
    problems: list[str] = []
    for node_id, node in graph.items():
        problems += _node_problems(graph, f"payload.{node_id}", node)
    return problems


def _node_problems(graph: dict[Any, Any], where: str, node: Any) -> list[str]:
    if not isinstance(node, dict):
        return [f"{where}: a node must be an object"]
    problems: list[str] = []
    class_type = node.get("class_type")
    if not isinstance(class_type, str) or not class_type.strip():
        problems.append(f"{where}.class_type: required, a non-empty string")
    if "inputs" not in node:
        return [*problems, f"{where}.inputs: required, an object (may be empty)"]
    inputs = node["inputs"]
    if not isinstance(inputs, dict):
        return [*problems, f"{where}.inputs: must be an object"]
    for name, value in inputs.items():
        if not _is_link(value):
            continue
        if str(value[0]) not in graph:
            problems.append(
                f"{where}.inputs.{name}: links to node {value[0]!r}, which is not in the graph"
            )
        elif value[1] < 0:
            problems.append(f"{where}.inputs.{name}: output index {value[1]} is negative")
    return problems


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )
