"""Fold an inference-mode ``BatchNormalization`` into the ``Conv``, ``ConvTranspose`` or
``Gemm`` that feeds it.

With ``s = gamma / sqrt(var + eps)`` per output channel::

    Conv:          W_fused = W * s[:, None, ...]               (W: [C_out, C_in/g, k...])
    ConvTranspose: W_fused = W * s per output channel          (W: [C_in, C_out/g, k...],
                                                                 channel g*C_out/g + j)
    Gemm:          B_fused = B * s[None, :]  (transB=0)  or  B * s[:, None]  (transB=1)
    bias:          b_fused = (b - mean) * s + beta             (Gemm: b = beta_gemm * C,
                                                                 then beta_gemm = 1)

The rule fires only when the producer's weight (and bias, if any) and all BatchNorm
parameters are constants and the producer's output feeds nothing but that BatchNorm.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from graphopt.ir import Graph, Node
from graphopt.passes._base import Pass, PassResult

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def check(graph: Graph, bn: Node) -> str | None:
    """Return why ``bn`` cannot be folded, or None when it can."""
    if bn.attrs.get("training_mode", 0):
        return "BatchNormalization in training mode"
    if len([o for o in bn.outputs if o]) != 1:
        return "BatchNormalization exposes running statistics"
    prod = graph.producer(bn.inputs[0])
    if prod is None or prod.op_type not in _PRODUCERS or prod.domain:
        return "input is not produced by a Conv, ConvTranspose or Gemm"
    if not all(graph.is_constant(i) for i in bn.inputs[1:5]):
        return "BatchNorm parameters are not constants"
    if not all(graph.is_constant(i) for i in prod.inputs[1:] if i):
        return f"{prod.op_type} weight or bias is not a constant"
    if len(graph.consumers(prod.outputs[0])) != 1 or prod.outputs[0] in graph.outputs:
        return f"{prod.op_type} output has other users"
    return None


def _bias(graph: Graph, node: Node, n_out: int) -> np.ndarray:
    if len(node.inputs) > 2 and node.inputs[2]:
        return graph.constants[node.inputs[2]].astype(np.float64)
    return np.zeros(n_out)


def _fold_weight(node: Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op_type == "ConvTranspose":
        group = node.attrs.get("group", 1)
        per_group = w.shape[1]
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        scale = s.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))
        return (grouped * scale).reshape(w.shape)
    # Gemm: the output columns are B's columns (transB=0) or rows (transB=1)
    return w * (s[:, None] if node.attrs.get("transB", 0) else s[None, :])


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm weight and bias."""

    name = "fold-batchnorm"
    after = ("fold-constants",)

    def run(self, graph: Graph) -> PassResult:
        stats: Counter = Counter()
        for bn in graph.nodes():
            if bn.op_type != "BatchNormalization" or bn.domain:
                continue
            if check(graph, bn) is not None:
                stats["declined"] += 1
                continue
            prod = graph.producer(bn.inputs[0])
            gamma, beta, mean, var = (graph.constants[i].astype(np.float64) for i in bn.inputs[1:5])
            w = graph.constants[prod.inputs[1]]
            s = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
            bias = _bias(graph, prod, len(s))
            attrs = dict(prod.attrs)
            if prod.op_type == "Gemm":
                bias = bias * attrs.get("beta", 1.0)
                attrs["beta"] = 1.0
            new_w = _fold_weight(prod, w.astype(np.float64), s).astype(w.dtype)
            new_b = ((bias - mean) * s + beta).astype(w.dtype)
            w_name = graph.add_constant(graph.unique_name(prod.inputs[1] + "_bnfold"), new_w)
            b_name = graph.add_constant(graph.unique_name(prod.name + "_bias_bnfold"), new_b)
            out = bn.outputs[0]
            graph.remove_node(bn.name)
            graph.remove_node(prod.name)
            inputs = [prod.inputs[0], w_name, b_name]
            graph.add_node(Node(prod.name, prod.op_type, inputs, [out], attrs))
            stats["folded"] += 1
            if prod.op_type != "Conv":
                stats[f"folded into {prod.op_type}"] += 1
        return PassResult(graph, stats["folded"] > 0, stats)


__all__ = ["FoldBatchNorm", "check"]
