"""Run a (zoo-sized) ONNX graph with torch eager ops, for a torch-eager latency column.

Only what the zoo's CNNs use, with the semantics torch modules would have (Conv2d with
symmetric padding, BatchNorm2d in eval mode, ...). Models using anything else are
reported as "n/a" by the benchmark rather than approximated.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


class Unsupported(Exception):
    pass


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _sym_pads(pads, n):
    pads = list(pads or [0] * 2 * n)
    if pads[:n] != pads[n:]:
        raise Unsupported("asymmetric pads")
    return pads[:n]


def build(model: onnx.ModelProto, device: str = "cpu"):
    """Return a function ``f(**inputs) -> list[torch.Tensor]`` running the graph eagerly.

    On ``device`` (e.g. "cuda"): float weights and the inputs move there; integer
    constants (shapes, clip bounds) stay on the CPU, where ops read them as numbers.
    """

    def const(arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr.copy())
        return t.to(device) if t.is_floating_point() and t.dim() > 0 else t

    consts = {i.name: const(numpy_helper.to_array(i)) for i in model.graph.initializer}
    nodes = list(model.graph.node)
    for n in nodes:
        a = _attrs(n)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or a.get("ceil_mode", 0):
            raise Unsupported(f"{n.op_type} attributes")
        if n.op_type not in _OPS:
            raise Unsupported(n.op_type)
    outputs = [o.name for o in model.graph.output]

    @torch.no_grad()
    def run(**inputs):
        env = dict(consts)
        env.update({k: torch.as_tensor(v).to(device) for k, v in inputs.items()})
        for n in nodes:
            args = [env[i] if i else None for i in n.input]
            env[n.output[0]] = _OPS[n.op_type](args, _attrs(n))
        return [env[o] for o in outputs]

    return run


def _conv(args, a):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    return F.conv2d(
        x,
        w,
        b,
        stride=a.get("strides", [1, 1]),
        padding=_sym_pads(a.get("pads"), 2),
        dilation=a.get("dilations", [1, 1]),
        groups=a.get("group", 1),
    )


def _bn(args, a):
    x, g, b, m, v = args
    return F.batch_norm(x, m, v, g, b, training=False, eps=a.get("epsilon", 1e-5))


def _gemm(args, a):
    x, w = args[0], args[1]
    if a.get("transA", 0):
        x = x.t()
    w = w.t() if a.get("transB", 0) else w
    y = x @ w * a.get("alpha", 1.0)
    return y + args[2] * a.get("beta", 1.0) if len(args) > 2 else y


_OPS = {
    "Conv": _conv,
    "BatchNormalization": _bn,
    "Relu": lambda args, a: F.relu(args[0]),
    "Clip": lambda args, a: torch.clamp(args[0], float(args[1]), float(args[2])),
    "MaxPool": lambda args, a: F.max_pool2d(
        args[0], a["kernel_shape"], a.get("strides"), _sym_pads(a.get("pads"), 2)
    ),
    "AveragePool": lambda args, a: F.avg_pool2d(
        args[0],
        a["kernel_shape"],
        a.get("strides"),
        _sym_pads(a.get("pads"), 2),
        count_include_pad=bool(a.get("count_include_pad", 0)),
    ),
    "GlobalAveragePool": lambda args, a: F.adaptive_avg_pool2d(args[0], 1),
    "Flatten": lambda args, a: torch.flatten(args[0], a.get("axis", 1)),
    "Gemm": _gemm,
    "MatMul": lambda args, a: args[0] @ args[1],
    "Add": lambda args, a: args[0] + args[1],
    "Mul": lambda args, a: args[0] * args[1],
    "Sub": lambda args, a: args[0] - args[1],
    "Concat": lambda args, a: torch.cat(args, a["axis"]),
    "Reshape": lambda args, a: args[0].reshape([int(d) for d in args[1]]),
    "Transpose": lambda args, a: args[0].permute(*a["perm"]),
    "Softmax": lambda args, a: F.softmax(args[0], a.get("axis", -1)),
    "Sigmoid": lambda args, a: torch.sigmoid(args[0]),
    "Dropout": lambda args, a: args[0],
}

_ = np
