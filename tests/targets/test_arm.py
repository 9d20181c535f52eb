"""The ARM target: cross-compiled here, run for real under qemu-user (slow tier), in its
default NHWC layout (NEON-wide OHWI[4]o weights, graphopt/targets/_cpu_nhwc.py)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import ArtifactError, TargetError
from graphopt.targets import _emulation, arm
from tests._system import CROSS_GXX, QEMU
from tests.conftest import zoo_model

EM_AARCH64 = 183  # ELF e_machine


def _elf_machine(path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF"
    return int.from_bytes(head[18:20], "little")


@CROSS_GXX
def test_cross_compiles_an_aarch64_library(tmp_path, tiny_model):
    a = graphopt.compile(
        tiny_model, "arm", tmp_path / "m.so", verify=False, target_options={"cpu": "cortex-a72"}
    )
    assert _elf_machine(a.path) == EM_AARCH64
    tvm = a.manifest["target"]["tvm"]
    assert a.manifest["target"]["name"] == "arm"
    assert (tvm["mtriple"], tvm["mcpu"], tvm["mattr"]) == (
        "aarch64-linux-gnu",
        "cortex-a72",
        ["+neon"],
    )


def test_missing_cross_toolchain_names_the_package(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(arm.shutil, "which", lambda _name: None)
    with pytest.raises(TargetError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        graphopt.compile(tiny_model, "arm", tmp_path / "m.so", verify=False)
    assert not (tmp_path / "m.so").exists()


@CROSS_GXX
def test_missing_qemu_names_the_package(tmp_path, tiny_model, monkeypatch):
    a = graphopt.compile(tiny_model, "arm", tmp_path / "m.so", verify=False)
    monkeypatch.setattr(_emulation.shutil, "which", lambda _name: None)
    with pytest.raises(ArtifactError, match="apt-get install qemu-user.*aarch64 device"):
        graphopt.load(a.path).run(a.random_inputs())


@pytest.mark.parametrize(
    "options,pattern",
    [
        ({"cpu": "cortex-z99"}, "does not know ARM CPU"),
        ({"triple": "x86_64-linux-gnu"}, "aarch64 only"),
        ({"arch": "sm_80"}, "has no option"),
    ],
)
def test_bad_arm_options(options, pattern, tiny_model):
    with pytest.raises(TargetError, match=pattern):
        graphopt.compile(tiny_model, "arm", target_options=options, verify=False)


@CROSS_GXX
def test_json_target_dict_selects_arm(tmp_path, tiny_model):
    spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}
    a = graphopt.compile(tiny_model, spec, tmp_path / "j.so", verify=False)
    assert a.manifest["target"]["name"] == "arm" and _elf_machine(a.path) == EM_AARCH64


def _lstm_model() -> onnx.ModelProto:
    """A bidirectional ONNX LSTM (seq 5, batch 2, input 4, hidden 3), all outputs."""
    rng = np.random.default_rng(4)
    h, d = 3, 2
    w = rng.standard_normal((d, 4 * h, 4)).astype(np.float32) * 0.5
    r = rng.standard_normal((d, 4 * h, h)).astype(np.float32) * 0.5
    b = rng.standard_normal((d, 8 * h)).astype(np.float32) * 0.1
    node = helper.make_node(
        "LSTM",
        ["x", "W", "R", "B"],
        ["y", "y_h", "y_c"],
        hidden_size=h,
        direction="bidirectional",
        name="lstm",
    )
    graph = helper.make_graph(
        [node],
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (5, 2, 4))],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, (5, d, 2, h)),
            helper.make_tensor_value_info("y_h", TensorProto.FLOAT, (d, 2, h)),
            helper.make_tensor_value_info("y_c", TensorProto.FLOAT, (d, 2, h)),
        ],
        [numpy_helper.from_array(a, n) for n, a in (("W", w), ("R", r), ("B", b))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


EMULATED = ["small_cnn", "conv_variants", "pool_variants", "mlp_head", "mobilenetv2", "resnet18"]


@pytest.mark.slow
@pytest.mark.parametrize("name", EMULATED + ["lstm"])
@CROSS_GXX
@QEMU
def test_runs_under_emulation_like_x86_and_onnxruntime(name, tmp_path):
    model = _lstm_model() if name == "lstm" else zoo_model(name)
    # graphopt.compile verifies the ARM artifact under emulation against onnxruntime...
    arm_art = graphopt.compile(model, "arm", tmp_path / "arm.so")
    assert arm_art.manifest["verification"]["ok"] and arm_art.emulated
    assert arm_art.manifest["target"]["layout"] == "nhwc"  # ARM's default
    # ...and here it is checked again, on other inputs, against x86 and onnxruntime.
    x86_art = graphopt.compile(model, "x86", tmp_path / "x86.so", verify=False)
    inputs = arm_art.random_inputs(seed=9)
    got = arm_art.run(inputs)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, inputs
    )
    for out, exp in zip(arm_art.output_names, ref, strict=True):
        np.testing.assert_allclose(got[out], exp, rtol=1e-3, atol=1e-4, err_msg=out)
        # NEON (4 lanes) and AVX-512 (16) sum in different orders: same tolerance as ORT.
        np.testing.assert_allclose(got[out], x86_art.run(inputs)[out], rtol=1e-3, atol=1e-4)
