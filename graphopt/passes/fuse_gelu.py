"""Replace the erf form of GELU, ``x * (1 + Erf(x / sqrt 2)) * 0.5``, by one
``graphopt.Gelu(x)`` op.

That is how torch exports ``nn.GELU()`` before opset 20 (five ops: Div, Erf, Add, Mul,
Mul); lowered one by one they make a kernel that calls libm's ``erff`` per element, and
the conv/matmul rules cannot take the Erf chain as an epilogue. ``graphopt.Gelu`` is
defined in :mod:`graphopt.passes._functions` as exactly that chain and lowered to Relax's
``nn.gelu``, which the CPU targets compute with a vectorized rational erf inside the
producing kernel. Matched forms: ``Mul(Mul(x, Add(Erf(Div(x, s)), 1)), 0.5)`` and
``Mul(Mul(x, 0.5), Add(Erf(Div(x, s)), 1))``, with ``Mul(x, 1/s)`` for the Div; ``s``
must be sqrt(2), the others 1 and 0.5 (scalar constants). Verification is unaffected:
the reference runs the user's original model.
"""

from __future__ import annotations

import math

import numpy as np

from graphopt.ir import Graph
from graphopt.passes._functions import GRAPHOPT_DOMAIN
from graphopt.passes._rewrite import Match, RewriteRule, rewrite_pass

__all__ = ["FuseGELU", "GELU_RULES"]


def erf_gelu(op, x, s, one, half):  # noqa: ANN001, ANN201
    return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, s)), one)), half)


def erf_gelu_half_first(op, x, s, one, half):  # noqa: ANN001, ANN201
    return op.Mul(op.Mul(x, half), op.Add(op.Erf(op.Div(x, s)), one))


def erf_gelu_scaled(op, x, s, one, half):  # noqa: ANN001, ANN201
    return op.Mul(op.Mul(x, op.Add(op.Erf(op.Mul(x, s)), one)), half)


def gelu(op, x, s, one, half):  # noqa: ANN001, ANN201, ARG001
    return op.Gelu(x, _domain=GRAPHOPT_DOMAIN)


def _scalar(graph: Graph, name: str) -> float | None:
    arr = graph.constants.get(name)
    if arr is None or arr.size != 1 or not np.issubdtype(arr.dtype, np.floating):
        return None
    return float(arr.reshape(()))


def _check(scale: float):  # noqa: ANN202
    def check(graph: Graph, match: Match) -> str | None:
        v = graph.values.get(match["x"])
        if v is None or not np.issubdtype(np.dtype(v.dtype), np.floating):
            return "the input is not a floating-point tensor"
        got = [_scalar(graph, match[k]) for k in ("s", "one", "half")]
        if None in got:
            return "a constant of the pattern is not a floating-point scalar"
        s, one, half = got
        if not (math.isclose(s, scale, rel_tol=1e-6) and one == 1.0 and half == 0.5):
            return f"constants {s}, {one}, {half} are not sqrt(2) (or its inverse), 1, 0.5"
        return None

    return check


GELU_RULES = [
    RewriteRule(erf_gelu, gelu, _check(math.sqrt(2))),
    RewriteRule(erf_gelu_half_first, gelu, _check(math.sqrt(2))),
    RewriteRule(erf_gelu_scaled, gelu, _check(1 / math.sqrt(2))),
]

FuseGELU = rewrite_pass(
    "fuse-gelu",
    GELU_RULES,
    "Replace x * (1 + Erf(x / sqrt 2)) * 0.5 by one graphopt.Gelu op (lowered to Relax nn.gelu).",
    after=("eliminate-redundant", "cse"),
)
