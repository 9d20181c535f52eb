"""benchmarks/bench_tuning.py's rounds and table: the A/A column (the default build's
second copy against the first) beside tuned/default, and the slowest used record's
kernel inside the model. No timing: scripted engines."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("tvm")

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return sys.modules[name]


class _Scripted:
    """An engine whose blocks read ``ms`` in turn."""

    def __init__(self, *ms: float) -> None:
        self.ms = list(ms)

    def block(self, seconds: float) -> float:
        return self.ms.pop(0)


def test_the_default_copy_is_paired_with_the_default_and_kept_out_of_the_engines():
    bt = _load("bench_tuning")
    engines = {
        "tuned": _Scripted(9.0, 9.0, 9.0, 9.0),
        "default": _Scripted(10.0, 10.0, 20.0, 10.0),
        bt.COPY: _Scripted(11.0, 10.5, 22.0, 11.0),  # 1.10, 1.05, 1.10, 1.10 round by round
        "ort": _Scripted(12.0, 12.0, 12.0, 12.0),
    }
    point = bt._point(5.0, 100, 3, engines, SimpleNamespace(block=0.0, rounds=4))
    assert set(point.ms) == {"tuned", "default", "ort"}  # the copy is no engine of the row
    ratio, low, high = point.aa
    assert ratio == pytest.approx(1.10) and low == pytest.approx(1.0875) and high <= 1.10
    assert point.vs["default"] == pytest.approx(0.9)  # tuned's ratios are unchanged by it
    curve = bt.Curve("m", [bt.Point(0.0, 0, 0, dict(point.ms)), point])
    text = bt.table([curve])
    header, _, row = text.splitlines()
    assert "| A/A | slowest kernel |" in header
    assert "| 0.90 (0.79-0.90) | 1.10 (1.09-1.10) | (3 not timed) |" in row  # no kernels given


def test_the_slowest_kernel_column_reads_the_worst_used_record_inside_the_model():
    bt = _load("bench_tuning")
    engines = {n: _Scripted(ms, ms) for n, ms in (("tuned", 9.0), ("default", 10.0), ("ort", 12.0))}
    kernels = {"fused_conv2d_a": 0.81, "fused_conv2d_b": 1.02, "fused_dense": 0.95}
    point = bt._point(30.0, 900, 3, engines, SimpleNamespace(block=0.0, rounds=2), kernels)
    curve = bt.Curve("m", [bt.Point(0.0, 0, 0, dict(point.ms)), point])
    header, _, row = bt.table([curve]).splitlines()
    cells = dict(zip(header.split("|"), row.split("|"), strict=True))
    assert cells[" slowest kernel "].strip() == "1.02"  # the worst, not the mean or best
    point.applied = 5  # two used records whose kernels no model run called: said so
    assert bt._slowest(point) == "1.02 (3 of 5 timed)"
    lines = bt._kernel_lines("m", point).splitlines()
    assert lines[1].strip() == "fused_conv2d_b: 1.020"  # the slowest first
    assert len(lines) == 1 + len(kernels)
    # with the kernels' A/A (the default's copy over the default): the largest beside
    point.kernels_aa = {"fused_conv2d_a": 0.97, "fused_conv2d_b": 1.06, "fused_dense": 1.01}
    assert bt._slowest(point) == "1.02 (A/A 1.06) (3 of 5 timed)"
    lines = bt._kernel_lines("m", point).splitlines()
    assert "A/A" in lines[0] and lines[1].strip() == "fused_conv2d_b: 1.020 (A/A 1.060)"
