"""Common-subexpression elimination: one node per distinct (op, inputs, attributes).

Two nodes that apply the same op, with equal attributes, to the same input values
compute the same outputs, so the later one is dropped and its users read the earlier
one's outputs. Equal constants (same dtype, shape and bytes) are merged first, so two
``Reshape``s by equal but separately stored shape tensors also count as the same. Ops
with random results are never merged, and a node whose output is a graph output is kept
(the model's output names stay as they are).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.ir import Graph, Node
from graphopt.passes._base import Pass, PassResult
from graphopt.passes.fold_constants import _NONDETERMINISTIC

__all__ = ["EliminateCommonSubexpressions"]


def _attr_key(value: object) -> object:
    if isinstance(value, onnx.TensorProto | onnx.GraphProto | onnx.SparseTensorProto):
        return (type(value).__name__, value.SerializeToString())
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, list | tuple):
        return tuple(_attr_key(v) for v in value)
    return value


def _node_key(node: Node) -> tuple:
    attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
    outputs = tuple(bool(o) for o in node.outputs)
    return (node.domain, node.op_type, tuple(node.inputs), outputs, attrs)


def _users(graph: Graph) -> dict[str, list[Node]]:
    found: dict[str, list[Node]] = {}
    for node in graph.nodes():
        for i in dict.fromkeys(node.inputs):
            found.setdefault(i, []).append(node)
    return found


def _replace_uses(graph: Graph, users: dict[str, list[Node]], old: str, new: str) -> None:
    # Graph.replace_uses looks users up in O(graph size); the index makes this O(users).
    for node in users.pop(old, []):
        graph.set_inputs(node.name, [new if i == old else i for i in node.inputs])
        users.setdefault(new, []).append(node)


def _merge_constants(graph: Graph, users: dict[str, list[Node]], stats: Counter) -> None:
    first: dict[tuple, str] = {}
    outputs = set(graph.outputs)
    for name, arr in list(graph.constants.items()):
        if name in outputs or not users.get(name):
            continue
        digest = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()
        key = (str(arr.dtype), arr.shape, digest)
        keep = first.setdefault(key, name)
        if keep == name or not np.array_equal(graph.constants[keep], arr):  # hash collision
            continue
        _replace_uses(graph, users, name, keep)
        stats["constants"] += 1


@dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same op on the same inputs (and equal constants)."""

    name = "cse"
    after = ("fold-constants",)

    def run(self, graph: Graph) -> PassResult:
        stats: Counter = Counter()
        users = _users(graph)
        _merge_constants(graph, users, stats)
        seen: dict[tuple, Node] = {}
        outputs = set(graph.outputs)
        for node in graph.nodes():  # topological: inputs are already canonical
            if node.op_type in _NONDETERMINISTIC:
                continue
            key = _node_key(node)
            keep = seen.setdefault(key, node)
            if keep is node or any(o in outputs for o in node.outputs if o):
                continue
            graph.remove_node(node.name)
            for i in node.inputs:
                if node in users.get(i, ()):
                    users[i].remove(node)
            for mine, theirs in zip(node.outputs, keep.outputs, strict=True):
                if mine:
                    _replace_uses(graph, users, mine, theirs)
            stats[node.op_type] += 1
        return PassResult(graph, bool(stats), stats)
