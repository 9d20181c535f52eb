"""The op table: which ONNX ops lower, and the static checks that refuse attribute values.

Checks here run without TVM, so ``graphopt inspect`` can name every op that would fail
before a compile starts. The converters themselves live in :mod:`graphopt.lower.relax`.
"""

from __future__ import annotations

from collections.abc import Callable

from graphopt.ir import Graph, Node

_FLOAT = ("float32",)


def _needs_const(*positions: int) -> Callable[[Graph, Node], str | None]:
    def check(graph: Graph, node: Node) -> str | None:
        for p in positions:
            if len(node.inputs) > p and node.inputs[p] and not graph.is_constant(node.inputs[p]):
                return f"input {p} ({node.inputs[p]!r}) must be a constant"
        return None

    return check


def _check_conv(graph: Graph, node: Node) -> str | None:
    value = graph.values.get(node.inputs[0])
    if value is None or value.shape is None or len(value.shape) not in (3, 4):
        return "only 1-D and 2-D convolutions are supported"
    return None


def _check_pool(graph: Graph, node: Node) -> str | None:
    if len([o for o in node.outputs if o]) > 1:
        return "the Indices output is not supported"
    value = graph.values.get(node.inputs[0])
    if value is None or value.shape is None or len(value.shape) not in (3, 4):
        return "only 1-D and 2-D pooling is supported"
    if node.attrs.get("storage_order", 0):
        return "storage_order=1 is not supported"
    return None


def _check_bn(graph: Graph, node: Node) -> str | None:
    if node.attrs.get("training_mode", 0) or len([o for o in node.outputs if o]) > 1:
        return "training-mode BatchNormalization is not supported"
    return None


def _check_softmax(graph: Graph, node: Node) -> str | None:
    return None


def _check_pad(graph: Graph, node: Node) -> str | None:
    mode = node.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return f"mode={mode!r} is not supported (only 'constant')"
    return _needs_const(1, 2, 3)(graph, node)


def _ok(graph: Graph, node: Node) -> str | None:
    return None


# op_type -> static check. The converter for each key lives in graphopt.lower.relax.
CONVERTERS: dict[str, Callable[[Graph, Node], str | None]] = {
    "Conv": _check_conv,
    "BatchNormalization": _check_bn,
    "MaxPool": _check_pool,
    "AveragePool": _check_pool,
    "GlobalAveragePool": _ok,
    "GlobalMaxPool": _ok,
    "Gemm": _ok,
    "MatMul": _ok,
    "Add": _ok,
    "Sub": _ok,
    "Mul": _ok,
    "Div": _ok,
    "Pow": _ok,
    "Max": _ok,
    "Min": _ok,
    "Relu": _ok,
    "LeakyRelu": _ok,
    "Sigmoid": _ok,
    "HardSigmoid": _ok,
    "HardSwish": _ok,
    "Tanh": _ok,
    "Exp": _ok,
    "Log": _ok,
    "Sqrt": _ok,
    "Neg": _ok,
    "Abs": _ok,
    "Erf": _ok,
    "Reciprocal": _ok,
    "Gelu": _ok,
    "Clip": _needs_const(1, 2),
    "Softmax": _check_softmax,
    "LogSoftmax": _check_softmax,
    "Concat": _ok,
    "Reshape": _needs_const(1),
    "Flatten": _ok,
    "Transpose": _ok,
    "Squeeze": _needs_const(1),
    "Unsqueeze": _needs_const(1),
    "ReduceMean": _needs_const(1),
    "ReduceSum": _needs_const(1),
    "ReduceMax": _needs_const(1),
    "Identity": _ok,
    "Dropout": _ok,
    "Cast": _ok,
    "Gather": _ok,
    "Slice": _needs_const(1, 2, 3, 4),
    "Pad": _check_pad,
    # graphopt's own domain: ops a pass makes (definitions in graphopt.passes._functions)
    "graphopt::SiLU": _ok,
}


def converter_key(node: Node) -> str:
    """The key of ``node`` in ``CONVERTERS``: the op type, domain-qualified unless ONNX's."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


# Ops with no converter because a graph pass rewrites them into ops that have one.
_EXPANDED_BY_PASS: dict[str, str] = {
    op: "expanded by the expand-rnn pass, which did not run" for op in ("LSTM", "GRU", "RNN")
}


def unsupported_nodes(graph: Graph) -> list[tuple[str, str, str]]:
    """Every node graphopt cannot lower, as ``(op_type, node_name, reason)``."""
    found = []
    for node in graph.nodes():
        if node.domain not in ("", "ai.onnx") and converter_key(node) not in CONVERTERS:
            found.append((f"{node.domain}::{node.op_type}", node.name, "custom op domain"))
            continue
        check = CONVERTERS.get(converter_key(node))
        if check is None:
            found.append((node.op_type, node.name, _EXPANDED_BY_PASS.get(node.op_type, "")))
            continue
        reason = check(graph, node)
        if reason:
            found.append((node.op_type, node.name, reason))
    return found
