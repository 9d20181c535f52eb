"""Small ONNX CNNs, one per conv family and layout-carrying pattern of public models
(EfficientNet, MobileNetV3, ShuffleNetV2, ResNeXt, RegNet, FCN/U-Net decoders), built
with fixed seeds."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt.zoo import _Builder
from tests.conftest import make_model

__all__ = ["BLOCKS", "build_block", "inverted_residual"]


def _f(b: _Builder, value: float) -> str:
    return b.const(np.float32(value), "s")


def _i64(b: _Builder, values) -> str:  # noqa: ANN001
    return b.const(np.array(values, np.int64), "i")


def _silu(b: _Builder, x: str) -> str:
    return b.op("Mul", [x, b.op("Sigmoid", [x])])


def _se(b: _Builder, x: str, c: int, squeeze: int, gate: str = "Sigmoid", fc: str = "conv") -> str:
    """Squeeze-excitation: GlobalAveragePool -> 1x1 conv (or Gemm) -> act -> gate -> Mul."""
    s = b.op("GlobalAveragePool", [x])
    if fc == "conv":
        s = b.op("Relu", [b.conv(s, c, squeeze, 1)])
        s = b.conv(s, squeeze, c, 1)
    else:
        s = b.op("Flatten", [s], axis=1)
        s = b.op("Relu", [b.gemm(s, c, squeeze)])
        s = b.op("Reshape", [b.gemm(s, squeeze, c), _i64(b, [1, c, 1, 1])])
    s = (
        b.op("HardSigmoid", [s], alpha=1 / 6, beta=0.5)
        if gate == "HardSigmoid"
        else b.op(gate, [s])
    )
    return b.op("Mul", [x, s])


def mbconv_se() -> onnx.ModelProto:
    """EfficientNet-B0 style: stem, MBConv with SiLU, depthwise 3x3 and 5x5 (strides 1, 2),
    squeeze-excitation with a conv and a Gemm excitation, residual add, GAP + Gemm head."""
    b = _Builder("mbconv_se", seed=21)
    x = _silu(b, b.bn(b.conv("input", 3, 32, 3, stride=2, bias=False), 32))  # 32x16x16
    y = _silu(b, b.bn(b.conv(x, 32, 32, 3, groups=32, bias=False), 32))
    y = _se(b, y, 32, 8)
    x = b.bn(b.conv(y, 32, 24, 1, bias=False), 24)  # 24 channels: not a 16-multiple
    y = _silu(b, b.bn(b.conv(x, 24, 144, 1, bias=False), 144))
    y = _silu(b, b.bn(b.conv(y, 144, 144, 5, stride=2, groups=144, bias=False), 144))
    y = _se(b, y, 144, 6, fc="gemm")
    x = b.bn(b.conv(y, 144, 40, 1, bias=False), 40)  # 8x8
    y = _silu(b, b.conv(x, 40, 240, 1))
    y = _silu(b, b.conv(y, 240, 240, 7, groups=240))
    y = _se(b, y, 240, 10)
    x = b.op("Add", [x, b.conv(y, 240, 40, 1)])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    return b.model({"input": (1, 3, 32, 32)}, [b.gemm(x, 40, 10)])


def hardswish_se() -> onnx.ModelProto:
    """MobileNetV3 style: HardSwish, Clip (ReLU6), HardSigmoid SE gate, Pad."""
    b = _Builder("hardswish_se", seed=22)
    x = b.op("HardSwish", [b.conv("input", 3, 16, 3, stride=2)])  # 16x16x16
    y = b.op("Clip", [b.conv(x, 16, 16, 3, groups=16), _f(b, 0.0), _f(b, 6.0)])
    y = _se(b, y, 16, 8, gate="HardSigmoid")
    x = b.op("Add", [x, b.conv(y, 16, 16, 1)])
    x = b.op("Pad", [x, _i64(b, [0, 0, 1, 1, 0, 0, 1, 1])], mode="constant")  # 18x18
    x = b.op("HardSwish", [b.conv(x, 16, 32, 3, pad=0)])  # 16x16
    x = b.op("Relu", [b.conv(x, 32, 32, 3, stride=2)])
    return b.model({"input": (1, 3, 32, 32)}, [x])


def channel_shuffle() -> onnx.ModelProto:
    """ShuffleNetV2 style: Slice on channels (a Split), depthwise stride 1 and 2, Concat, channel
    shuffle (Reshape -> Transpose -> Reshape), a MaxPool after the stem."""
    b = _Builder("channel_shuffle", seed=23)
    x = b.op("Relu", [b.conv("input", 3, 24, 3, stride=2)])  # 24x16x16
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])  # 8x8

    def shuffle(x: str, c: int, h: int) -> str:
        x = b.op("Reshape", [x, _i64(b, [1, 2, c // 2, h, h])])
        x = b.op("Transpose", [x], perm=[0, 2, 1, 3, 4])
        return b.op("Reshape", [x, _i64(b, [1, c, h, h])])

    # down-sampling unit: two branches, 24 -> 58 + 58 = 116 channels
    left = b.conv(b.conv(x, 24, 24, 3, stride=2, groups=24), 24, 58, 1)
    right = b.op("Relu", [b.conv(x, 24, 58, 1)])
    right = b.op("Relu", [b.conv(b.conv(right, 58, 58, 3, stride=2, groups=58), 58, 58, 1)])
    x = shuffle(b.op("Concat", [b.op("Relu", [left]), right], axis=1), 116, 4)
    # basic unit: split in halves
    a = b.op("Slice", [x, _i64(b, [0]), _i64(b, [58]), _i64(b, [1])])
    c = b.op("Slice", [x, _i64(b, [58]), _i64(b, [116]), _i64(b, [1])])
    c = b.op("Relu", [b.conv(c, 58, 58, 1)])
    c = b.op("Relu", [b.conv(b.conv(c, 58, 58, 3, groups=58), 58, 58, 1)])
    x = shuffle(b.op("Concat", [a, c], axis=1), 116, 4)
    x = b.op("Relu", [b.conv(x, 116, 128, 1)])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    return b.model({"input": (1, 3, 32, 32)}, [b.gemm(x, 128, 10)])


def grouped_bottleneck() -> onnx.ModelProto:
    """ResNeXt / RegNet style: 1x1 -> grouped 3x3 (groups of 4, 8, 16 channels; strides
    1, 2) -> 1x1 with residual adds and a strided projection shortcut; a slice on channels."""
    b = _Builder("grouped_bottleneck", seed=24)
    x = b.op("Relu", [b.bn(b.conv("input", 3, 64, 7, stride=2, pad=3, bias=False), 64)])
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])  # 64x16x16
    # ResNeXt 32x4d: 128 channels in 32 groups of 4
    y = b.op("Relu", [b.conv(x, 64, 128, 1)])
    y = b.op("Relu", [b.conv(y, 128, 128, 3, groups=32)])
    x = b.op("Relu", [b.op("Add", [x, b.conv(y, 128, 64, 1)])])
    # RegNet: groups of 8 and 16 channels, stride 2
    y = b.op("Relu", [b.conv(x, 64, 96, 1)])
    y = b.op("Relu", [b.conv(y, 96, 96, 3, stride=2, groups=12)])
    y = _se(b, y, 96, 16)
    y = b.conv(y, 96, 96, 1)
    short = b.conv(x, 64, 96, 1, stride=2)
    x = b.op("Relu", [b.op("Add", [y, short])])  # 96x8x8
    y = b.op("Relu", [b.conv(x, 96, 96, 3, groups=6, dilation=2)])  # dilated grouped
    x = b.op("Add", [x, y])
    x = b.op("Slice", [x, _i64(b, [0]), _i64(b, [80]), _i64(b, [1])])  # 80 channels
    x = b.op("Relu", [b.conv(x, 80, 64, 3)])
    return b.model({"input": (1, 3, 64, 64)}, [x])


def odd_concat() -> onnx.ModelProto:
    """Concat of 24 + 20 + 4 channels (not multiples of a vector), dilated conv, stride 2."""
    b = _Builder("odd_concat", seed=25)
    x = b.op("Relu", [b.conv("input", 4, 24, 3)])  # 24x16x16
    y = b.op("Relu", [b.conv(x, 24, 20, 3, dilation=2)])
    z = b.op("Concat", [x, y, "input"], axis=1)  # 48 channels
    z = b.op("Relu", [b.conv(z, 48, 32, 3, stride=2)])
    return b.model({"input": (1, 4, 16, 16)}, [z])


def _up(b: _Builder, x: str, cin: int, cout: int, k: int, stride: int, **attrs) -> str:
    """ConvTranspose with a random weight (and bias): ``attrs`` are its attributes."""
    groups = attrs.get("group", 1)
    w = b.weight((cin, cout // groups, k, k), cin // groups * k * k // stride**2)
    bias = b.const((b.rng.standard_normal(cout) * 0.1).astype(np.float32), "b")
    return b.op("ConvTranspose", [x, w, bias], kernel_shape=[k, k], strides=[stride] * 2, **attrs)


def decoder() -> onnx.ModelProto:
    """FCN / U-Net / LRASPP style upsampling: ConvTranspose 4x4 stride 2 with BatchNorm
    folded into it, 2x2 stride 2, a depthwise 4x4 stride 2 with output_padding and
    asymmetric pads, 3x3 stride 1; a channel Split, nearest and bilinear Resize, and a
    U-Net skip Concat."""
    b = _Builder("decoder", seed=26)
    x = b.op("Relu", [b.conv("input", 8, 32, 3, stride=2)])  # 32x8x8
    a, c = b.op("Split", [x, _i64(b, [24, 8])], n_out=2, axis=1)
    y = b.op("Relu", [b.bn(_up(b, a, 24, 24, 4, 2, pads=[1, 1, 1, 1]), 24)])  # 24x16x16
    near = b.op("Resize", [c, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    y = b.op("Concat", [y, near, "input"], axis=1)  # 40 channels, a skip
    y = b.op("Relu", [_up(b, y, 40, 16, 2, 2)])  # 16x32x32
    sizes = _i64(b, [1, 16, 40, 40])  # bilinear, as torch exports F.interpolate
    y = b.op(
        "Resize",
        [y, "", "", sizes],
        mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel",
    )
    y = b.op("Relu", [b.conv(y, 16, 16, 3)])
    y = _up(b, y, 16, 16, 4, 2, group=16, pads=[1, 2, 2, 1], output_padding=[1, 0])  # 80x79
    y = _up(b, b.op("Relu", [y]), 16, 8, 3, 1, pads=[1, 1, 1, 1])
    return b.model({"input": (1, 8, 16, 16)}, [y])


BLOCKS = {
    "mbconv_se": mbconv_se,
    "hardswish_se": hardswish_se,
    "channel_shuffle": channel_shuffle,
    "grouped_bottleneck": grouped_bottleneck,
    "odd_concat": odd_concat,
    "decoder": decoder,
}


def inverted_residual(  # noqa: PLR0913
    size: int,
    channels: int = 32,
    expand: int = 96,
    stride: int = 1,
    out: int = 32,
    shared: bool = False,
    pointwise_stride: int = 1,
) -> onnx.ModelProto:
    """MobileNetV2's inverted residual: 1x1 expand + ReLU6, 3x3 depthwise (``stride``) +
    ReLU6, 1x1 projection (``pointwise_stride``) with bias, the input added back when the
    shapes allow. ``shared``: a squeeze-excitation gate (EfficientNet's) between the
    depthwise conv and the projection, its pool a second reader of the map."""
    rng = np.random.default_rng(size + stride + expand)

    def weight(o: int, i: int, k: int) -> np.ndarray:
        return (rng.standard_normal((o, i, k, k)) / np.sqrt(i * k * k)).astype(np.float32)

    inits = {
        "we": weight(expand, channels, 1),
        "wd": weight(expand, 1, 3),
        "bd": rng.standard_normal(expand).astype(np.float32),
        "wp": weight(out, expand, 1),
        "bp": rng.standard_normal(out).astype(np.float32),
        "lo": np.float32(0.0),
        "hi": np.float32(6.0),
    }
    nodes = [
        helper.make_node("Conv", ["x", "we"], ["e"]),
        helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
        helper.make_node(
            "Conv", ["e6", "wd", "bd"], ["d"], group=expand, pads=[1] * 4, strides=[stride] * 2
        ),
        helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
    ]
    inner = -(-size // stride)
    if shared:  # a squeeze-excitation gate: its pool is a second reader of the map
        nodes.append(helper.make_node("GlobalAveragePool", ["d6"], ["g"]))
        nodes.append(helper.make_node("Sigmoid", ["g"], ["gs"]))
        nodes.append(helper.make_node("Mul", ["d6", "gs"], ["d6b"]))
    source = "d6b" if shared else "d6"
    nodes.append(
        helper.make_node("Conv", [source, "wp", "bp"], ["p"], strides=[pointwise_stride] * 2)
    )
    final = -(-inner // pointwise_stride)
    if stride == pointwise_stride == 1 and channels == out:
        nodes.append(helper.make_node("Add", ["p", "x"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["p"], ["y"]))
    return make_model(nodes, {"x": (1, channels, size, size)}, {"y": (1, out, final, final)}, inits)


def build_block(name: str) -> onnx.ModelProto:
    return BLOCKS[name]()


def conv_rules(schedule: dict) -> dict[str, int]:
    """A manifest's rule counts without the rules for other kernels (the conv rules)."""
    others = ("injective", "reduction", "fallback", "matmul")
    return {r: n for r, n in schedule["rules"].items() if r not in others}
