"""Lower precision (issue #17): ``precision="bf16"|"fp16"`` on compile.

Small conv + matmul models against onnxruntime fp32 within the precision's stated
tolerances; the refusal line of a target without the hardware; vdpbf16ps in the x86
bf16 assembly (and an AMX tile step assembled); tensor-core mma in CUDA fp16 PTX and
ARM fp16 under qemu (slow tier); the manifest records the precision.
"""

import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import graphopt
from graphopt.errors import TargetError
from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import (
    TargetSpec,
    _precision,
    build,
    check_precision,
    cuda,
    resolve,
)
from graphopt.verify import PRECISION_TOLERANCES
from tests._system import CROSS_GXX, QEMU, needs_host_bf16
from tests.conftest import make_model, zoo_model

BF16_CPU = "cooperlake"  # an LLVM CPU with avx512bf16, for compile-only checks anywhere
ARM_FP16 = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a76",
    "mattr": ["+neon", "+fullfp16"],
}


def _conv_matmul_model():
    """x(1,32,8,8) -> Conv 32->32 (3x3) -> Relu -> Flatten -> Gemm 2048->32 -> Relu."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((32, 32, 3, 3)) / 17).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    fc = (rng.standard_normal((32, 2048)) / 45).astype(np.float32)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["g"], transB=1),
            helper.make_node("Relu", ["g"], ["y"]),
        ],
        {"x": (1, 32, 8, 8)},
        {"y": (1, 32)},
        {"w": w, "b": b, "fc": fc},
    )


def _ort(model, inputs: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


def _asm(executable) -> str:  # noqa: ANN001
    return "".join(m.inspect_source("asm") for m in executable.mod.imports if m.kind == "llvm")


# --- refusals: one line naming the missing feature -------------------------------------
@pytest.mark.parametrize(
    ("target", "precision", "pattern"),
    [
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}, "bf16",
         "needs avx512_bf16 or amx_bf16"),
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}, "fp16",
         "fp16 on x86 needs avx512fp16"),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53",
          "mattr": ["+neon"]}, "fp16", r"needs \+fullfp16"),
        ({"kind": "cuda", "arch": "sm_61"}, "fp16", r"needs fp16 tensor cores \(sm_70\+\)"),
        ({"kind": "cuda", "arch": "sm_75"}, "bf16", r"needs bf16 arithmetic \(sm_80\+\)"),
        ({"kind": "cuda", "arch": "sm_80"}, "fp8", "unknown precision 'fp8'"),
    ],
)  # fmt: skip
def test_a_target_without_the_feature_refuses_in_one_line(target, precision, pattern):
    # CUDA dicts as records: this nvcc may not know the old archs resolve() would check
    spec = TargetSpec("cuda", target) if target["kind"] == "cuda" else resolve(target)
    with pytest.raises(TargetError, match=pattern) as err:
        check_precision(spec, precision)
    assert "\n" not in str(err.value)


def test_targets_with_the_feature_accept():
    for target, precision in [
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": BF16_CPU}, "bf16"),
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}, "fp16"),
        (ARM_FP16, "fp16"),
        ({"kind": "cuda", "arch": "sm_75"}, "fp16"),
        ({"kind": "cuda", "arch": "sm_80"}, "bf16"),
        ({"kind": "cuda", "arch": "sm_75"}, "fp32"),
    ]:
        assert check_precision(resolve(target), precision) == precision


def test_compile_refuses_before_any_work(tmp_path):
    with pytest.raises(TargetError, match="fp16 on x86 needs avx512fp16"):
        graphopt.compile(
            _conv_matmul_model(), "x86", tmp_path / "m.so", precision="fp16",
            target_options={"cpu": "znver4"},
        )  # fmt: skip
    assert not (tmp_path / "m.so").exists()


# --- the Relax pass ------------------------------------------------------------------------
def test_pass_converts_weight_convs_and_matmuls_not_activation_products():
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("MatMul", ["f", "m"], ["g"]),  # weight: converted
            helper.make_node("Transpose", ["g"], ["t"], perm=[1, 0]),
            helper.make_node("MatMul", ["t", "g"], ["y"]),  # activation x activation: kept
        ],
        {"x": (1, 2, 3, 3)},
        {"y": (4, 4)},
        {"w": np.ones((2, 2, 1, 1), np.float32), "m": np.ones((18, 4), np.float32)},
    )
    _, graph, _ = prepare(model, None, None)
    mod = to_relax(graph)
    assert _precision.lowered_ops(mod, "bf16") == 2
    assert _precision.lowered_ops(mod, "fp32") == 0
    lowered = _precision.LowerPrecision("fp16")(mod).script()
    assert lowered.count('out_dtype="float32"') == 2 and "float16" in lowered


# --- x86 bf16 -----------------------------------------------------------------------------
@needs_host_bf16
def test_bf16_conv_matmul_matches_onnxruntime_and_records_precision(tmp_path):
    model = _conv_matmul_model()
    art = graphopt.compile(model, "x86", tmp_path / "m.so", precision="bf16")
    assert art.manifest["precision"] == "bf16"
    report = art.manifest["verification"]
    assert report["ok"] and report["precision"] == "bf16" and report["atol_scaled"]
    assert "bf16 tolerances" in graphopt.compiler.verification_line(report)
    # both kernels on the bf16 rules: the conv on AMX tiles where this host has them,
    # else on vdpbf16ps
    conv_rule = "conv_amx" if _host_amx() else "conv2d_nchwc_bf16"
    assert {conv_rule, "matmul_bf16"} <= set(art.manifest["schedule"]["rules"])
    inputs = art.random_inputs(seed=5)
    got, ref = art.run(inputs)["y"], _ort(model, inputs)
    rtol, atol = PRECISION_TOLERANCES["bf16"]
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * max(1.0, np.abs(ref).max()))
    # and it really computed in bf16: not bit-close to fp32
    fp32 = graphopt.compile(model, "x86", tmp_path / "f.so")
    assert fp32.manifest["precision"] == "fp32"
    assert np.abs(fp32.run(inputs)["y"] - got).max() > 1e-5


@needs_host_bf16
def test_bf16_zoo_cnn_verifies_and_keeps_softmax_fp32(tmp_path):
    model = zoo_model("small_cnn")  # conv+BN+pools+Gemm+Softmax
    art = graphopt.compile(model, "x86", tmp_path / "m.so", precision="bf16")
    assert art.manifest["verification"]["ok"]
    inputs = art.random_inputs(seed=2)
    got = art.run(inputs)
    assert got[art.output_names[0]].dtype == np.float32  # outputs keep the model's dtype
    ref = _ort(model, inputs)
    assert np.argmax(got[art.output_names[0]], -1) == np.argmax(ref, -1)
    np.testing.assert_allclose(got[art.output_names[0]].sum(-1), 1.0, rtol=1e-5)  # fp32 softmax


def test_bf16_assembly_uses_vdpbf16ps():
    _, graph, _ = prepare(_conv_matmul_model(), None, None)
    spec = resolve("x86", cpu=BF16_CPU)
    asm = _asm(build(to_relax(graph), spec, "nchwc", (), "bf16"))
    assert "vdpbf16ps" in asm
    fp32 = _asm(build(to_relax(graph), spec, "nchwc", (), "fp32"))
    assert "vdpbf16ps" not in fp32


def _two_3x3_convs_model():
    """x(1,16,48,48) -> 3x3 conv (48x48 map: Winograd F(4x4)) -> 3x3 stride-2 conv (24x24)
    -> 3x3 conv (24x24: F(4x4)) ; the middle one is no Winograd conv."""
    rng = np.random.default_rng(4)
    ws = {n: (rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32) for n in "abc"}
    conv = lambda i, w, o, s=1: helper.make_node(  # noqa: E731
        "Conv", [i, w], [o], pads=[1, 1, 1, 1], strides=[s, s]
    )
    return make_model(
        [conv("x", "a", "h"), conv("h", "b", "g", 2), conv("g", "c", "y")],
        {"x": (1, 16, 48, 48)},
        {"y": (1, 16, 24, 24)},
        ws,
    )


def _lowered_convs(model, cpu_name: str) -> tuple[int, int]:
    """(convs in bf16, convs kept in float32) by the precision pass for ``cpu_name``."""
    import tvm

    spec = resolve("x86", cpu=cpu_name)
    target = tvm.target.Target(spec.tvm)
    _, graph, _ = prepare(model, None, None)
    mod = to_relax(graph)
    with target:
        for name, passes in spec.target.phases(target, None).items():
            mod = tvm.transform.Sequential(passes)(mod)
            if name == "layout":
                break
        lowered = _precision.LowerPrecision("bf16", spec.target.keeps_fp32)(mod).script()
    convs = lowered.count("R.nn.conv2d(")
    in_bf16 = lowered.count("R.astype(") // 2  # each lowered conv casts x and w
    return in_bf16, convs - in_bf16


def test_bf16_keeps_winograd_convs_fp32_where_the_cpu_has_no_amx():
    """Without AMX, bf16 leaves the 3x3 convs Winograd F(4x4) takes in float32 (4x fewer
    multiplies than the direct conv, against vdpbf16ps' 2x); the strided one goes bf16.
    With AMX tiles (cross-compiled for Sapphire Rapids) every conv goes bf16."""
    model = _two_3x3_convs_model()
    assert _lowered_convs(model, BF16_CPU) == (1, 2)
    assert _lowered_convs(model, "sapphirerapids") == (3, 0)


def test_bf16_keeps_an_rgb_stem_fp32():
    """A 3-channel stem conv stays float32 under bf16 on both bf16 paths (vdpbf16ps pairs
    channels, AMX tiles are 32 deep: 3 channels waste most of either); the stride-2 conv
    on 16 channels after it goes bf16."""
    rng = np.random.default_rng(6)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "s"], ["h"], pads=[3, 3, 3, 3], strides=[2, 2]),
            helper.make_node("Conv", ["h", "b"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2]),
        ],
        {"x": (1, 3, 32, 32)},
        {"y": (1, 32, 8, 8)},
        {
            "s": (rng.standard_normal((16, 3, 7, 7)) / 12).astype(np.float32),
            "b": (rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32),
        },
    )
    assert _lowered_convs(model, BF16_CPU) == (1, 1)
    assert _lowered_convs(model, "sapphirerapids") == (1, 1)


@needs_host_bf16
def test_bf16_with_fp32_winograd_convs_verifies(tmp_path):
    model = _two_3x3_convs_model()
    art = graphopt.compile(model, "x86", tmp_path / "m.so", precision="bf16")
    assert art.manifest["verification"]["ok"]
    rules = art.manifest["schedule"]["rules"]
    if _host_amx():  # none kept in float32 (16 channels: too few for the tiles)
        assert "conv2d_winograd" not in rules and "conv2d_nchwc_bf16" in rules, rules
    else:
        assert "conv2d_winograd" in rules and "conv2d_nchwc_bf16" in rules, rules


def _host_amx() -> bool:
    """Whether this host's default x86 target (LLVM's CPU name plus the features
    /proc/cpuinfo adds) builds AMX kernels."""
    import tvm

    from graphopt.targets import _amx, x86

    return _amx.amx_enabled(tvm.target.Target(x86.tvm_target()))


# --- CUDA fp16 and ARM fp16 (slow tier) ---------------------------------------------------
@pytest.mark.slow
def test_cuda_fp16_uses_tensor_cores(tmp_path):
    if cuda.nvcc_path() is None:
        pytest.skip("needs nvcc (CUDA toolkit)")
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        {"x": (128, 256)},
        {"y": (128, 128)},
        {"w": rng.standard_normal((256, 128)).astype(np.float32)},
    )
    out = tmp_path / "m.so"
    art = graphopt.compile(model, {"kind": "cuda", "arch": "sm_80"}, out, precision="fp16")
    assert art.manifest["precision"] == "fp16"
    data = out.read_bytes()  # the fatbin's PTX is stored uncompressed
    assert re.search(rb"mma\.sync\.aligned\.m16n16k16\.row\.col\.f32\.f16\.f16\.f32", data) or (
        re.search(rb"mma\.sync", data)
    )


@pytest.mark.slow
@CROSS_GXX
@QEMU
def test_arm_fp16_verifies_under_qemu(tmp_path):
    model = zoo_model("small_cnn")
    art = graphopt.compile(model, ARM_FP16, tmp_path / "m.so", precision="fp16")
    assert art.emulated and art.manifest["precision"] == "fp16"
    report = art.manifest["verification"]
    assert report["ok"] and report["precision"] == "fp16"
    inputs = art.random_inputs(seed=4)
    got, ref = art.run(inputs)[art.output_names[0]], _ort(model, inputs)
    rtol, atol = PRECISION_TOLERANCES["fp16"]
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)
