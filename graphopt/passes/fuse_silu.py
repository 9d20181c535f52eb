"""Replace ``x * Sigmoid(x)`` by one ``graphopt.SiLU(x)`` op.

``SiLU`` is an op of graphopt's own domain (``"graphopt"``), defined in
:mod:`graphopt.passes._functions` as the ONNX function ``Mul(X, Sigmoid(X))`` and
lowered to Relax's ``nn.silu``. Either operand order of the ``Mul`` matches; the Sigmoid
output must have no other users. Verification is unaffected: the reference runs the
user's original model.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Graph
from graphopt.passes._functions import GRAPHOPT_DOMAIN
from graphopt.passes._rewrite import Match, RewriteRule, rewrite_pass

__all__ = ["FuseSiLU", "SILU_RULES"]


def sigmoid_mul(op, x):  # noqa: ANN001, ANN201
    return op.Mul(x, op.Sigmoid(x))


def silu(op, x):  # noqa: ANN001, ANN201
    return op.SiLU(x, _domain=GRAPHOPT_DOMAIN)


def check(graph: Graph, match: Match) -> str | None:
    v = graph.values.get(match["x"])
    if v is None or not np.issubdtype(np.dtype(v.dtype), np.floating):
        return "the input is not a floating-point tensor"
    return None


SILU_RULES = [RewriteRule(sigmoid_mul, silu, check)]

FuseSiLU = rewrite_pass(
    "fuse-silu",
    SILU_RULES,
    "Replace x * Sigmoid(x) by one graphopt.SiLU op (lowered to Relax nn.silu).",
    after=("eliminate-redundant", "cse"),
)
