"""Every conv family and layout-carrying pattern of public CNNs takes its packed rule.

The models (tests/targets/_cnn_blocks.py) are small ONNX versions of EfficientNet,
MobileNetV3, ShuffleNetV2, ResNeXt/RegNet blocks and an FCN/U-Net decoder. For each: the
x86 pipeline up to its schedules names the specialized rule of every conv family in it,
no conv whose channels allow packing is left to a generic rule (``graphopt.fast_path``
False), and the compiled model matches onnxruntime (graphopt.compile verifies by
default). ARM: the same models compiled in the packed layout and run under qemu, in the
slow tier.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.lower import to_relax  # noqa: E402
from graphopt.prepare import prepare  # noqa: E402
from graphopt.targets import _cpu_schedules as cpu  # noqa: E402
from graphopt.targets import resolve  # noqa: E402
from tests._system import CROSS_GXX, QEMU  # noqa: E402
from tests.conftest import make_model  # noqa: E402
from tests.targets._cnn_blocks import BLOCKS, build_block  # noqa: E402
from tests.targets.test_cpu_schedules import _scheduled_module  # noqa: E402

# block -> the conv rules it must use (and no conv or matmul may take a generic rule)
EXPECTED = {
    "mbconv_se": {"conv2d_nchwc", "pointwise_nchwc", "depthwise_nchwc"},
    "hardswish_se": {"conv2d_nchwc", "pointwise_nchwc", "depthwise_nchwc"},
    "channel_shuffle": {"conv2d_nchwc", "pointwise_nchwc", "depthwise_nchwc"},
    "grouped_bottleneck": {"conv2d_nchwc", "pointwise_nchwc", "grouped_nchwc"},
    "odd_concat": {"conv2d_nchwc"},
    # ConvTranspose, as conv-transpose-to-conv rewrites it
    "decoder": {"conv2d_nchwc", "pointwise_nchwc", "depthwise_nchwc"},
}


def _kernels(mod: tvm.IRModule) -> dict[str, tuple[str, bool | None]]:
    """kernel name -> (schedule rule, fast_path flag or None)."""
    out = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs:
            rule = str(func.attrs.get("graphopt.schedule_rule", "-"))
            fast = func.attrs.get("graphopt.fast_path")
            out[gvar.name_hint] = (rule, None if fast is None else bool(fast))
    return out


def test_every_block_has_an_expectation() -> None:
    assert set(EXPECTED) == set(BLOCKS)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_conv_families_take_their_packed_rules(name: str) -> None:
    kernels = _kernels(_scheduled_module(build_block(name)))
    conv_rules = {r for k, (r, _) in kernels.items() if "conv" in k}
    assert EXPECTED[name] <= conv_rules
    generic = sorted(k for k, (_, fast) in kernels.items() if fast is False)
    assert generic == []
    # the flag is set on every conv and matmul kernel, and only there
    for k, (rule, fast) in kernels.items():
        heavy = "conv" in k or "matmul" in k
        assert (fast is not None) == heavy, k
        if heavy:
            assert fast == (rule not in cpu.GENERIC_RULES), k


@pytest.mark.parametrize("name", ["odd_concat", "hardswish_se", "decoder"])
def test_blocks_match_onnxruntime(name: str, tmp_path) -> None:
    a = graphopt.compile(build_block(name), "x86", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mbconv_se", "channel_shuffle", "grouped_bottleneck"])
def test_bigger_blocks_match_onnxruntime(name: str, tmp_path) -> None:
    a = graphopt.compile(build_block(name), "x86", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]


@pytest.mark.slow
@CROSS_GXX
@QEMU
@pytest.mark.parametrize("name", list(BLOCKS))
def test_blocks_match_onnxruntime_on_arm_packed(name: str, tmp_path) -> None:
    a = graphopt.compile(build_block(name), "arm", tmp_path / "m.so", layout="nchwc")
    assert a.manifest["verification"]["ok"]


def _scheduled_in(model, target: str, layout: str) -> tvm.IRModule:  # noqa: ANN001
    spec = resolve(target)
    _, graph, _ = prepare(model)
    mod = to_relax(graph)
    tvm_target = tvm.target.Target(spec.tvm)
    phases = spec.target.phases(tvm_target, layout)
    with tvm_target:
        for name in ("library_dispatch", "layout", "legalize", "schedule"):
            mod = tvm.transform.Sequential(phases[name])(mod)
    return mod


@pytest.mark.parametrize("target", ["x86", "arm"])
def test_grouped_convs_take_the_grouped_rule_in_nhwc(target: str) -> None:
    """NHWC (ARM's default layout): grouped convs block their output channels inside one
    group and take ``grouped_nhwc``; nothing in the block falls to a generic rule."""
    kernels = _kernels(_scheduled_in(build_block("grouped_bottleneck"), target, "nhwc"))
    rules = [r for k, (r, _) in kernels.items() if "conv" in k]
    assert rules.count("grouped_nhwc") == 3 and "conv2d_nhwc" in rules
    assert all(fast is not False for _, fast in kernels.values())


def test_grouped_nhwc_matches_onnxruntime(tmp_path) -> None:
    model = build_block("grouped_bottleneck")
    a = graphopt.compile(model, "x86", tmp_path / "m.so", layout="nhwc")
    assert a.manifest["verification"]["ok"]


@pytest.mark.slow
@CROSS_GXX
@QEMU
@pytest.mark.parametrize("name", list(BLOCKS))
def test_blocks_match_onnxruntime_on_arm_default_layout(name: str, tmp_path) -> None:
    a = graphopt.compile(build_block(name), "arm", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]


def test_a_grouped_conv_no_block_fits_is_flagged_as_generic() -> None:
    """A grouped conv with 3 channels per group allows no block (not even the padded
    kernels of ``_conv3d``): its kernel is marked ``graphopt.fast_path`` False; two 64-
    channel convs pack and are marked True. (57 channels, which no block divides, now
    take the zero-padded ``conv2d_padded`` kernel: also True.)"""
    rng = np.random.default_rng(0)
    grouped = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=2)],
        {"x": (1, 6, 5, 5)},
        {"y": (1, 6, 5, 5)},
        {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32)},
    )
    flags = [f for _, f in _kernels(_scheduled_module(grouped)).values() if f is not None]
    assert flags == [False]
    for channels in (64, 57):
        model = make_model(
            [
                helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
                helper.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1]),
            ],
            {"x": (1, 16, 8, 8)},
            {"y": (1, 16, 8, 8)},
            {
                "w1": rng.standard_normal((channels, 16, 3, 3)).astype(np.float32),
                "w2": rng.standard_normal((16, channels, 3, 3)).astype(np.float32),
            },
        )
        flags = sorted(f for _, f in _kernels(_scheduled_module(model)).values() if f is not None)
        assert flags == [True, True], channels


def test_repeated_tanh_sigmoid_products_compile_in_linear_size() -> None:
    """x = Sigmoid(x) * Tanh(x), 5 times: TOPI's tanh reads its input several times, so
    inlining every x grew the kernel exponentially (4 times took 475 s to compile)."""
    nodes, x = [], "x"
    for i in range(5):
        nodes += [
            helper.make_node("Sigmoid", [x], [f"s{i}"]),
            helper.make_node("Tanh", [x], [f"t{i}"]),
            helper.make_node("Mul", [f"s{i}", f"t{i}"], [f"m{i}"]),
        ]
        x = f"m{i}"
    mod = _scheduled_module(make_model(nodes, {"x": (1, 8, 16, 16)}, {x: (1, 8, 16, 16)}))
    size = sum(
        len(f.script()) for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    )
    assert size < 60_000
