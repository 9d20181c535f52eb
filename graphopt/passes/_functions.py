"""Ops in graphopt's own ONNX domain, each defined as an ONNX function of standard ops.

A pass may replace a subgraph by one op of domain ``"graphopt"`` (``graphopt.SiLU``)
when that op lowers to a single Relax op. The function bodies here say what each op
means in plain ONNX, so a rewritten graph stays a valid, runnable ONNX model: ONNX shape
inference, ``onnx.printer`` dumps and onnxruntime (in tests) all read the definitions
attached by :func:`to_onnx`. Lowering lives in ``graphopt.lower`` like any other op.
"""

from __future__ import annotations

import onnx
from onnx import helper

from graphopt.ir import Graph, graph_to_onnx

__all__ = ["GRAPHOPT_DOMAIN", "FUNCTIONS", "to_onnx", "attach_functions"]

GRAPHOPT_DOMAIN = "graphopt"


def _silu() -> onnx.FunctionProto:
    """``SiLU(X) = X * Sigmoid(X)`` (also called Swish)."""
    return helper.make_function(
        GRAPHOPT_DOMAIN,
        "SiLU",
        ["X"],
        ["Y"],
        [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])],
        [helper.make_opsetid("", 13)],
    )


def _gelu() -> onnx.FunctionProto:
    """``Gelu(X) = X * (1 + Erf(X / sqrt 2)) * 0.5`` (ONNX's own Gelu from opset 20)."""

    def scalar(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node(
            "Constant",
            [],
            [name],
            value=helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]),
        )

    return helper.make_function(
        GRAPHOPT_DOMAIN,
        "Gelu",
        ["X"],
        ["Y"],
        [
            scalar("S", 1.4142135623730951),
            scalar("One", 1.0),
            scalar("Half", 0.5),
            helper.make_node("Div", ["X", "S"], ["D"]),
            helper.make_node("Erf", ["D"], ["E"]),
            helper.make_node("Add", ["E", "One"], ["E1"]),
            helper.make_node("Mul", ["X", "E1"], ["P"]),
            helper.make_node("Mul", ["P", "Half"], ["Y"]),
        ],
        [helper.make_opsetid("", 13)],
    )


# op_type (in domain "graphopt") -> its definition in standard ONNX ops.
FUNCTIONS: dict[str, onnx.FunctionProto] = {"SiLU": _silu(), "Gelu": _gelu()}


def attach_functions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Add the definitions (and the opset import) of the graphopt ops ``proto`` uses."""
    used = {
        n.op_type
        for n in proto.graph.node
        if n.domain == GRAPHOPT_DOMAIN and n.op_type in FUNCTIONS
    }
    have = {f.name for f in proto.functions if f.domain == GRAPHOPT_DOMAIN}
    for op in sorted(used - have):
        proto.functions.append(FUNCTIONS[op])
    if used and not any(o.domain == GRAPHOPT_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(GRAPHOPT_DOMAIN, 1))
    return proto


def to_onnx(graph: Graph) -> onnx.ModelProto:
    """``graph_to_onnx`` plus the definitions of any graphopt-domain ops it holds."""
    return attach_functions(graph_to_onnx(graph))
