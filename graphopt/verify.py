"""Check an artifact's numbers against a reference implementation, on inputs made here.

``random_inputs`` makes the seeded inputs verification (and ``graphopt run``) uses when
the user gives none. This module sits low: it imports no other graphopt module but the
errors, so frontends may use it.

For ONNX input the reference is onnxruntime (all graph optimizations off, so it computes
the model as written). Outputs match when ``|actual - expected| <= atol' + rtol * |expected|``
element-wise (``numpy.allclose``), defaults ``rtol=1e-3``, ``atol=1e-4``, and ``atol'`` is
``atol * max(1, max |expected|)`` per output (``Tolerance.scaled``; an ``atol`` the user
gives is absolute). Rounding in float32 is relative to the magnitudes a kernel sums, not
absolute: a 3x3 conv of 64 channels on standard-normal data and weights has outputs up to
~117, where onnxruntime itself is 3.6e-5 off float64, the direct conv 9.9e-5 off
onnxruntime and the Winograd one 2.7e-4 (2.3e-6 of the range); a fixed ``atol=1e-4``
refused that correct artifact. An output within [-1, 1] is held to the same bound as
with a fixed ``atol``; a miscompiled kernel is off by the order of the range and fails.
An artifact that computes in bf16/fp16 is held to ``PRECISION_TOLERANCES`` instead. NaN must meet
NaN and an infinity the same infinity; the report counts such matches per output
(``nonfinite_matched``) so a model that outputs NaN does not pass as "max |diff| 0".
Integer and bool outputs (indices, masks, counts) match only when equal element for
element: no tolerance applies (their entry says ``"exact": true``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.errors import InputError

__all__ = [
    "DEFAULT_RTOL",
    "DEFAULT_ATOL",
    "PRECISION_TOLERANCES",
    "tolerances",
    "Tolerance",
    "compare",
    "onnxruntime_reference",
    "random_inputs",
]

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4
# (rtol, atol) per compute precision. bf16 keeps 8 significant bits (unit roundoff
# 2**-8), fp16 11 (2**-11); products are summed in fp32, but the rounding of every
# conv/matmul input compounds through a deep network: relative output errors of 0.6%
# (ResNet-50) to 5% (the zoo's MobileNetV2), the same as OpenVINO's bf16. Their ``atol``,
# as fp32's, is relative to each output's range (``Tolerance.scaled``): the bound used is
# ``atol * max(1, max |expected|)``. A miscompiled kernel is off by the order of the
# range and still fails; how much accuracy a model keeps is `graphopt evaluate`'s job.
PRECISION_TOLERANCES = {
    "fp32": (DEFAULT_RTOL, DEFAULT_ATOL),
    "bf16": (5e-2, 1e-1),
    "fp16": (1e-2, 1.25e-2),
}
EXACT_KINDS = "biu"  # numpy dtype kinds compared without tolerance: bool, int, uint


@dataclass(frozen=True)
class Tolerance:
    """What outputs are held to: ``|a - e| <= atol' + rtol * |e|``, ``atol' = atol``, or
    with ``scaled`` (the default's) ``atol * max(1, max |e|)`` per output."""

    rtol: float
    atol: float
    scaled: bool = False
    precision: str = "fp32"

    def note(self) -> str:
        """``", bf16 tolerances, atol relative to each output's range"``; for fp32 only the
        second half, and "" with an absolute ``atol``."""
        scaled = ", atol relative to each output's range" if self.scaled else ""
        return scaled if self.precision == "fp32" else f", {self.precision} tolerances{scaled}"


def tolerances(precision: str, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """The :class:`Tolerance` for outputs computed in ``precision``; a given value wins
    (a given ``atol`` is absolute, the default one relative to each output's range)."""
    prec_rtol, prec_atol = PRECISION_TOLERANCES[precision]
    return Tolerance(
        prec_rtol if rtol is None else rtol,
        prec_atol if atol is None else atol,
        scaled=atol is None,
        precision=precision,
    )


def onnxruntime_reference(proto: onnx.ModelProto) -> Callable[[dict], dict]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3  # its shape warnings are about the model, not the check
    session = ort.InferenceSession(
        proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]

    def run(inputs: dict) -> dict:
        return dict(zip(names, session.run(names, inputs), strict=True))

    return run


def compare(
    actual: dict, expected: dict, rtol: float, atol: float, *, scaled: bool = False
) -> dict:
    """Compare output dicts; return a JSON-able report with ``ok`` and per-output stats.
    ``scaled``: each float output's ``atol`` is ``atol * max(1, max |expected|)`` (its
    entry records the bound used as ``atol_used``)."""
    outputs = []
    first_bad = None
    given_atol = atol
    for name, exp in expected.items():
        got = np.asarray(actual[name])
        exp = np.asarray(exp)
        entry = {"name": name}
        atol = given_atol
        if scaled and exp.dtype.kind == "f" and np.isfinite(exp).any():
            atol = given_atol * max(1.0, float(np.max(np.abs(exp[np.isfinite(exp)]))))
            entry["atol_used"] = atol
        if got.shape != exp.shape or got.dtype != exp.dtype:
            entry.update(
                ok=False,
                reason=f"shape/dtype {got.shape}:{got.dtype} vs reference {exp.shape}:{exp.dtype}",
            )
        elif exp.dtype.kind in EXACT_KINDS:
            entry.update(_compare_exact(got, exp))
        else:
            diff = np.abs(got.astype(np.float64) - exp.astype(np.float64))
            finite = np.isfinite(exp) & np.isfinite(got)
            same_nonfinite = np.array_equal(np.isnan(got), np.isnan(exp)) and np.array_equal(
                got[np.isinf(exp)], exp[np.isinf(exp)]
            )
            ok = (
                bool(np.allclose(got, exp, rtol=rtol, atol=atol, equal_nan=True)) and same_nonfinite
            )
            entry.update(ok=ok, max_abs_diff=float(diff[finite].max()) if finite.any() else 0.0)
            # NaN/inf equal on both sides pass, but "max |diff| 0" alone would hide them
            both = ~np.isfinite(exp) & ~np.isfinite(got)
            same = (np.isnan(exp) & np.isnan(got)) | (np.isinf(exp) & (got == exp))
            if (both & same).any():
                entry["nonfinite_matched"] = int((both & same).sum())
            if not ok:
                tol = atol + rtol * np.abs(exp.astype(np.float64))
                off = ~finite & ~same  # NaN/inf on one side only, or different infinities
                entry["mismatched"] = int(((diff > tol) & finite).sum() + off.sum())
                entry["nonfinite_mismatched"] = int(off.sum())
        outputs.append(entry)
        if not entry["ok"] and first_bad is None:
            first_bad = entry
    return {
        "ok": first_bad is None,
        "rtol": rtol,
        "atol": given_atol,
        "atol_scaled": scaled,
        "outputs": outputs,
        "first_mismatch": first_bad,
    }


def _compare_exact(got: np.ndarray, exp: np.ndarray) -> dict:
    """Integer and bool outputs: equal or not; a tolerance would pass an off-by-one index."""
    differ = got != exp
    diff = np.abs(got.astype(np.float64) - exp.astype(np.float64))
    entry = {
        "ok": not differ.any(),
        "exact": True,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
    }
    if differ.any():
        entry.update(mismatched=int(differ.sum()), nonfinite_mismatched=0)
    return entry


def random_inputs(specs: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal floats, small non-negative ints, random bools."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        if dtype.kind == "f":
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec["name"]] = rng.integers(0, 10, shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec["name"]] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise InputError(f"cannot make random inputs of dtype {dtype} for {spec['name']!r}")
    return out
