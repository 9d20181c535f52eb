"""Whole-layer recurrent kernels (graphopt::RNNSequence: the time loop inside one kernel,
graphopt/lower/_rnn_sequence.py, swapped for its vectorized form by targets/_gemv.py):
the same numbers as the unrolled expansion and onnxruntime, one kernel per layer whatever
the length, the three ways of running in parallel, and the cells it leaves to the
expansion."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tvm

import graphopt
from graphopt.lower import _rnn_sequence
from graphopt.targets import _gemv
from tests._system import CROSS_GXX, QEMU
from tests.passes.test_expand_rnn import _rnn_model, sequence_passes, unfused_passes
from tests.targets.test_rnn_kernels import CASES

SEQ = _gemv.SEQUENCE_KIND


def _ort(model, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _compare(model, tmp_path, layout: int, **compile_kw) -> graphopt.Artifact:
    """Compile ``model`` with the x86 defaults (one sequence kernel) and as the unrolled
    expansion; assert both agree (and agree with onnxruntime, which runs layout 0 only)."""
    art = graphopt.compile(model, "x86", tmp_path / "s.so", verify=False, **compile_kw)
    plain = graphopt.compile(model, "x86", tmp_path / "p.so", verify=False, passes=unfused_passes())
    assert art.manifest["schedule"]["rules"].get(SEQ) == 1
    assert SEQ not in plain.manifest["schedule"]["rules"]
    for seed in (1, 2):
        inputs = art.random_inputs(seed=seed)
        got, ref = art.run(inputs), plain.run(inputs)
        expected = _ort(model, inputs) if layout == 0 else [ref[o] for o in art.output_names]
        for out, exp in zip(art.output_names, expected, strict=True):
            # Same formula, same polynomial activations, same summation order per column:
            # equal up to FMA contraction (a few ulp), well inside onnxruntime's agreement.
            np.testing.assert_allclose(got[out], ref[out], rtol=1e-6, atol=1e-6, err_msg=out)
            np.testing.assert_allclose(got[out], exp, rtol=1e-4, atol=1e-5, err_msg=out)
    return art


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("name", list(CASES))
def test_sequence_kernel_matches_expansion_and_onnxruntime(name, layout, tmp_path):
    op, kwargs = CASES[name]
    _compare(_rnn_model(op, inp=8, layout=layout, **kwargs), tmp_path, layout)


def test_blocks_split_across_cores_compute_the_same(tmp_path, monkeypatch):
    """One direction with its weight blocks split across the cores every step (weights
    of PARALLEL_MIN_BYTES or more; here every weight) computes the same numbers."""
    monkeypatch.setattr(_rnn_sequence, "PARALLEL_MIN_BYTES", 0)
    model = _rnn_model("LSTM", inp=8, hidden=64, batch=2, init_h=True, init_c=True)
    _compare(model, tmp_path, 0)


def _spec(cell: str, dirs: int, hidden: int) -> _rnn_sequence.Spec:
    acts = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
    return _rnn_sequence.Spec(
        cell, 8, 1, hidden, 16, (False, True)[:dirs], (acts[cell],) * dirs, 1, 1, cell == "GRU"
    )


def test_plan_runs_directions_or_big_weights_in_parallel():
    """Bidirectional: a direction per core; one direction: its weight blocks split only
    from PARALLEL_MIN_BYTES on; the plain nest (lanes=None) stays serial."""
    plan = _rnn_sequence.plan
    assert plan(_spec("GRU", 2, 32), 8)["mode"] == "directions"
    assert plan(_spec("LSTM", 1, 256), 8)["mode"] == "blocks"  # 1 MB
    assert plan(_spec("LSTM", 1, 64), 8)["mode"] == "serial"  # 64 KB
    assert plan(_spec("LSTM", 2, 256), None)["mode"] == "serial"
    target = tvm.target.Target("llvm")
    plain = _rnn_sequence.sequence_func(_spec("LSTM", 1, 256))
    built = _gemv.rule_rnn_sequence(plain, target).mod["main"].script()
    assert "T.parallel" in built and "T.vectorized" in built
    assert "T.parallel" not in plain.script()
    assert _rnn_sequence.spec_of(plain) == _spec("LSTM", 1, 256)


def test_rule_declines_other_kernels():
    a = tvm.te.placeholder((4,), "float32", "a")
    b = tvm.te.compute((4,), lambda i: a[i] * 2, name="b")
    func = tvm.te.create_prim_func([a, b])
    assert _gemv.rule_rnn_sequence(func, tvm.target.Target("llvm")) is None


def test_one_kernel_whatever_the_length(tmp_path):
    """The time loop is inside the kernel: 16 and 64 steps compile to the same kernels
    (both enough rows for the packed input projection, ``targets/_gemm.py``)."""
    rules = []
    for seq in (16, 64):
        model = _rnn_model("GRU", seq=seq, hidden=32, linear_before_reset=1, init_h=True)
        art = graphopt.compile(model, "x86", tmp_path / f"s{seq}.so", verify=False)
        rules.append(art.manifest["schedule"]["rules"])
    assert rules[0] == rules[1] and rules[0][SEQ] == 1


@pytest.mark.parametrize(
    ("op", "kwargs"),
    [
        ("LSTM", {"hidden": 16, "peepholes": True}),
        ("GRU", {"hidden": 16, "linear_before_reset": 0}),
    ],
    ids=["lstm-peepholes", "gru-reset-before-linear"],
)
def test_cells_the_kernel_does_not_take_stay_unrolled(op, kwargs, tmp_path):
    """Peepholes and GRU's linear_before_reset=0 (r multiplies H before its matmul) are
    left to the expansion, which graphopt.compile verifies against onnxruntime."""
    model = _rnn_model(op, inp=8, init_h=True, **kwargs)
    art = graphopt.compile(model, "x86", tmp_path / "m.so", passes=sequence_passes())
    assert SEQ not in art.manifest["schedule"]["rules"]
    assert art.manifest["verification"]["ok"]


def test_cuda_keeps_the_expansion(tmp_path):
    """The sequence kernel is a CPU loop nest: CUDA's pass defaults leave it off."""
    from graphopt.prepare import prepare
    from graphopt.targets import resolve

    model = _rnn_model("GRU", hidden=16, linear_before_reset=1)
    _, graph, _ = prepare(model, pass_defaults=resolve("cuda").pass_defaults)
    assert not any(n.op_type == "RNNSequence" for n in graph.nodes())
    _, graph, _ = prepare(model, pass_defaults=resolve("x86").pass_defaults)
    assert [n.op_type for n in graph.nodes()].count("RNNSequence") == 1


@pytest.mark.slow
@CROSS_GXX
@QEMU
@pytest.mark.parametrize("zoo", ["LSTMClassifier", "GRUTagger", "ElmanRNN", "CRNN"])
def test_rnn_zoo_sequence_kernels_under_emulation(zoo, tmp_path):
    """The RNN zoo on ARM with its default sequence kernels (NEON, run under qemu-user):
    graphopt.compile verifies each artifact against torch eager, then it is compared
    with x86's."""
    torch = pytest.importorskip("torch")
    from graphopt import zoo_torch

    torch.manual_seed(0)
    module = getattr(zoo_torch, zoo)().eval()
    example = {
        "ElmanRNN": lambda: torch.randn(1, 8, 64),
        "CRNN": lambda: torch.randn(1, 1, 32, 128),
    }.get(zoo, lambda: torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0)))()
    source = graphopt.from_torch(module, example)
    arm = graphopt.compile(source, "arm", tmp_path / "arm.so")
    assert arm.manifest["verification"]["ok"] and arm.emulated
    assert arm.manifest["schedule"]["rules"].get(SEQ)
    x86 = graphopt.compile(source, "x86", tmp_path / "x86.so", verify=False)
    assert x86.manifest["schedule"]["rules"].get(SEQ)
    got, ref = arm.run(source.example_inputs), x86.run(source.example_inputs)
    for out in arm.output_names:
        np.testing.assert_allclose(got[out], ref[out], rtol=1e-4, atol=1e-5)


def test_tuning_leaves_the_hand_written_kernel_alone():
    """`graphopt tune` extracts the projection GEMM but not the sequence kernel (a loop
    nest without blocks: no schedule space to search)."""
    from graphopt.lower.relax import to_relax
    from graphopt.prepare import prepare
    from graphopt.targets import resolve
    from graphopt.tuning._session import Targets
    from graphopt.tuning._tasks import extract_tasks

    spec = resolve("x86")
    _, graph, _ = prepare(_rnn_model("LSTM", inp=8, hidden=32), pass_defaults=spec.pass_defaults)
    targets = Targets.of(spec, None)
    tasks = extract_tasks(to_relax(graph), targets.spec, targets.compile_target)
    assert tasks and not any("rnn_sequence" in t.name for t in tasks)
    assert any("matmul" in t.name for t in tasks)
