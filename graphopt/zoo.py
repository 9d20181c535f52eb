"""Built-in example models, built from code with fixed seeds (no downloads).

Every model here is compiled and checked against onnxruntime by the tests, and the
benchmark script measures each one. ``ZOO`` maps a name to a function returning an
``onnx.ModelProto``; ``graphopt example NAME -o model.onnx`` writes one to disk.
BatchNormalization stays in the graphs (as a user's un-folded export would have it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import GraphoptError

__all__ = ["ZOO", "DESCRIPTIONS", "build"]

OPSET = 17


class _Builder:
    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        node_name = self._name(op_type.lower())
        outs = [f"{node_name}_out{i}" if n_out > 1 else node_name for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs if n_out > 1 else outs[0]

    def weight(self, shape: tuple[int, ...], fan_in: int) -> str:
        w = self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        return self.const(w.astype(np.float32), "w")

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int | tuple[int, int],
        stride: int = 1,
        pad: int | list[int] | None = None,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
        auto_pad: str | None = None,
    ) -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        w = self.weight((cout, cin // groups, kh, kw), cin // groups * kh * kw)
        inputs = [x, w]
        if bias:
            inputs.append(
                self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b")
            )
        attrs = {
            "kernel_shape": [kh, kw],
            "strides": [stride, stride],
            "dilations": [dilation, dilation],
            "group": groups,
        }
        if auto_pad:
            attrs["auto_pad"] = auto_pad
        else:
            p = pad if pad is not None else (kh // 2) * dilation
            attrs["pads"] = p if isinstance(p, list) else [p, p, p, p]
        return self.op("Conv", inputs, **attrs)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            r.uniform(0.5, 1.5, c),
            r.normal(0, 0.1, c),
            r.normal(0, 0.1, c),
            r.uniform(0.5, 1.5, c),
        ]
        names = [self.const(p.astype(np.float32), "bn") for p in params]
        return self.op("BatchNormalization", [x, *names], epsilon=1e-5)

    def gemm(self, x: str, cin: int, cout: int) -> str:
        w = self.weight((cout, cin), cin)
        b = self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b")
        return self.op("Gemm", [x, w, b], transB=1)

    def model(self, inputs: dict[str, tuple], outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_empty_tensor_value_info(o) for o in outputs],
            self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphopt.zoo"
        )
        model.ir_version = 8
        # Give the outputs their inferred shapes, as an exporter would.
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        known = {v.name: v for v in inferred.graph.value_info}
        for out in model.graph.output:
            out.CopyFrom(known[out.name])
        onnx.checker.check_model(model, full_check=True)
        return model


def _conv_bn(
    b: _Builder,
    x: str,
    cin: int,
    cout: int,
    k: int,
    stride: int = 1,
    groups: int = 1,
    act: str | None = "Relu",
) -> str:
    y = b.bn(b.conv(x, cin, cout, k, stride, groups=groups, bias=False), cout)
    if act == "Relu":
        return b.op("Relu", [y])
    if act == "Relu6":
        return b.op("Clip", [y, b.const(np.float32(0.0), "min"), b.const(np.float32(6.0), "max")])
    return y


def resnet18(num_classes: int = 1000) -> onnx.ModelProto:
    """ResNet-18 (torchvision layout), 1x3x224x224, BatchNorm left un-folded."""
    b = _Builder("resnet18", seed=18)
    x = _conv_bn(b, "input", 3, 64, 7, stride=2)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate([64, 128, 256, 512]):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = _conv_bn(b, x, cin, cout, 3, stride)
            y = _conv_bn(b, y, cout, cout, 3, act=None)
            short = x
            if stride != 1 or cin != cout:
                short = _conv_bn(b, x, cin, cout, 1, stride, act=None)
            x = b.op("Relu", [b.op("Add", [y, short])])
            cin = cout
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    out = b.gemm(x, 512, num_classes)
    return b.model({"input": (1, 3, 224, 224)}, [out])


def mobilenetv2(num_classes: int = 1000) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0), 1x3x224x224: depthwise convs, ReLU6 as Clip, residual adds."""
    b = _Builder("mobilenetv2", seed=2)
    x = _conv_bn(b, "input", 3, 32, 3, stride=2, act="Relu6")
    cin = 32
    config = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    for t, c, n, s in config:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x if t == 1 else _conv_bn(b, x, cin, hidden, 1, act="Relu6")
            y = _conv_bn(b, y, hidden, hidden, 3, stride, groups=hidden, act="Relu6")
            y = _conv_bn(b, y, hidden, c, 1, act=None)
            x = b.op("Add", [x, y]) if stride == 1 and cin == c else y
            cin = c
    x = _conv_bn(b, x, cin, 1280, 1, act="Relu6")
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    x = b.op("Dropout", [x, b.const(np.float32(0.2), "ratio")])
    out = b.gemm(x, 1280, num_classes)
    return b.model({"input": (1, 3, 224, 224)}, [out])


def small_cnn() -> onnx.ModelProto:
    """A CIFAR-sized CNN: conv+bias+ReLU, BatchNorm, max/avg pooling, Gemm, Softmax."""
    b = _Builder("small_cnn", seed=7)
    x = b.op("Relu", [b.conv("input", 3, 32, 3)])
    x = b.op("Relu", [b.bn(b.conv(x, 32, 32, 3, bias=False), 32)])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Relu", [b.bn(b.conv(x, 32, 64, 3), 64)])
    x = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Relu", [b.conv(x, 64, 64, 3)])
    x = b.op("Flatten", [x], axis=1)
    x = b.op("Relu", [b.gemm(x, 64 * 8 * 8, 128)])
    out = b.op("Softmax", [b.gemm(x, 128, 10)], axis=-1)
    return b.model({"input": (1, 3, 32, 32)}, [out])


def conv_variants() -> onnx.ModelProto:
    """Conv attributes side by side: groups, strides, dilations, auto_pad modes, asymmetric
    pads, 1x1 and non-square kernels; branches joined with Concat, Mul and Add."""
    b = _Builder("conv_variants", seed=11)
    x = "input"  # 1x8x17x17: odd size so SAME/ceil arithmetic is exercised
    a = b.conv(x, 8, 8, 3, groups=4)  # grouped
    c = b.conv(x, 8, 8, 3, dilation=2)  # dilated, pads 2
    d = b.conv(x, 8, 8, 3, groups=8, bias=False)  # depthwise, no bias
    e = b.conv(x, 8, 8, (1, 3), pad=[0, 1, 0, 1])  # non-square kernel
    y = b.op("Concat", [a, c, d, e], axis=1)  # 32 channels
    s1 = b.conv(y, 32, 16, 3, stride=2, auto_pad="SAME_UPPER")  # 9x9
    s2 = b.conv(y, 32, 16, 3, stride=2, auto_pad="SAME_LOWER")  # 9x9
    s3 = b.conv(y, 32, 16, 3, stride=2, pad=[1, 0, 1, 2])  # asymmetric -> 9x9
    z = b.op("Add", [b.op("Mul", [s1, s2]), s3])
    v = b.conv(y, 32, 16, 3, stride=2, auto_pad="VALID")  # 8x8
    w = b.conv(z, 16, 16, 1)  # 1x1
    gap = b.op("GlobalAveragePool", [v])
    out = b.op("Add", [w, gap])  # broadcast over H, W
    return b.model({"input": (1, 8, 17, 17)}, [out])


def pool_variants() -> onnx.ModelProto:
    """Pooling edge cases: ceil_mode, padded average pooling with and without
    count_include_pad, strided/padded max pooling; five outputs."""
    b = _Builder("pool_variants", seed=5)
    x = b.op("Relu", [b.conv("input", 4, 8, 3)])  # 1x8x15x15
    m1 = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    m2 = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    a1 = b.op(
        "AveragePool",
        [x],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        count_include_pad=0,
        ceil_mode=1,
    )
    a2 = b.op(
        "AveragePool",
        [x],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        count_include_pad=1,
        ceil_mode=1,
    )
    a3 = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    g = b.op("GlobalAveragePool", [x])
    return b.model({"input": (1, 4, 15, 15)}, [m1, m2, a2, b.op("Sub", [a1, g]), a3])


def mlp_head() -> onnx.ModelProto:
    """Tensor plumbing after a conv: Reshape/Transpose/MatMul/Softmax, Flatten, Gemm."""
    b = _Builder("mlp_head", seed=3)
    x = b.op("Relu", [b.conv("input", 3, 16, 3, stride=2)])  # 1x16x8x8
    x = b.op("Reshape", [x, b.const(np.array([1, 16, 64], np.int64), "shape")])
    x = b.op("Transpose", [x], perm=[0, 2, 1])  # 1x64x16
    w = b.weight((16, 24), 16)
    x = b.op("MatMul", [x, w])  # 1x64x24
    x = b.op("Add", [x, b.const(np.full(24, 0.1, np.float32), "b")])
    att = b.op("Softmax", [b.op("MatMul", [x, b.op("Transpose", [x], perm=[0, 2, 1])])], axis=-1)
    x = b.op("MatMul", [att, x])  # 1x64x24
    x = b.op("Flatten", [x], axis=1)
    out = b.op("Sigmoid", [b.gemm(x, 64 * 24, 10)])
    return b.model({"input": (1, 3, 16, 16)}, [out])


ZOO: dict[str, Callable[[], onnx.ModelProto]] = {
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
    "small_cnn": small_cnn,
    "conv_variants": conv_variants,
    "pool_variants": pool_variants,
    "mlp_head": mlp_head,
}
DESCRIPTIONS = {name: (fn.__doc__ or "").strip().split("\n")[0] for name, fn in ZOO.items()}


def build(name: str) -> onnx.ModelProto:

    if name not in ZOO:
        raise GraphoptError(f"unknown example {name!r}; examples: {', '.join(ZOO)}")
    return ZOO[name]()
