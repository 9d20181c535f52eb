"""Evaluate nodes whose inputs are all constants, and ``Shape``/``Size`` of statically
known values.

Evaluation uses ONNX's own reference implementation (``onnx.reference``), so folding
follows the spec exactly. This turns the shape arithmetic that exporters emit
(``Shape -> Gather -> Concat -> Reshape``) into plain constants before lowering.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from graphopt.ir import Graph, Node
from graphopt.passes._base import Pass, PassResult

# Ops whose result depends on more than their inputs' values.
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


def _evaluate(graph: Graph, node: Node) -> list[np.ndarray]:
    inputs = [numpy_helper.from_array(graph.constants[i], i) for i in node.inputs if i]
    proto = helper.make_node(
        node.op_type, node.inputs, node.outputs, domain=node.domain or None, **node.attrs
    )
    outs = [helper.make_empty_tensor_value_info(o) for o in node.outputs if o]
    model = helper.make_model(
        helper.make_graph([proto], "fold", [], outs, inputs),
        opset_imports=[helper.make_opsetid("", graph.opset)],
    )
    results = ReferenceEvaluator(model).run(None, {})
    return [np.asarray(r) for r in results]


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace constant-input nodes (and Shape/Size of static values) by their results."""

    name = "fold-constants"
    after = ("eliminate-identity",)
    max_elements: int = 1 << 24

    def run(self, graph: Graph) -> PassResult:
        stats: Counter = Counter()
        for node in graph.nodes():
            if node.domain or node.op_type in _NONDETERMINISTIC:
                continue
            if node.op_type in ("Shape", "Size"):
                value = graph.values.get(node.inputs[0])
                if value is None or not value.is_static:
                    continue
                shape = np.array(value.shape, dtype=np.int64)
                start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
                size = np.array(np.prod(shape), dtype=np.int64)
                results = [shape[start:end] if node.op_type == "Shape" else size]
            elif all(not i or graph.is_constant(i) for i in node.inputs) and node.inputs:
                try:
                    results = _evaluate(graph, node)
                except Exception:  # let lowering report ops it cannot handle
                    continue
            else:
                continue
            if any(r.size > self.max_elements for r in results):
                continue
            graph.remove_node(node.name)
            for out, arr in zip([o for o in node.outputs if o], results, strict=True):
                graph.add_constant(out, arr)
            stats[node.op_type] += 1
        return PassResult(graph, bool(stats), stats)


__all__ = ["FoldConstants"]
_ = onnx  # keep the import explicit: folding follows the installed onnx's spec
