"""``graphopt.profile``: per-kernel times, schedule rules, FLOPs, fast-path coverage, call
overhead; and the coverage ``compile`` records in the manifest."""

from __future__ import annotations

import io
import platform
from dataclasses import replace

import numpy as np
import onnx
import pytest
import tvm
from onnx import helper, numpy_helper, shape_inference
from tvm import te

import graphopt
from graphopt.errors import TargetError
from graphopt.profiling import Profile, call_overhead, coverage_line, render
from graphopt.targets import resolve
from graphopt.targets._profile import (
    GENERIC_RULES,
    Kernel,
    _multiply_accumulates,
    device_for,
    schedule_summary,
)
from tests._system import needs_host_bf16
from tests.conftest import make_model, zoo_model

# The CPU rules today and the names helper rules add; tuned kernels are "tuning-db".
KNOWN_RULES = {
    "conv2d_nchwc",
    "conv2d_winograd",
    "conv2d_nhwc",
    "reduction",
    "injective",
    "fallback",
    "tuning-db",
    "depthwise_nchwc",
    "grouped_nchwc",
    "pointwise_gemm",
    "matmul",
    "matmul_packed",
}


@pytest.fixture(scope="module")
def small_cnn_profile():
    return graphopt.profile(zoo_model("small_cnn"), repeat=3)


def _reference_flops(model: onnx.ModelProto) -> int:
    """2 x multiply-accumulates of every Conv and Gemm, from the ONNX shapes alone."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    }
    weights = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out = shapes[node.output[0]]
            _, cin_per_group, *kernel = weights[node.input[1]]
            total += 2 * int(np.prod(out)) * cin_per_group * int(np.prod(kernel))
        elif node.op_type == "Gemm":
            m, n = shapes[node.output[0]]
            k = shapes[node.input[0]][1] if node.input[0] in shapes else None
            k = k or weights[node.input[1]][0]
            total += 2 * m * n * k
    return total


def test_profile_rows_shares_rules_and_flops(small_cnn_profile):
    p = small_cnn_profile
    assert p.rows and all(r.seconds_per_call > 0 and r.calls >= 1 for r in p.rows)
    assert sum(p.share(r) for r in p.rows) == pytest.approx(100.0, abs=0.01)
    assert [r.total_seconds for r in p.rows] == sorted(
        (r.total_seconds for r in p.rows), reverse=True
    )
    assert {r.rule for r in p.rows} <= KNOWN_RULES
    heavy = [r for r in p.rows if r.family]
    assert {r.family for r in heavy} == {"conv", "matmul"}
    assert all(r.gflops and r.gflops > 0 for r in heavy)
    assert all(r.gflops is None for r in p.rows if not r.family)  # pools, softmax: no MAC
    # the FLOPs read from the scheduled TIR equal the ONNX model's Conv and Gemm FLOPs
    assert sum(r.flops * r.calls for r in heavy) == _reference_flops(zoo_model("small_cnn"))
    assert 0.0 <= p.coverage <= 100.0
    fast = sum(r.flops * r.calls for r in heavy if r.rule not in GENERIC_RULES)
    assert p.coverage == pytest.approx(100.0 * fast / p.schedule["conv_matmul_flops"], abs=1e-3)
    generic = {r.name for r in heavy if r.rule in GENERIC_RULES}
    assert set(p.schedule["fallback_kernels"]) == generic
    assert p.call_ms > 0 and p.kernel_ms > 0
    # every kernel timed inside whole-model calls too (the instrument's names are the
    # kernels' names), each a part of a call: together not more than whole calls
    assert all(r.in_model_seconds and r.in_model_seconds > 0 for r in p.rows)
    assert all(r.in_model_ratio == r.in_model_seconds / r.total_seconds for r in p.rows)
    assert 0 < p.in_model_ms < 3 * p.call_ms


def test_render_prints_table_and_coverage_line(small_cnn_profile, tmp_path):
    path = tmp_path / "out.txt"
    with open(path, "w") as f:
        render(small_cnn_profile, top=3, file=f)
    text = path.read_text()
    assert "fast-path coverage: " in text and "% of conv/matmul FLOPs" in text
    assert small_cnn_profile.rows[0].name in text and "GFLOP/s" in text
    assert "in model ms" in text and "x alone" in text
    assert f"inside the model: {small_cnn_profile.in_model_ms:.3f} ms" in text
    assert f"({len(small_cnn_profile.rows) - 3} faster kernels not shown)" in text
    data = small_cnn_profile.to_dict()
    assert data["coverage_line"] == coverage_line(small_cnn_profile.schedule)
    assert len(data["kernels"]) == len(small_cnn_profile.rows)
    assert data["in_model_ms"] == small_cnn_profile.in_model_ms
    assert all(k["in_model_ms"] > 0 and k["in_model_ratio"] > 0 for k in data["kernels"])


@needs_host_bf16
def test_bf16_profile_counts_the_tensorized_kernels(monkeypatch):
    """The bf16 rules tensorize their MAC block into vdpbf16ps calls: their FLOPs come
    from the call shapes, and they are on the fast path (AMX off: on a host with AMX
    its kernels would take the convs)."""
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    model = zoo_model("small_cnn")
    p = graphopt.profile(model, repeat=1, precision="bf16")
    bf16 = [r for r in p.rows if r.rule in ("conv2d_nchwc_bf16", "matmul_bf16")]
    assert {r.rule for r in bf16} == {"conv2d_nchwc_bf16", "matmul_bf16"}
    assert all(r.family and r.flops > 0 for r in bf16)
    assert {r.family for r in bf16} == {"conv", "matmul"}
    heavy = [r for r in p.rows if r.family]
    assert sum(r.flops * r.calls for r in heavy) == _reference_flops(model)
    assert p.schedule["conv_matmul_flops"] == _reference_flops(model)
    assert p.coverage == pytest.approx(100.0)


def _conv_only_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        {"x": (1, 8, 16, 16)},
        {"y": (1, 16, 16, 16)},
        {"w1": w1, "w2": w2},
    )


def test_compile_manifest_records_coverage(tmp_path):
    """Plain 3x3 convs take the packed conv rule: coverage 100%, no fallback kernels."""
    model = _conv_only_model()
    art = graphopt.compile(model, "x86", tmp_path / "conv.so")
    schedule = art.manifest["schedule"]
    assert schedule["coverage"] == 100.0 and schedule["fallback_kernels"] == []
    assert schedule["conv_matmul_flops"] == _reference_flops(model)
    assert sum(schedule["rules"].values()) >= 2 and set(schedule["rules"]) <= KNOWN_RULES
    assert graphopt.load(tmp_path / "conv.so").manifest["schedule"] == schedule


def test_schedule_summary_arithmetic():
    k = [
        Kernel("conv_a", "conv2d_nchwc", 2, "conv", 300),
        Kernel("mm", "reduction", 1, "matmul", 200),
        Kernel("pool", "reduction", 1, None, 0),
    ]
    s = schedule_summary(k)
    assert s["coverage"] == pytest.approx(75.0) and s["conv_matmul_flops"] == 800
    assert s["fallback_kernels"] == ["mm"] and s["rules"] == {"conv2d_nchwc": 1, "reduction": 2}
    assert coverage_line(s) == "fast-path coverage: 75.0% of conv/matmul FLOPs"
    none = schedule_summary([Kernel("pool", "reduction", 1, None, 0)])
    assert none["coverage"] is None and "no conv/matmul kernels" in coverage_line(none)
    unknown = schedule_summary([Kernel("mm", None, 1, "matmul", 10)])  # rules not recorded
    assert unknown["coverage"] is None and "unknown" in coverage_line(unknown)
    almost = {"coverage": 99.96, "conv_matmul_flops": 1}
    assert "99.9%" in coverage_line(almost)  # never rounded up to a full fast path


def _prim_func(out: te.Tensor, *inputs: te.Tensor) -> tvm.tirx.PrimFunc:
    return te.create_prim_func([*inputs, out])


def test_multiply_accumulate_blocks_are_recognized():
    a = te.placeholder((4, 8), name="a")
    b = te.placeholder((8, 5), name="b")
    k = te.reduce_axis((0, 8), name="k")
    matmul = te.compute((4, 5), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="mm")
    assert _multiply_accumulates(_prim_func(matmul, a, b)) == 4 * 5 * 8
    # must not fire: a sum of squares reads one buffer (a variance), a plain sum (a pool)
    k2 = te.reduce_axis((0, 8), name="k2")
    squares = te.compute((4,), lambda i: te.sum(a[i, k2] * a[i, k2], axis=k2), name="sq")
    assert _multiply_accumulates(_prim_func(squares, a)) == 0
    k3 = te.reduce_axis((0, 8), name="k3")
    total = te.compute((4,), lambda i: te.sum(a[i, k3], axis=k3), name="s")
    assert _multiply_accumulates(_prim_func(total, a)) == 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="an x86 host refuses arm")
def test_targets_that_cannot_run_here_are_refused():
    with pytest.raises(TargetError, match="cannot profile target arm on this"):
        device_for(resolve("arm"))


def _empty_profile() -> Profile:
    return Profile("m", "x86", "NCHW", 1, [], schedule_summary([]), call_ms=0.0)


def test_call_overhead_four_ways():
    spec = resolve("x86")
    o = call_overhead(spec, spec.target.default_layout, calls=50)
    assert o.artifact_run_us > 0 and o.tvm_runtime_us > 0 and o.onnxruntime_us > 0
    assert o.runner_us is not None and o.runner_us > 0
    assert o.calls == 50
    # the bare VM skips every conversion and check: nothing graphopt adds is cheaper
    assert o.tvm_runtime_us < min(o.artifact_run_us, o.runner_us)
    line = o.line()
    assert line.startswith("per-call overhead (one Relu on a 1x16 float32 input")
    for part in ("Artifact.run", "bound runner", "TVM runtime", "onnxruntime"):
        assert part in line
    out = io.StringIO()
    render(replace(_empty_profile(), overhead=o), file=out)
    assert line in out.getvalue()  # one line, not folded


def test_call_overhead_of_a_benchmark_model():
    # What a benchmark passes: its own small model, a target by name, default layout.
    model = make_model([helper.make_node("Sigmoid", ["x"], ["y"])], {"x": (2, 8)}, {"y": (2, 8)})
    o = call_overhead("x86", calls=20, model=model, label="sigmoid 2x8")
    assert o.model == "sigmoid 2x8" and o.calls == 20
    assert min(o.artifact_run_us, o.runner_us, o.tvm_runtime_us, o.onnxruntime_us) > 0
