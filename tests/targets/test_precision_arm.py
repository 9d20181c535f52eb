"""Lower precision (issue #17) on ARM and in recurrent layers.

ARM fp16 with FEAT_FHM (``+fp16fml``): the NHWC conv and matmul kernels compute with
``fmlal`` (fp16 products, float32 sums; :mod:`graphopt.targets._fp16_arm`), not
``fcvtl`` + ``fmla``; the artifacts verify under qemu-aarch64 (QEMU 7.2's default CPU
has FHM) against onnxruntime fp32 (slow tier). Recurrent layers: the input-projection and
recurrent MatMuls ``expand-rnn`` makes are lowered (weights reached through slices,
splits, gathers and concats of constants count), the gate math stays float32, and a bf16
LSTM verifies.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import graphopt
from graphopt.errors import TargetError
from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import _fp16_arm, _precision, build, check_precision, resolve
from graphopt.verify import PRECISION_TOLERANCES
from tests._system import CROSS_GXX, HOST_BF16, QEMU
from tests.conftest import make_model
from tests.passes.test_expand_rnn import _rnn_model, fused_passes, unfused_passes
from tests.targets.test_precision import _asm, _conv_matmul_model

ARM_FHM = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a76",
    "mattr": ["+neon", "+fullfp16", "+fp16fml"],
}
ARM_FP16_ONLY = {**ARM_FHM, "mattr": ["+neon", "+fullfp16"]}  # cortex-a76 has no FHM


def _ort(model, inputs: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def _lstm():
    return _rnn_model("LSTM", seq=6, batch=1, inp=16, hidden=32, init_h=True, init_c=True)


# --- ARM fp16: FMLAL ---------------------------------------------------------------------
def test_arm_fp16_refusal_names_the_features_to_add():
    spec = resolve({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic"})
    with pytest.raises(TargetError, match=r"needs \+fullfp16.*'generic'.*\+fp16fml") as err:
        check_precision(spec, "fp16")
    assert "\n" not in str(err.value)
    assert check_precision(resolve("arm", cpu="neoverse-v1"), "fp16") == "fp16"  # has both


def test_arm_fp16_assembly_uses_fmlal_only_with_fhm():
    _, graph, _ = prepare(_conv_matmul_model(), None, None)
    asm = _asm(build(to_relax(graph), resolve(ARM_FHM), None, (), "fp16"))
    assert "fmlal\t" in asm
    assert "fcvtl" not in asm  # conv and matmul both: no fp16 -> fp32 conversions left
    plain = _asm(build(to_relax(graph), resolve(ARM_FP16_ONLY), None, (), "fp16"))
    assert "fmlal" not in plain and "fcvtl" in plain  # without FHM: the fp32 rules


def test_arm_fp16_batched_and_packed_matmuls_use_fmlal():
    rng = np.random.default_rng(1)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),  # [2, 4, 16] x [16, 8]
            helper.make_node("MatMul", ["h", "p"], ["y"]),  # [1, 16] x [3, 16, 8] (packed)
        ],
        {"x": (2, 4, 16), "h": (1, 16)},
        {"m": (2, 4, 8), "y": (3, 1, 8)},
        {
            "w": rng.standard_normal((16, 8)).astype(np.float32),
            "p": rng.standard_normal((3, 16, 8)).astype(np.float32),
        },
    )
    _, graph, _ = prepare(model, None, None)
    asm = _asm(build(to_relax(graph), resolve(ARM_FHM), None, (), "fp16"))
    assert "fmlal\t" in asm and "fcvtl" not in asm


def test_arm_fp16_conv_tuning_spaces_keep_fmlal(monkeypatch):
    from tvm import s_tir

    from graphopt.tuning import _space

    seen = []
    rule = _fp16_arm.rule_conv2d_nhwc_fp16

    def spy(func, target):  # noqa: ANN001, ANN202 - records the kernels the rule takes
        sch = rule(func, target)
        if sch is not None:
            seen.append((func, target))
        return sch

    monkeypatch.setattr(_fp16_arm, "RULES", [("conv2d_nhwc_fp16", spy), *_fp16_arm.RULES[1:]])
    _, graph, _ = prepare(_conv_matmul_model(), None, None)
    build(to_relax(graph), resolve(ARM_FHM), None, (), "fp16")
    func, target = seen[0]
    with target:  # the tunable form of the rule: one space per plan
        spaces = _space.graphopt_design_spaces(s_tir.Schedule(func), target)
    assert len(spaces) > 1  # the NHWC rule's plans
    assert all("graphopt_fmlal4" in space.mod.script() for space in spaces)


@pytest.mark.slow
@CROSS_GXX
@QEMU
def test_arm_fmlal_kernels_verify_under_qemu(tmp_path):
    model = _conv_matmul_model()
    art = graphopt.compile(model, ARM_FHM, tmp_path / "m.so", precision="fp16")
    assert art.emulated and art.manifest["verification"]["ok"]
    rules = art.manifest["schedule"]["rules"]
    assert {"conv2d_nhwc_fp16", "matmul_fp16"} <= set(rules)
    assert "fp16fml" in art.manifest["target"]["features"]
    inputs = art.random_inputs(seed=4)
    got, ref = art.run(inputs)["y"], _ort(model, inputs)[0]
    rtol, atol = PRECISION_TOLERANCES["fp16"]
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * max(1.0, np.abs(ref).max()))
    assert np.abs(got - ref).max() > 1e-6  # fp16 operands: not the fp32 numbers


@pytest.mark.slow
@CROSS_GXX
@QEMU
def test_arm_fp16_lstm_verifies_under_qemu(tmp_path):
    # hidden 64: expand-rnn packs the recurrent weights in 64-column blocks ([J, K, 64]);
    # unrolled (ARM's default sequence kernel keeps the recurrent product in float32)
    model = _rnn_model("LSTM", seq=6, batch=2, inp=16, hidden=64, init_h=True, init_c=True)
    out = tmp_path / "m.so"
    art = graphopt.compile(model, ARM_FHM, out, precision="fp16", passes=unfused_passes())
    assert art.manifest["verification"]["ok"]
    # both on fmlal: the input projection and the (packed) recurrent product
    assert art.manifest["schedule"]["rules"].get("matmul_fp16") == 2
    inputs = art.random_inputs(seed=1)
    got, ref = art.run(inputs), _ort(model, inputs)
    rtol, atol = PRECISION_TOLERANCES["fp16"]
    for name, exp in zip(art.output_names, ref, strict=True):
        np.testing.assert_allclose(got[name], exp, rtol=rtol, atol=atol, err_msg=name)


# --- recurrent layers: their matmuls are lowered -------------------------------------------
def test_expanded_lstm_matmuls_are_all_lowered_and_gates_stay_fp32():
    _, graph, _ = prepare(_lstm(), None, unfused_passes())
    mod = to_relax(graph)
    matmuls = mod.script(show_meta=False).count("R.matmul(")
    assert matmuls == 1 + 6  # the input projection, one recurrent product per step
    assert _precision.lowered_ops(mod, "bf16") == matmuls
    lowered = _precision.LowerPrecision("bf16")(mod).script(show_meta=False)
    gates = [ln for ln in lowered.splitlines() if "R.sigmoid(" in ln or "R.tanh(" in ln]
    assert gates and all('dtype="float32"' in ln for ln in gates)
    # the fused step kernel keeps its recurrent product in float32: the projection only
    _, fused, _ = prepare(_lstm(), None, fused_passes())
    assert _precision.lowered_ops(to_relax(fused), "bf16") == 1


def test_weights_behind_slices_splits_gathers_concats_and_weight_first_matmuls():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 12)).astype(np.float32)
    v = rng.standard_normal((8, 4)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Slice", ["w", "s", "e", "a"], ["ws"]),
            helper.make_node("Split", ["ws"], ["w1", "w2"], axis=1, num_outputs=2),
            helper.make_node("Concat", ["w1", "v"], ["wc"], axis=1),
            helper.make_node("MatMul", ["x", "wc"], ["m"]),
            helper.make_node("Gather", ["w", "gi"], ["wg"], axis=1),
            helper.make_node("MatMul", ["wg", "z"], ["n"]),  # the weight first
            helper.make_node("MatMul", ["m", "wg"], ["p"]),  # activation x weight again
            helper.make_node("MatMul", ["x", "m"], ["q"]),  # activation x activation: kept
        ],
        {"x": (8, 8), "z": (2, 8)},
        {"m": (8, 8), "n": (8, 8), "p": (8, 2), "q": (8, 8)},
        {
            "w": w,
            "v": v,
            "s": np.array([0], np.int64),
            "e": np.array([8], np.int64),
            "a": np.array([1], np.int64),
            "gi": np.array([1, 3], np.int64),
        },
        opset=18,
    )
    _, graph, _ = prepare(model, None, [])  # no folding: the weights stay behind their ops
    assert _precision.lowered_ops(to_relax(graph), "bf16") == 3


@pytest.mark.skipif(not HOST_BF16, reason="needs a CPU with avx512_bf16 (/proc/cpuinfo)")
def test_bf16_lstm_verifies_and_really_computes_in_bf16(tmp_path):
    model = _lstm()
    art = graphopt.compile(model, "x86", tmp_path / "m.so", precision="bf16")
    assert art.manifest["verification"]["ok"] and art.manifest["precision"] == "bf16"
    fp32 = graphopt.compile(model, "x86", tmp_path / "f.so")
    inputs = art.random_inputs(seed=3)
    got, plain, ref = art.run(inputs), fp32.run(inputs), _ort(model, inputs)
    rtol, atol = PRECISION_TOLERANCES["bf16"]
    for name, exp in zip(art.output_names, ref, strict=True):
        np.testing.assert_allclose(got[name], exp, rtol=rtol, atol=atol, err_msg=name)
    assert np.abs(got["Y"] - plain["Y"]).max() > 1e-5  # bf16 operands, not fp32 ones


def test_arm_fp16_kernels_count_their_flops_and_stay_on_the_fast_path():
    """The fmlal kernels have no multiply-add block left to read: the schedule summary
    takes their FLOPs from the call shapes, the same total as the fp32 build's."""
    from graphopt.targets._profile import kernels, record_schedule, schedule_summary

    _, graph, _ = prepare(_conv_matmul_model(), None, None)
    summaries = {}
    for precision in ("fp32", "fp16"):
        with record_schedule() as scheduled:
            build(to_relax(graph), resolve(ARM_FHM), None, (), precision)
        summaries[precision] = schedule_summary(kernels(scheduled.module))
    fp16 = summaries["fp16"]
    assert fp16["rules"].get("conv2d_nhwc_fp16") and fp16["rules"].get("matmul_fp16")
    assert fp16["conv_matmul_flops"] == summaries["fp32"]["conv_matmul_flops"] > 0
    assert fp16["coverage"] == pytest.approx(100.0)
