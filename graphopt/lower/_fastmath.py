"""TOPI's polynomial activations on one element (``tirx.PrimExpr`` in, out).

TOPI's ``fast_exp``/``fast_tanh``/``fast_erf`` take and make tensors. Kernels built
element by element need the same numbers as one expression: the CPU legalization's SiLU
and GELU (``targets/_cpu_schedules.py``: one expression keeps the fused kernel a chain the
conv rules inline; a tensor-level fast_exp would make a second block reading the conv's
output) and the whole-layer recurrent kernel (``lower/_rnn_sequence.py``, whose gates then
match the unrolled expansion's legalized Sigmoid/Tanh).
"""

from __future__ import annotations

from tvm import tirx

__all__ = ["f32", "fast_erf_expr", "fast_exp_expr", "fast_tanh_expr"]

_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
          5.0000001201e-1)  # fmt: skip
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
              -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
              -1.60960333262415e-02)  # fmt: skip
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
             -7.37332916720468e-03, -1.42647390514189e-02)  # fmt: skip


def f32(v: float) -> tirx.PrimExpr:
    return tirx.const(v, "float32")


def _horner(x: tirx.PrimExpr, coefficients: tuple) -> tirx.PrimExpr:
    acc = f32(coefficients[0])
    for c in coefficients[1:]:
        acc = acc * x + f32(c)
    return acc


def fast_exp_expr(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) in float32 as TOPI's ``fast_exp`` computes it (Cephes: 2^n * a degree-7
    polynomial of the remainder), on one element."""
    v = tirx.max(tirx.min(x, f32(88.3762626647950)), f32(-88.3762626647949))
    n = tirx.floor(v * f32(1.44269504088896341) + f32(0.5))
    f = v - n * f32(0.6931471805599453)
    y = _horner(f, _EXP_P) * f * f + f + f32(1.0)
    two_n = tirx.reinterpret(
        "float32", tirx.shift_left(tirx.Cast("int32", n + f32(127.0)), tirx.const(23, "int32"))
    )
    return tirx.max(two_n * y, x)


def fast_erf_expr(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """erf(x) in float32 as TOPI's ``fast_erf`` (Eigen's rational approximation on
    [-4, 4]), on one element."""
    v = tirx.max(tirx.min(x, f32(4.0)), f32(-4.0))
    v2 = v * v
    return v * _horner(v2, _ERF_ALPHA) / _horner(v2, _ERF_BETA)


_TANH_ALPHA = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
               5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
               4.89352455891786e-03)  # fmt: skip
_TANH_BETA = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
              4.89352518554385e-03)  # fmt: skip


def fast_tanh_expr(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """tanh(x) in float32 as TOPI's ``fast_tanh`` (Eigen's 13/6-degree rational
    approximation on [-9, 9]), on one element."""
    v = tirx.max(f32(-9.0), tirx.min(f32(9.0), x))
    v2 = v * v
    return v * _horner(v2, _TANH_ALPHA) / _horner(v2, _TANH_BETA)
