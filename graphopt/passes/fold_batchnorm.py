"""Fold an inference-mode ``BatchNormalization`` into the ``Conv`` that feeds it.

With ``s = gamma / sqrt(var + eps)`` per output channel::

    W_fused = W * s[:, None, ...]
    b_fused = (b - mean) * s + beta

The rule fires only when the Conv's weight (and bias, if any) and all BatchNorm
parameters are constants and the Conv output feeds nothing but that BatchNorm.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from graphopt.ir import Graph, Node
from graphopt.passes._base import Pass, PassResult


def check(graph: Graph, bn: Node) -> str | None:
    """Return why ``bn`` cannot be folded, or None when it can."""
    if bn.attrs.get("training_mode", 0):
        return "BatchNormalization in training mode"
    if len([o for o in bn.outputs if o]) != 1:
        return "BatchNormalization exposes running statistics"
    conv = graph.producer(bn.inputs[0])
    if conv is None or conv.op_type != "Conv" or conv.domain:
        return "input is not produced by a Conv"
    if not all(graph.is_constant(i) for i in bn.inputs[1:5]):
        return "BatchNorm parameters are not constants"
    if not all(graph.is_constant(i) for i in conv.inputs[1:] if i):
        return "Conv weight or bias is not a constant"
    if len(graph.consumers(conv.outputs[0])) != 1 or conv.outputs[0] in graph.outputs:
        return "Conv output has other users"
    return None


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the preceding Conv's weight and bias."""

    name = "fold-batchnorm"

    def run(self, graph: Graph) -> PassResult:
        stats: Counter = Counter()
        for bn in graph.nodes():
            if bn.op_type != "BatchNormalization" or bn.domain:
                continue
            if check(graph, bn) is not None:
                stats["declined"] += 1
                continue
            conv = graph.producer(bn.inputs[0])
            gamma, beta, mean, var = (graph.constants[i].astype(np.float64) for i in bn.inputs[1:5])
            w = graph.constants[conv.inputs[1]]
            bias = (
                graph.constants[conv.inputs[2]] if len(conv.inputs) > 2 and conv.inputs[2] else 0.0
            )
            s = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
            new_w = (w * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
            new_b = ((bias - mean) * s + beta).astype(w.dtype)
            w_name = graph.add_constant(graph.unique_name(conv.inputs[1] + "_bnfold"), new_w)
            b_name = graph.add_constant(graph.unique_name(conv.name + "_bias_bnfold"), new_b)
            out = bn.outputs[0]
            graph.remove_node(bn.name)
            graph.remove_node(conv.name)
            graph.add_node(
                Node(conv.name, "Conv", [conv.inputs[0], w_name, b_name], [out], dict(conv.attrs))
            )
            stats["folded"] += 1
        return PassResult(graph, stats["folded"] > 0, stats)


__all__ = ["FoldBatchNorm", "check"]
