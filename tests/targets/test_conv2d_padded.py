"""2-D convs the packed-NCHWc layout pass leaves in NCHW take the padded packed rules.

The layout pass (graphopt/targets/_nchwc.py) packs a conv only where a block of (lanes,
8, 4, 2) divides its channels; RexNet's 27, 61, 151 channels, the 21-class heads of
LRASPP and FCN, and every conv of ``layout=nchw`` stay NCHW. graphopt/targets/_conv3d.py
takes them as depth-1 packed convs (rules ``conv2d_padded``, ``depthwise_conv2d_padded``,
``grouped_conv2d_padded``): the input packed (channels zero-padded to a block) inside the
kernel, NCHW out with the fused tail. Each case is a small ONNX model: compiled for x86,
every conv kernel must name its rule, nothing may fall to a generic rule (100% fast-path
coverage), and the outputs match onnxruntime (``graphopt.compile`` verifies). Convs the
layout pass packs keep their rules. ``layout=nhwc`` leaves the same convs' weights
unblocked (plain OHWI): the same kernels, in NHWC. ARM: the same models under qemu
(``layout=nchwc``), in the slow tier.
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
from tests.targets._cnn_blocks import conv_rules  # noqa: E402

DENSE, DEPTHWISE, GROUPED = _conv3d.CONV2D, _conv3d.DEPTHWISE2D, _conv3d.GROUPED2D


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _b(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def _conv(x: str, w: str, b: str | None, y: str, **attrs) -> object:  # noqa: ANN003
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], **attrs)


def odd_pointwise():  # noqa: ANN201
    """RexNet's 1x1 pair: 16 -> 27 (odd out, bias) then 27 -> 38 (odd in, bias, ReLU6)."""
    rng = np.random.default_rng(0)
    nodes = [
        _conv("x", "w1", "b1", "a"),
        _conv("a", "w2", "b2", "c"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
    ]
    inits = {"w1": _w(rng, 27, 16, 1, 1), "b1": _b(rng, 27)}
    inits |= {"w2": _w(rng, 38, 27, 1, 1), "b2": _b(rng, 38)}
    inits |= {"lo": np.float32(0), "hi": np.float32(6)}
    return make_model(nodes, {"x": (1, 16, 9, 9)}, {"y": (1, 38, 9, 9)}, inits), {DENSE: 2}


def silu_tail():  # noqa: ANN201
    """27 -> 162 1x1 (RexNet's expansion), bias, x * sigmoid(x) (SiLU: the tail reads the
    conv twice) as the model's output."""
    rng = np.random.default_rng(7)
    nodes = [
        _conv("x", "w", "b", "c"),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["y"]),
    ]
    inits = {"w": _w(rng, 162, 27, 1, 1), "b": _b(rng, 162)}
    return make_model(nodes, {"x": (1, 27, 10, 10)}, {"y": (1, 162, 10, 10)}, inits), {DENSE: 1}


def odd_3x3():  # noqa: ANN201
    """27 -> 38 3x3 stride 1, ReLU, 38 -> 27 3x3 stride 2 with asymmetric pads, + bias."""
    rng = np.random.default_rng(1)
    nodes = [
        _conv("x", "w1", None, "a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", "b2", "y", pads=[0, 1, 1, 0], strides=[2, 2]),
    ]
    inits = {"w1": _w(rng, 38, 27, 3, 3), "w2": _w(rng, 27, 38, 3, 3), "b2": _b(rng, 27)}
    return make_model(nodes, {"x": (1, 27, 10, 11)}, {"y": (1, 27, 5, 5)}, inits), {DENSE: 2}


def odd_depthwise():  # noqa: ANN201
    """Depthwise convs on 27 channels: 3x3 stride 2 with a bias, then 3x3 dilation 2."""
    rng = np.random.default_rng(2)
    nodes = [
        _conv("x", "w1", "b1", "a", pads=[1, 1, 1, 1], strides=[2, 2], group=27),
        _conv("a", "w2", None, "y", pads=[2, 2, 2, 2], dilations=[2, 2], group=27),
    ]
    inits = {"w1": _w(rng, 27, 1, 3, 3), "b1": _b(rng, 27), "w2": _w(rng, 27, 1, 3, 3)}
    return make_model(nodes, {"x": (1, 27, 12, 12)}, {"y": (1, 27, 6, 6)}, inits), {DEPTHWISE: 2}


def segmentation_head():  # noqa: ANN201
    """LRASPP/FCN's classifier: 1x1 to 21 classes with a bias, beside a packed 3x3 conv
    (16 -> 16, which keeps its ``conv2d_nchwc`` rule) whose ReLU output it reads."""
    rng = np.random.default_rng(3)
    nodes = [
        _conv("x", "w1", "b1", "a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", "b2", "y"),
    ]
    inits = {"w1": _w(rng, 16, 16, 3, 3), "b1": _b(rng, 16)}
    inits |= {"w2": _w(rng, 21, 16, 1, 1), "b2": _b(rng, 21)}
    rules = {"conv2d_nchwc": 1, DENSE: 1}
    # a 6x6 map: too few tiles for Winograd (an 8x8 one takes 16 of 2x2)
    return make_model(nodes, {"x": (1, 16, 6, 6)}, {"y": (1, 21, 6, 6)}, inits), rules


def squeeze_excitation():  # noqa: ANN201
    """RexNet's SE gate on one pixel: mean, 36 -> 3 (ReLU; 3 outputs: left in NCHW),
    3 -> 36 (a thin input: packed, ``pointwise_nchwc``), sigmoid, times x."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["m"]),
        _conv("m", "w1", "b1", "a"),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", "b2", "g"),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["y"]),
    ]
    inits = {"w1": _w(rng, 3, 36, 1, 1), "b1": _b(rng, 3)}
    inits |= {"w2": _w(rng, 36, 3, 1, 1), "b2": _b(rng, 36)}
    rules = {DENSE: 1, "pointwise_nchwc": 1}
    return make_model(nodes, {"x": (1, 36, 6, 6)}, {"y": (1, 36, 6, 6)}, inits), rules


def narrow_blocks():  # noqa: ANN201
    """ShuffleNetV2's branch on 58 channels (a block of 2 divides it): 1x1 + ReLU, 3x3
    depthwise, 1x1 + ReLU. Packed, they ran at a quarter of the vector width; they stay
    NCHW and take the padded kernels (output channels zero-padded to full vectors)."""
    rng = np.random.default_rng(5)
    nodes = [
        _conv("x", "w1", "b1", "a"),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", "b2", "d", pads=[1, 1, 1, 1], group=58),
        _conv("d", "w3", "b3", "c"),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inits = {"w1": _w(rng, 58, 58, 1, 1), "b1": _b(rng, 58)}
    inits |= {"w2": _w(rng, 58, 1, 3, 3), "b2": _b(rng, 58)}
    inits |= {"w3": _w(rng, 58, 58, 1, 1), "b3": _b(rng, 58)}
    rules = {DENSE: 1, DEPTHWISE: 1}  # the two 1x1 convs + ReLU: one kernel, called twice
    return make_model(nodes, {"x": (1, 58, 10, 10)}, {"y": (1, 58, 10, 10)}, inits), rules


def gate_over_padded_map():  # noqa: ANN201
    """RexNet's SE expansion 19 -> 228 on the pooled pixel, sigmoid, times a 228-channel
    map that stays NCHW, ReLU6: the gate's broadcast multiply fuses into the padded
    conv's kernel as a loop nest of its own (TVM cannot inline it into the tile)."""
    rng = np.random.default_rng(6)
    nodes = [
        _conv("g", "w", "b", "c"),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["m"]),
        helper.make_node("Clip", ["m", "lo", "hi"], ["y"]),
    ]
    inits = {"w": _w(rng, 228, 19, 1, 1), "b": _b(rng, 228)}
    inits |= {"lo": np.float32(0), "hi": np.float32(6)}
    inputs = {"x": (1, 228, 7, 7), "g": (1, 19, 1, 1)}
    return make_model(nodes, inputs, {"y": (1, 228, 7, 7)}, inits), {DENSE: 1}


PADDED = {
    "narrow_blocks": narrow_blocks,
    "gate_over_padded_map": gate_over_padded_map,
    "odd_pointwise": odd_pointwise,
    "silu_tail": silu_tail,
    "odd_3x3": odd_3x3,
    "odd_depthwise": odd_depthwise,
    "segmentation_head": segmentation_head,
    "squeeze_excitation": squeeze_excitation,
}


@pytest.mark.parametrize("name", list(PADDED))
def test_unpacked_convs_take_the_padded_rule_and_match_onnxruntime(name: str, tmp_path) -> None:
    model, rules = PADDED[name]()
    a = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]
    schedule = a.manifest["schedule"]
    assert conv_rules(schedule) == rules
    assert schedule["coverage"] == 100.0
    assert schedule["fallback_kernels"] == []


@pytest.mark.parametrize("name", ["odd_3x3", "odd_depthwise", "segmentation_head"])
def test_nhwc_layout_unblocked_convs_take_the_padded_rule(name: str, tmp_path) -> None:
    """``layout=nhwc`` (ARM's default) leaves these convs' weights plain OHWI (no block
    divides the output channels): the same padded kernels, reading and writing NHWC; the
    blocked one keeps ``conv2d_nhwc``."""
    model, rules = PADDED[name]()
    a = graphopt.compile(model, "x86", tmp_path / "m.so", layout="nhwc")
    assert a.manifest["verification"]["ok"]
    expected = {r.replace("_nchwc", "_nhwc"): n for r, n in rules.items()}
    assert conv_rules(a.manifest["schedule"]) == expected
    assert a.manifest["schedule"]["coverage"] == 100.0


@needs_host_bf16
def test_bf16_precision_keeps_the_padded_rule(tmp_path) -> None:
    """``precision=bf16``: the bf16 operands are converted to float32 as they are packed
    (every product exact, float32 sums), so the padded rule still takes the convs."""
    model, rules = odd_pointwise()
    a = graphopt.compile(model, "x86", tmp_path / "m.so", precision="bf16")
    assert a.manifest["verification"]["ok"]
    assert conv_rules(a.manifest["schedule"]) == rules
    assert a.manifest["schedule"]["coverage"] == 100.0


def test_plain_nchw_layout_takes_the_padded_rules(tmp_path) -> None:
    """``layout=nchw``: no conv is packed by the layout pass, so every one, a grouped one
    (2 groups of 8) included, is a padded packed kernel."""
    rng = np.random.default_rng(5)
    nodes = [
        _conv("x", "w1", "b1", "a", pads=[1, 1, 1, 1]),
        _conv("a", "w2", None, "y", pads=[1, 1, 1, 1], group=2),
    ]
    inits = {"w1": _w(rng, 16, 16, 3, 3), "b1": _b(rng, 16), "w2": _w(rng, 16, 8, 3, 3)}
    model = make_model(nodes, {"x": (1, 16, 7, 7)}, {"y": (1, 16, 7, 7)}, inits)
    a = graphopt.compile(model, "x86", tmp_path / "m.so", layout="nchw")
    assert a.manifest["verification"]["ok"]
    assert conv_rules(a.manifest["schedule"]) == {DENSE: 1, GROUPED: 1}
    assert a.manifest["schedule"]["coverage"] == 100.0


def test_groups_no_block_fits_take_the_old_path_and_match(tmp_path) -> None:
    """3 channels per group (2 groups): no block fits inside a group, so TOPI's conv (a
    generic rule, named in ``fallback_kernels``), still correct."""
    rng = np.random.default_rng(6)
    nodes = [_conv("x", "w", None, "y", pads=[1, 1, 1, 1], group=2)]
    model = make_model(nodes, {"x": (1, 6, 5, 5)}, {"y": (1, 6, 5, 5)}, {"w": _w(rng, 6, 3, 3, 3)})
    a = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]
    assert not set(_conv3d.FAMILIES) & set(a.manifest["schedule"]["rules"])
    assert a.manifest["schedule"]["fallback_kernels"]


@pytest.mark.parametrize(
    "cin,cout,lanes,expected",
    [
        (27, 38, 16, (27, 16)),  # no block divides 27: one block of all (not zero-padded)
        (96, 27, 16, (16, 16)),  # 27 outputs: 2 blocks of 16, 5 zero channels
        (162, 151, 16, (2, 16)),
        (40, 21, 8, (8, 8)),
        (36, 3, 16, (4, 4)),  # 3 outputs: one block of 4
        (61, 366, 4, (61, 4)),
    ],
)
def test_channel_blocks(cin: int, cout: int, lanes: int, expected: tuple[int, int]) -> None:
    assert _conv3d.blocks2d(cin, cout, lanes) == expected


@pytest.mark.slow
@CROSS_GXX
@QEMU
@pytest.mark.parametrize("name", list(PADDED))
def test_padded_convs_on_arm_match_onnxruntime(name: str, tmp_path) -> None:
    model, rules = PADDED[name]()
    # ARM's default layout is NHWC (no conv left in NCHW): the packed one leaves these
    a = graphopt.compile(model, "arm", tmp_path / "m.so", layout="nchwc")
    assert a.manifest["verification"]["ok"]
    assert conv_rules(a.manifest["schedule"]) == rules
    assert a.manifest["schedule"]["fallback_kernels"] == []


@pytest.mark.slow
@CROSS_GXX
@QEMU
@pytest.mark.parametrize("name", ["odd_depthwise", "segmentation_head"])
def test_padded_convs_in_arms_default_nhwc_match_onnxruntime(name: str, tmp_path) -> None:
    model, rules = PADDED[name]()
    a = graphopt.compile(model, "arm", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]
    expected = {r.replace("_nchwc", "_nhwc"): n for r, n in rules.items()}
    assert conv_rules(a.manifest["schedule"]) == expected
    assert a.manifest["schedule"]["coverage"] == 100.0
