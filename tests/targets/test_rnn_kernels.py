"""Fused recurrent step kernels (graphopt::RNNStep, scheduled by targets/_gemv.py): the
same numbers as the unfused expansion and onnxruntime, on x86 and (slow tier, under
qemu-user) on ARM."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from tvm import te

import graphopt
from graphopt.targets import _cpu_schedules, _gemv
from tests._system import CROSS_GXX, QEMU
from tests.passes.test_expand_rnn import _rnn_model, fused_passes, unfused_passes


@pytest.fixture
def step_rule(monkeypatch):
    """The rnn_step rule first in the CPU rules, as _cpu_schedules registers it (a no-op
    once it does)."""
    if not any(name == _gemv.KIND for name, _ in _cpu_schedules.RULES):
        rules = [(_gemv.KIND, _gemv.rule_rnn_step), *_cpu_schedules.RULES]
        monkeypatch.setattr(_cpu_schedules, "RULES", rules)


def _ort(model, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


CASES = {
    "lstm-fwd-batch2": ("LSTM", {"batch": 2, "hidden": 32, "init_h": True, "init_c": True}),
    "lstm-bidir-zero-state": ("LSTM", {"direction": "bidirectional", "hidden": 64, "batch": 1}),
    "gru-lbr-bidir": (
        "GRU",
        {"direction": "bidirectional", "hidden": 48, "linear_before_reset": 1, "init_h": True},
    ),
    "gru-lbr-no-bias": ("GRU", {"hidden": 16, "linear_before_reset": 1, "bias": False}),
    "rnn-relu-reverse": (
        "RNN",
        {"direction": "reverse", "hidden": 24, "activations": ["Relu"], "init_h": True},
    ),
    "rnn-tanh-odd-hidden": ("RNN", {"hidden": 6, "seq": 7, "init_h": True}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_steps_match_unfused_expansion_and_onnxruntime(name, step_rule, tmp_path):
    op, kwargs = CASES[name]
    model = _rnn_model(op, inp=8, **kwargs)
    fused = graphopt.compile(model, "x86", tmp_path / "f.so", verify=False, passes=fused_passes())
    plain = graphopt.compile(model, "x86", tmp_path / "p.so", verify=False, passes=unfused_passes())
    assert fused.manifest["schedule"]["rules"].get(_gemv.KIND, 0) == 1  # one kernel, all steps
    assert _gemv.KIND not in plain.manifest["schedule"]["rules"]
    for seed in (1, 2):
        inputs = fused.random_inputs(seed=seed)
        got, ref = fused.run(inputs), plain.run(inputs)
        expected = _ort(model, inputs)
        for out, exp in zip(fused.output_names, expected, strict=True):
            # Same formula, same polynomial activations, same summation order per column:
            # equal up to FMA contraction (a few ulp), well inside onnxruntime's agreement.
            np.testing.assert_allclose(got[out], ref[out], rtol=1e-6, atol=1e-6, err_msg=out)
            np.testing.assert_allclose(got[out], exp, rtol=1e-4, atol=1e-5, err_msg=out)


def test_parallel_step_kernel_matches(step_rule, tmp_path, monkeypatch):
    """The GEMV split across cores (weights of PARALLEL_MIN_BYTES or more; here every
    weight) computes the same numbers as the serial kernel and onnxruntime."""
    model = _rnn_model("LSTM", inp=8, hidden=64, batch=2, direction="bidirectional")
    fused = fused_passes()
    serial = graphopt.compile(model, "x86", tmp_path / "s.so", verify=False, passes=fused)
    monkeypatch.setattr(_gemv, "PARALLEL_MIN_BYTES", 0)
    par = graphopt.compile(model, "x86", tmp_path / "p.so", verify=False, passes=fused)
    assert par.manifest["schedule"]["rules"].get(_gemv.KIND) == 1
    inputs = par.random_inputs(seed=3)
    got, ref, expected = par.run(inputs), serial.run(inputs), _ort(model, inputs)
    for out, exp in zip(par.output_names, expected, strict=True):
        np.testing.assert_allclose(got[out], ref[out], rtol=1e-6, atol=1e-6, err_msg=out)
        np.testing.assert_allclose(got[out], exp, rtol=1e-4, atol=1e-5, err_msg=out)


def test_parallel_only_for_large_weights(monkeypatch):
    """The rule marks the weight-block loop parallel from PARALLEL_MIN_BYTES on, and
    keeps a smaller weight's GEMV serial."""
    g, u, hidden = 4, 16, 64
    h = te.placeholder((1, hidden), "float32", "h")
    rp = te.placeholder((hidden // u, hidden, g * u), "float32", "rp")
    k = te.reduce_axis((0, hidden), "k")
    acc = te.compute(
        (1, hidden // u, g * u),
        lambda b, j, q: te.sum(h[b, k] * rp[j, k, q], axis=k),
        name="acc",
        attrs={_gemv.ANNOTATION: _gemv.KIND},
    )
    out = te.compute((1, hidden // u, u), lambda b, j, q: acc[b, j, q] + acc[b, j, u + q])
    func = te.create_prim_func([h, rp, out])
    target = tvm.target.Target("llvm")
    weight = 4 * hidden * g * hidden
    monkeypatch.setattr(_gemv, "PARALLEL_MIN_BYTES", weight)
    assert "T.parallel" in _gemv.rule_rnn_step(func, target).mod.script()
    monkeypatch.setattr(_gemv, "PARALLEL_MIN_BYTES", weight + 1)
    assert "T.parallel" not in _gemv.rule_rnn_step(func, target).mod.script()


def test_without_the_rule_the_generic_schedules_still_compute_it(tmp_path, monkeypatch):
    """Without the rule (a target whose rules lack it) the kernel falls to the matmul
    rule: slower, still right."""
    rules = [(n, r) for n, r in _cpu_schedules.RULES if n != _gemv.KIND]
    monkeypatch.setattr(_cpu_schedules, "RULES", rules)
    model = _rnn_model("LSTM", hidden=32, init_h=True, init_c=True)
    # graphopt.compile verifies against onnxruntime
    art = graphopt.compile(model, "x86", tmp_path / "m.so", passes=fused_passes())
    assert art.manifest["verification"]["ok"]


def test_rule_declines_other_kernels():
    """Negative: a plain matmul (no rnn_step annotation) is not the rule's."""
    a = te.placeholder((1, 64), "float32", "a")
    b = te.placeholder((64, 64), "float32", "b")
    k = te.reduce_axis((0, 64), "k")
    c = te.compute((1, 64), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="matmul")
    func = te.create_prim_func([a, b, c])
    assert _gemv.rule_rnn_step(func, tvm.target.Target("llvm")) is None


def test_step_kernel_is_one_per_layer_and_linear_in_length(step_rule, tmp_path):
    """Every step of a layer calls the same kernel (its row is an argument), so code size
    does not grow with the sequence: 16 and 32 steps compile to the same kernels (both
    enough rows for the packed input projection, ``targets/_gemm.py``)."""
    sizes = []
    for seq in (16, 32):
        model = _rnn_model("GRU", seq=seq, hidden=32, linear_before_reset=1, init_h=True)
        path = tmp_path / f"s{seq}.so"
        art = graphopt.compile(model, "x86", path, verify=False, passes=fused_passes())
        sizes.append(art.manifest["schedule"]["rules"])
    assert sizes[0] == sizes[1]


@pytest.mark.slow
@CROSS_GXX
@QEMU
@pytest.mark.parametrize("zoo", ["LSTMClassifier", "GRUTagger", "ElmanRNN"])
def test_rnn_zoo_under_emulation(zoo, step_rule, tmp_path):
    """The RNN zoo on ARM with fused steps (NEON, run under qemu-user): graphopt.compile
    verifies each artifact against torch eager; then it is compared with x86's."""
    torch = pytest.importorskip("torch")
    from graphopt import zoo_torch

    torch.manual_seed(0)
    module = getattr(zoo_torch, zoo)().eval()
    tokens = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    example = tokens if zoo != "ElmanRNN" else torch.randn(1, 8, 64)
    source = graphopt.from_torch(module, example)
    arm = graphopt.compile(source, "arm", tmp_path / "arm.so", passes=fused_passes())
    assert arm.manifest["verification"]["ok"] and arm.emulated
    assert arm.manifest["schedule"]["rules"].get(_gemv.KIND)
    x86 = graphopt.compile(source, "x86", tmp_path / "x86.so", verify=False)
    got, ref = arm.run(source.example_inputs), x86.run(source.example_inputs)
    for out in arm.output_names:
        np.testing.assert_allclose(got[out], ref[out], rtol=1e-4, atol=1e-5)
