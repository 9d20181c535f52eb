"""3-D convs (video CNNs) take the packed rules of graphopt/targets/_conv3d.py.

Each family of video CNNs (R3D's (3, 7, 7) stem on 3 input channels with stride
(1, 2, 2), dense 3x3x3 convs with a fused bias/ReLU/residual tail, the strided 3x3x3
and 1x1x1 downsampling pair, R(2+1)D's (1, 3, 3) + (3, 1, 1) pair, grouped and
depthwise convs) and channel counts no block divides (with asymmetric padding and
dilation) is a small ONNX model: compiled for x86, every conv kernel must name its
packed rule, nothing else may be left (the tail fused, 100% fast-path coverage), and
the outputs match onnxruntime (``graphopt.compile`` verifies by default). Groups no
block fits take the old path and still match. ARM: the same models under qemu, in the
slow tier.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.targets import _conv3d  # noqa: E402
from tests._system import CROSS_GXX, QEMU, needs_host_bf16  # noqa: E402
from tests.conftest import make_model  # noqa: E402


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _conv(x: str, w: str, b: str | None, y: str, **attrs) -> object:  # noqa: ANN003
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], **attrs)


def residual_block():  # noqa: ANN201
    """conv-bias-relu, conv-bias, + input, relu: two dense 3x3x3 convs, 16 channels."""
    rng = np.random.default_rng(0)
    nodes = [
        _conv("x", "w1", "b1", "c1", pads=[1] * 6),
        helper.make_node("Relu", ["c1"], ["r1"]),
        _conv("r1", "w2", "b2", "c2", pads=[1] * 6),
        helper.make_node("Add", ["c2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    inits = {"w1": _w(rng, 16, 16, 3, 3, 3), "b1": _w(rng, 16, 1)[:, 0]}
    inits |= {"w2": _w(rng, 16, 16, 3, 3, 3), "b2": _w(rng, 16, 1)[:, 0]}
    return make_model(nodes, {"x": (1, 16, 4, 8, 8)}, {"y": (1, 16, 4, 8, 8)}, inits), 2


def stem():  # noqa: ANN201
    """R3D's stem: 3 input channels, kernel (3, 7, 7), stride (1, 2, 2), ReLU."""
    rng = np.random.default_rng(1)
    nodes = [
        _conv(
            "x", "w", "b", "c", kernel_shape=[3, 7, 7], pads=[1, 3, 3, 1, 3, 3], strides=[1, 2, 2]
        ),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inits = {"w": _w(rng, 16, 3, 3, 7, 7), "b": _w(rng, 16, 1)[:, 0]}
    return make_model(nodes, {"x": (1, 3, 4, 16, 16)}, {"y": (1, 16, 4, 8, 8)}, inits), 1


def downsample():  # noqa: ANN201
    """The strided pair of a downsampling block: 3x3x3 and 1x1x1, stride 2, added."""
    rng = np.random.default_rng(2)
    nodes = [
        _conv("x", "w1", "b1", "a", pads=[1] * 6, strides=[2, 2, 2]),
        _conv("x", "w2", None, "d", strides=[2, 2, 2]),
        helper.make_node("Add", ["a", "d"], ["y"]),
    ]
    inits = {"w1": _w(rng, 32, 16, 3, 3, 3), "b1": _w(rng, 32, 1)[:, 0]}
    inits |= {"w2": _w(rng, 32, 16, 1, 1, 1)}
    return make_model(nodes, {"x": (1, 16, 4, 8, 8)}, {"y": (1, 32, 2, 4, 4)}, inits), 2


def odd_channels():  # noqa: ANN201
    """5 -> 7 -> 3 channels (no block divides them), asymmetric pads, dilation 2."""
    rng = np.random.default_rng(3)
    nodes = [
        _conv("x", "w1", "b1", "a", pads=[0, 1, 2, 1, 2, 0]),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", None, "y", pads=[2, 2, 2, 2, 2, 2], dilations=[2, 2, 2]),
    ]
    inits = {"w1": _w(rng, 7, 5, 3, 3, 3), "b1": _w(rng, 7, 1)[:, 0], "w2": _w(rng, 3, 7, 3, 3, 3)}
    return make_model(nodes, {"x": (1, 5, 3, 6, 7)}, {"y": (1, 3, 2, 7, 7)}, inits), 2


def factorized():  # noqa: ANN201
    """R(2+1)D's factorized conv on a batch of 2: (1, 3, 3) spatial, ReLU, (3, 1, 1) temporal."""
    rng = np.random.default_rng(5)
    nodes = [
        _conv("x", "w1", "b1", "a", kernel_shape=[1, 3, 3], pads=[0, 1, 1, 0, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", "b2", "y", kernel_shape=[3, 1, 1], pads=[1, 0, 0, 1, 0, 0]),
    ]
    inits = {"w1": _w(rng, 24, 8, 1, 3, 3), "b1": _w(rng, 24, 1)[:, 0]}
    inits |= {"w2": _w(rng, 16, 24, 3, 1, 1), "b2": _w(rng, 16, 1)[:, 0]}
    return make_model(nodes, {"x": (2, 8, 4, 6, 6)}, {"y": (2, 16, 4, 6, 6)}, inits), 2


def grouped_and_depthwise():  # noqa: ANN201
    """A grouped (2 groups, 4 -> 8 channels each) and a depthwise 3-D conv with a bias."""
    rng = np.random.default_rng(4)
    nodes = [
        _conv("x", "w1", None, "a", pads=[1] * 6, group=2),
        _conv("a", "w2", "b2", "y", pads=[1] * 6, group=16, strides=[1, 2, 2]),
    ]
    inits = {
        "w1": _w(rng, 16, 4, 3, 3, 3),
        "w2": _w(rng, 16, 1, 3, 3, 3),
        "b2": _w(rng, 16, 1)[:, 0],
    }
    rules = {_conv3d.GROUPED: 1, _conv3d.DEPTHWISE: 1}
    return make_model(nodes, {"x": (1, 8, 4, 6, 6)}, {"y": (1, 16, 4, 3, 3)}, inits), rules


def odd_groups():  # noqa: ANN201
    """3 channels per group: no block fits inside a group, so the old path (still correct)."""
    rng = np.random.default_rng(6)
    nodes = [_conv("x", "w", None, "y", pads=[1] * 6, group=2)]
    inits = {"w": _w(rng, 6, 3, 3, 3, 3)}
    return make_model(nodes, {"x": (1, 6, 3, 5, 5)}, {"y": (1, 6, 3, 5, 5)}, inits)


PACKED = {
    "residual_block": residual_block,
    "stem": stem,
    "downsample": downsample,
    "odd_channels": odd_channels,
    "factorized": factorized,
    "grouped_and_depthwise": grouped_and_depthwise,
}


@pytest.mark.parametrize("name", list(PACKED))
def test_conv3d_families_take_the_packed_rule_and_match_onnxruntime(name: str, tmp_path) -> None:
    model, convs = PACKED[name]()
    a = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]
    schedule = a.manifest["schedule"]
    # one kernel per conv and nothing else: the weights are packed at compile time, the
    # data packed and the bias/ReLU/residual tail written inside the conv's kernel
    expected = convs if isinstance(convs, dict) else {_conv3d.RULE: convs}
    assert schedule["rules"] == expected
    assert schedule["coverage"] == 100.0
    assert schedule["fallback_kernels"] == []


def test_avx2_blocks_of_eight_match_onnxruntime(tmp_path) -> None:
    """AVX2 (8 float32 lanes): the same rule with 8-channel blocks."""
    model, convs = residual_block()
    a = graphopt.compile(model, "x86", tmp_path / "m.so", target_options={"cpu": "haswell"})
    assert a.manifest["verification"]["ok"]
    assert a.manifest["schedule"]["rules"] == {_conv3d.RULE: convs}


@needs_host_bf16
def test_bf16_precision_keeps_the_packed_rule(tmp_path) -> None:
    """``precision=bf16``: the conv's bf16 operands are converted to float32 as they are
    packed (every product exact, float32 sums), so the packed rule still takes it."""
    model, convs = residual_block()
    a = graphopt.compile(model, "x86", tmp_path / "m.so", precision="bf16")
    assert a.manifest["verification"]["ok"]
    assert a.manifest["schedule"]["rules"].get(_conv3d.RULE) == convs
    assert a.manifest["schedule"]["coverage"] == 100.0


def test_groups_no_block_fits_take_the_old_path_and_match(tmp_path) -> None:
    a = graphopt.compile(odd_groups(), "x86", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]
    assert not set(_conv3d.FAMILIES) & set(a.manifest["schedule"]["rules"])


@pytest.mark.parametrize(
    "cin,cout,lanes,expected",
    [
        (64, 128, 16, (16, 16)),
        (3, 64, 16, (3, 16)),  # a thin input is one block
        (24, 24, 16, (8, 8)),
        (5, 7, 16, (5, 8)),  # 7 outputs: one zero-padded block of 8
        (57, 57, 16, (16, 16)),  # nothing divides: blocks of the lanes, zero-padded
        (64, 3, 4, (4, 4)),
    ],
)
def test_channel_blocks(cin: int, cout: int, lanes: int, expected: tuple[int, int]) -> None:
    assert _conv3d.blocks(cin, cout, lanes) == expected


@pytest.mark.slow
@CROSS_GXX
@QEMU
@pytest.mark.parametrize("name", list(PACKED))
def test_conv3d_on_arm_matches_onnxruntime(name: str, tmp_path) -> None:
    model, convs = PACKED[name]()
    a = graphopt.compile(model, "arm", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]
    expected = convs if isinstance(convs, dict) else {_conv3d.RULE: convs}
    assert a.manifest["schedule"]["rules"] == expected
