"""benchmarks/bench_public.py's table: ratios, geometric means, failed rows, markdown,
and the --models parser. No timing: benchmarks are not tests."""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("bench_public", _BENCH / "bench_public.py")
bp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_public", bp)  # dataclasses look their module up there
_spec.loader.exec_module(bp)


def _rows():
    return [
        bp.Row("fast", 2.0, 4.0, 1.0, 8e9, 100.0, 3.25),
        bp.Row("slow", 6.0, 2.0, None, 3e9, 99.96, 10.0, notes=["2 kernels on generic rules"]),
        bp.Row("broken", ort_ms=1.0, error="VerificationError: max |diff| 3 | 7"),
    ]


def test_ratios_gflops_and_geomean_against_numpy():
    fast, slow, broken = _rows()
    assert fast.vs_ort == pytest.approx(0.5) and slow.vs_ort == pytest.approx(3.0)
    assert fast.gflops == pytest.approx(8e9 / 2e-3 / 1e9)
    assert slow.vs_openvino is None and broken.vs_ort is None and broken.gflops is None
    want = float(np.exp(np.mean(np.log([0.5, 3.0]))))
    assert bp.geomean([fast.vs_ort, slow.vs_ort, broken.vs_ort]) == pytest.approx(want)
    assert bp.geomean([None]) is None


def test_markdown_table_one_row_per_model_and_failures_kept():
    text = bp.markdown_table(_rows(), ["# header", "machine: X"])
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert lines[:2] == ["# header", "machine: X"]
    assert len(table) == 2 + 3  # header, alignment, one per model
    assert all(line.count(" | ") == len(bp.COLUMNS) - 1 for line in table[2:])
    fast, slow, broken = (line.split(" | ") for line in table[2:])
    assert fast[4] == "0.50x" and fast[5] == "2.00x" and fast[7] == "100.0%"
    assert slow[5] == "-" and slow[7] == "99.9%"  # coverage never rounds up to 100
    assert "FAILED: VerificationError" in broken[-1] and "\\|" in broken[-1]
    gm = float(np.exp(np.mean(np.log([0.5, 3.0]))))
    assert f"geometric mean graphopt/onnxruntime: {gm:.2f}x over 2 of 3 models" in lines


def test_model_names_groups_and_unknown():
    pm = pytest.importorskip("_public_models")  # needs torch; bench_public put it on the path
    assert bp.model_names("all") == list(pm.MODELS)
    assert bp.model_names("resnet18,issue14,resnet18") == ["resnet18"] + [
        m.name for m in pm.ISSUE14
    ]
    with pytest.raises(SystemExit, match="unknown model 'nope'"):
        bp.model_names("nope")


def test_parse_args_quick_blocks():
    assert bp.parse_args(["--quick"]).block == bp.QUICK_BLOCK_S
    assert bp.parse_args([]).block == 0.5


def test_ratio_is_the_median_of_round_ratios():
    # a slow stretch (round 2 doubles every engine) moves both sides of that round's ratio
    figures = {"graphopt": [2.0, 4.4, 2.4], "ORT": [2.0, 4.0, 1.6], "OpenVINO": [1.0, 2.0, 1.0]}
    paired = bp.paired_ratios(figures, "graphopt")
    assert paired == {"ORT": pytest.approx(1.1), "OpenVINO": pytest.approx(2.2)}
    row = bp.Row("m", 2.4, 2.0, 1.0, paired=paired)
    assert row.vs_ort == pytest.approx(1.1)  # not 2.4 / 2.0 from the medians alone
    assert bp.paired_ratios({"ORT": [1.0]}, "graphopt") == {}
    assert bp.parse_args([]).rounds == 7


def test_spread_is_the_quartiles_of_round_ratios():
    figures = {"graphopt": [1.0, 1.1, 0.9, 1.2, 0.8], "ORT": [1.0] * 5}
    assert bp.paired_ratios(figures, "graphopt") == {"ORT": pytest.approx(1.0)}
    low, high = bp.paired_spread(figures, "graphopt")["ORT"]
    assert (low, high) == (pytest.approx(0.9), pytest.approx(1.1))
    assert bp.paired_spread({"graphopt": [2.0], "ORT": [1.0]}, "graphopt") == {"ORT": (2.0, 2.0)}
    assert bp.paired_spread({"ORT": [1.0]}, "graphopt") == {}


def test_cpu_name_says_which_microarchitecture():
    """A VM's model name is often only "AMD EPYC": the figures need LLVM's host name too."""
    name = bp.cpu_name()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("LLVM's x86 host name: x86 only")
    from graphopt.targets.x86 import host_cpu

    assert name.split(" (")[0] and f"({host_cpu()}; " in name
