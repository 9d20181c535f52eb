"""Remove data movement that does nothing: Reshape of Reshape, Transposes that cancel,
Casts to the type a value already has, and Reshapes to the shape a value already has.

The rules, first match wins::

    Reshape(Reshape(x, s1), s2) -> Reshape(x, shape of the result)    (static shapes)
    Reshape(x, s)               -> x          when x already has the result's shape
    Transpose(Transpose(x, p1), p2) -> x      when p1[p2[i]] == i for every i
                                    -> Transpose(x, perm=[p1[p2[i]] ...]) otherwise
    Transpose(x, p)             -> x          when p is the identity permutation
    Cast(x, to=T)               -> x          when x already has type T

A Reshape pair is only merged when the final shape is known statically (the new shape
tensor is that shape, so ``0`` and ``-1`` entries of the originals cannot mislead it).
Run after ``fold-constants`` so shape tensors are constants.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from graphopt.ir import Graph
from graphopt.passes._rewrite import Match, RewriteRule, rewrite_pass

__all__ = ["EliminateRedundant", "REDUNDANT_RULES"]


def _static(graph: Graph, name: str) -> tuple[int, ...] | None:
    v = graph.values.get(name)
    return tuple(v.shape) if v is not None and v.is_static else None


def _perm(node, rank: int) -> list[int]:  # noqa: ANN001
    return list(node.attrs.get("perm", range(rank)[::-1]))


# Reshape(Reshape(x)) ---------------------------------------------------------------


def reshape_reshape(op, x, s1, s2):  # noqa: ANN001, ANN201
    return op.Reshape(op.Reshape(x, s1), s2)


def _merged_reshape(op, x, s1, s2):  # noqa: ANN001, ANN201
    shape = _static(op.graph, op.match.root.outputs[0])
    return op.Reshape(x, np.array(shape, dtype=np.int64))


def _check_reshape_reshape(graph: Graph, match: Match) -> str | None:
    if _static(graph, match.root.outputs[0]) is None:
        return "the result's shape is not static"
    if any(n.attrs.get("allowzero", 0) for n in match.nodes):
        return "allowzero=1"
    return None


# Reshape(x) to x's own shape -------------------------------------------------------


def reshape_noop(op, x, s):  # noqa: ANN001, ANN201
    return op.Reshape(x, s)


def _keep_input(op, x):  # noqa: ANN001, ANN201
    return x


def _check_reshape_noop(graph: Graph, match: Match) -> str | None:
    before, after = _static(graph, match["x"]), _static(graph, match.root.outputs[0])
    if before is None or before != after:
        return "the shape changes"
    return None


# Transpose(Transpose(x)) -----------------------------------------------------------


def transpose_transpose(op, x):  # noqa: ANN001, ANN201
    return op.Transpose(op.Transpose(x))


def _composed(graph: Graph, match: Match) -> list[int]:
    outer, inner = match.nodes  # root first
    rank = len(graph.values[match["x"]].shape)
    p1, p2 = _perm(inner, rank), _perm(outer, rank)
    return [p1[p2[i]] for i in range(rank)]


def _one_transpose(op, x):  # noqa: ANN001, ANN201
    perm = _composed(op.graph, op.match)
    if perm == sorted(perm):
        return x
    return op.Transpose(x, perm=perm)


def _check_transpose_transpose(graph: Graph, match: Match) -> str | None:
    v = graph.values.get(match["x"])
    return None if v is not None and v.shape is not None else "the input's rank is unknown"


# Transpose(x, identity) ------------------------------------------------------------


def transpose_identity(op, x):  # noqa: ANN001, ANN201
    return op.Transpose(x)


def _check_transpose_identity(graph: Graph, match: Match) -> str | None:
    v = graph.values.get(match["x"])
    if v is None or v.shape is None:
        return "the input's rank is unknown"
    perm = _perm(match.root, len(v.shape))
    return None if perm == sorted(perm) else "the permutation is not the identity"


# Cast(x, to=type of x) -------------------------------------------------------------


def cast_noop(op, x):  # noqa: ANN001, ANN201
    return op.Cast(x)


def _check_cast_noop(graph: Graph, match: Match) -> str | None:
    v = graph.values.get(match["x"])
    to = helper.tensor_dtype_to_np_dtype(match.root.attrs["to"])
    if v is None or np.dtype(v.dtype) != to:
        return f"casts {v.dtype if v else 'unknown'} to {to}"
    out = graph.values.get(match.root.outputs[0])
    if out is not None and out.shape != v.shape:  # shape inference knows more after it
        return f"its output shape {out.shape} differs from its input's {v.shape}"
    return None


REDUNDANT_RULES = [
    RewriteRule(reshape_reshape, _merged_reshape, _check_reshape_reshape),
    RewriteRule(reshape_noop, _keep_input, _check_reshape_noop),
    RewriteRule(transpose_transpose, _one_transpose, _check_transpose_transpose),
    RewriteRule(transpose_identity, _keep_input, _check_transpose_identity),
    RewriteRule(cast_noop, _keep_input, _check_cast_noop),
]

EliminateRedundant = rewrite_pass(
    "eliminate-redundant",
    REDUNDANT_RULES,
    "Drop Reshape-of-Reshape, cancelling Transposes, same-type Casts and no-op Reshapes.",
    after=("fold-constants",),
)
