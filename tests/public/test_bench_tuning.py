"""benchmarks/bench_tuning.py's rounds and table: the A/A column (the default build's
second copy against the first) beside tuned/default, and the slowest used record's
kernel inside the model. No timing: scripted engines."""

from __future__ import annotations

import importlib.util
import json
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


def _retimed_point(bt, ort: float, ov: float | None, default: float, aa: float, ns):  # noqa: ANN001, ANN202
    vs = {"ort": ort, "default": default} | ({"openvino": ov} if ov is not None else {})
    point = bt.Point(30.0, 2671, 0, {"tuned": 30.0, "default": 30.0, "ort": 38.0}, vs)
    point.aa = (aa, aa - 0.01, aa + 0.01)
    point.round_trip_ns = ns
    return point


def test_retimes_in_processes_are_summarised_by_their_median_and_range(tmp_path):
    bt = _load("bench_tuning")
    figures = [  # tuned/ORT, tuned/OpenVINO, tuned/default, A/A, round trip
        (0.79, 0.87, 1.01, 0.99, 70.0),
        (0.81, 0.85, 1.02, 1.00, 359.0),
        (0.76, None, 1.04, 0.98, None),  # no OpenVINO, no round trip in this one
    ]
    runs = []
    for i, f in enumerate(figures):  # each through the child's JSON file, as the parent reads it
        curve = bt.Curve("resnet50", [bt.Point(0.0, 0, 0, {}), _retimed_point(bt, *f)])
        bt._dump([curve], tmp_path / f"{i}.json")
        runs.append(json.loads((tmp_path / f"{i}.json").read_text()))
    header, _, row = bt.across_processes(runs).splitlines()
    cells = dict(zip(header.split("|"), row.split("|"), strict=True))
    assert cells[" processes "].strip() == "3"
    assert cells[" tuned/ORT "].strip() == "0.79 (0.76-0.81)"  # median, lowest, highest
    assert cells[" tuned/OpenVINO "].strip() == "0.86 (0.85-0.87)"  # over the two that had it
    assert cells[" tuned/default "].strip() == "1.02 (1.01-1.04)"
    assert cells[" A/A "].strip() == "0.99 (0.98-1.00)"
    by_process = cells[" tuned/ORT by process (round trip) "].strip()
    assert by_process == "0.79 (70 ns), 0.81 (359 ns), 0.76 (not measured)"


def test_processes_runs_the_retime_in_fresh_children_and_stops_on_a_failed_one(
    monkeypatch, tmp_path, capsys
):
    bt = _load("bench_tuning")
    argv = ["--models", "resnet50", "--processes", "3", "--retime", "--db", str(tmp_path)]
    child_args = bt._without_processes(argv)
    assert child_args == ["--models", "resnet50", "--retime", "--db", str(tmp_path)]
    assert bt._without_processes(["--processes=3", "--retime"]) == ["--retime"]
    seen = []

    def child(cmd, check):  # noqa: ANN001, ANN202 - subprocess.run's stand-in
        seen.append(cmd)
        assert cmd[0] == sys.executable and cmd[1].endswith("bench_tuning.py")
        assert "--processes" not in cmd and cmd[2:-2] == child_args
        point = _retimed_point(bt, 0.78 + len(seen) / 100, 0.86, 1.0, 1.0, 60.0)
        bt._dump([bt.Curve("resnet50", [point])], Path(cmd[-1]))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(bt.subprocess, "run", child)
    assert bt._in_processes(child_args, 3) == 0
    assert len(seen) == 3 and len({c[-1] for c in seen}) == 3  # a fresh file each
    out = capsys.readouterr().out
    assert "over 3 fresh processes" in out and "| 0.80 (0.79-0.81) |" in out

    calls = []

    def failing(cmd, check):  # noqa: ANN001, ANN202 - the second child dies
        calls.append(cmd)
        return SimpleNamespace(returncode=3) if len(calls) == 2 else child(cmd, check)

    monkeypatch.setattr(bt.subprocess, "run", failing)
    assert bt._in_processes(child_args, 3) == 3  # its exit status, no summary of the rest
    assert len(calls) == 2  # the third is not started
    assert "over 3 fresh processes" not in capsys.readouterr().out


def test_processes_goes_with_retime_only(monkeypatch, tmp_path):
    bt = _load("bench_tuning")
    for argv in (["--processes", "2"], ["--retime", "--db", str(tmp_path), "--processes", "0"]):
        monkeypatch.setattr(sys, "argv", ["bench_tuning.py", *argv])
        with pytest.raises(SystemExit) as exc:
            bt.main()
        assert exc.value.code == 2
