"""Fold a ``Mul`` or ``Add`` by a per-output-channel constant into the preceding ``Conv``.

With ``c`` a scalar or of shape ``[C_out, 1, 1]`` or ``[1, C_out, 1, 1]`` (one value per
output channel; a plain ``[C_out]`` vector is refused: it broadcasts along the last
spatial axis, not the channel axis)::

    Mul(Conv(x, W, b), c) = Conv(x, W * c[:, None, ...], b * c)
    Add(Conv(x, W, b), c) = Conv(x, W, b + c)

(a missing ``b`` is zero). Either operand order of ``Mul``/``Add`` matches. The rule
declines when ``W``, ``b`` or ``c`` is not a constant, when ``c`` varies along any axis
but the channel axis, when dtypes differ, or when the Conv output has other users.
Run after ``fold-constants`` (so weights are constants) and ``fold-batchnorm``.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Graph
from graphopt.passes._rewrite import Match, RewriteRule, rewrite_pass

__all__ = ["FoldConvMulAdd", "CONV_MUL_ADD_RULES"]


def conv_bias_mul(op, x, w, b, c):  # noqa: ANN001, ANN201
    return op.Mul(op.Conv(x, w, b), c)


def conv_mul(op, x, w, c):  # noqa: ANN001, ANN201
    return op.Mul(op.Conv(x, w), c)


def conv_bias_add(op, x, w, b, c):  # noqa: ANN001, ANN201
    return op.Add(op.Conv(x, w, b), c)


def conv_add(op, x, w, c):  # noqa: ANN001, ANN201
    return op.Add(op.Conv(x, w), c)


def _channels(graph: Graph, match: Match) -> np.ndarray:
    """``c`` as one value per output channel, shape ``[C_out]``."""
    c = graph.constants[match["c"]]
    n_out = graph.constants[match["w"]].shape[0]
    return np.broadcast_to(c.reshape(-1) if c.size > 1 else c.reshape(()), (n_out,))


def _bias(op, w: str, b: str | None) -> np.ndarray:  # noqa: ANN001
    weight = op.value(w)
    return op.value(b) if b is not None else np.zeros(weight.shape[0], weight.dtype)


def _fold_mul(op, x, w, c, b=None):  # noqa: ANN001, ANN201
    weight = op.value(w)
    scale = _channels(op.graph, op.match).astype(weight.dtype)
    new_w = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_b = _bias(op, w, b) * scale
    return op.Conv(x, new_w, new_b, **op.match.node("Conv").attrs)


def _fold_add(op, x, w, c, b=None):  # noqa: ANN001, ANN201
    weight = op.value(w)
    new_b = _bias(op, w, b) + _channels(op.graph, op.match).astype(weight.dtype)
    return op.Conv(x, w, new_b, **op.match.node("Conv").attrs)


def check(graph: Graph, match: Match) -> str | None:
    """Why this Conv + Mul/Add cannot fold, or None."""
    names = [match[k] for k in ("w", "b", "c") if k in match.values]
    missing = [n for n in names if not graph.is_constant(n)]
    if missing:
        return f"{missing[0]!r} is not a constant"
    out = graph.values.get(match.node("Conv").outputs[0])
    if out is None or out.shape is None:
        return "the Conv output's rank is unknown"
    c = graph.constants[match["c"]]
    w = graph.constants[match["w"]]
    rank, n_out = len(out.shape), w.shape[0]
    if c.dtype != w.dtype:
        return f"the constant is {c.dtype}, the weight {w.dtype}"
    if c.ndim > rank:
        return f"the constant has rank {c.ndim} > {rank} (it would broadcast the output)"
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for k, d in enumerate(shape) if k != 1) or shape[1] not in (1, n_out):
        return f"the constant of shape {c.shape} is not per output channel"
    return None


CONV_MUL_ADD_RULES = [
    RewriteRule(conv_bias_mul, _fold_mul, check),
    RewriteRule(conv_mul, _fold_mul, check),
    RewriteRule(conv_bias_add, _fold_add, check),
    RewriteRule(conv_add, _fold_add, check),
]

FoldConvMulAdd = rewrite_pass(
    "fold-conv-mul-add",
    CONV_MUL_ADD_RULES,
    "Fold a Mul/Add by a per-output-channel constant into the preceding Conv's weights/bias.",
    after=("fold-constants", "fold-batchnorm"),
)
