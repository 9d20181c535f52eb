"""ATen converters for the ops that compute: casts, element-wise arithmetic and activations,
convolution (1- to 3-D, transposed too), batch/layer/group norm, pooling, matrix products,
reductions and softmax.

Each converter emits ONNX-semantics nodes through a :class:`GraphBuilder` (see
:mod:`._builder`); ``COMPUTE_OPS`` at the bottom is this module's part of the ``ATEN``
table. Torch's implicit type promotion and ``alpha`` scaling are made explicit here;
what is not supported (a rounding division, tensor clamp bounds, ...) is refused
with its reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from graphopt.frontends.torch._builder import (
    Convert,
    GraphBuilder,
    Refuse,
    dtype_name,
    int_list,
    named_args,
    node_arg,
)

__all__ = ["COMPUTE_OPS"]


def _to_copy(imp: GraphBuilder, node: torch.fx.Node):
    return imp.cast(imp.value(node.args[0]), dtype_name(node.meta["val"].dtype))


def _dropout(imp: GraphBuilder, node: torch.fx.Node):
    if node_arg(node, 2, "train", False) and float(node_arg(node, 1, "p", 0.0)) > 0:
        raise Refuse("training-mode dropout is not supported")
    return imp.value(node.args[0])


def _unary(op: str, **attrs: Any) -> Convert:
    def convert(imp: GraphBuilder, node: torch.fx.Node):
        return imp.out(node, op, [imp.value(node.args[0])], dict(attrs))

    return convert


def _binary(op: str, swap: bool = False) -> Convert:
    """``a op b`` (or ``b op a``) with torch's ``alpha`` and type promotion made explicit."""

    def convert(imp: GraphBuilder, node: torch.fx.Node):
        dtype = dtype_name(node.meta["val"].dtype)
        if node_arg(node, 2, "rounding_mode") is not None:
            raise Refuse("division with a rounding mode is not supported")
        a, b = node.args[0], node.args[1]
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            if isinstance(b, torch.fx.Node):
                b_val = imp.value(b, dtype)
                b_val = imp.emit(
                    "Mul", [b_val, imp.value(alpha, dtype)], imp.shape(b_val), dtype, tag="alpha"
                )
            else:
                b_val = imp.value(b * alpha, dtype)
        else:
            b_val = imp.value(b, dtype)
        a_val = imp.value(a, dtype)
        inputs = [b_val, a_val] if swap else [a_val, b_val]
        return imp.out(node, op, inputs)

    return convert


def _clamp(imp: GraphBuilder, node: torch.fx.Node, lo: Any = None, hi: Any = None):
    dtype = dtype_name(node.meta["val"].dtype)
    bounds = ["" if v is None else imp.value(v, dtype) for v in (lo, hi)]
    while bounds and not bounds[-1]:
        bounds.pop()
    return imp.out(node, "Clip", [imp.value(node.args[0], dtype)] + bounds)


def _clamp_op(imp: GraphBuilder, node: torch.fx.Node):
    lo, hi = node_arg(node, 1, "min"), node_arg(node, 2, "max")
    if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
        raise Refuse("tensor bounds are not supported")
    return _clamp(imp, node, lo, hi)


def _hardtanh(imp: GraphBuilder, node: torch.fx.Node):
    return _clamp(imp, node, node_arg(node, 1, "min_val", -1.0), node_arg(node, 2, "max_val", 1.0))


def _relu6(imp: GraphBuilder, node: torch.fx.Node):
    return _clamp(imp, node, 0.0, 6.0)


def _gelu(imp: GraphBuilder, node: torch.fx.Node):
    approximate = node.kwargs.get("approximate", node_arg(node, 1, "approximate", "none"))
    return imp.out(node, "Gelu", [imp.value(node.args[0])], {"approximate": approximate})


def _leaky_relu(imp: GraphBuilder, node: torch.fx.Node):
    slope = float(node_arg(node, 1, "negative_slope", 0.01))
    return imp.out(node, "LeakyRelu", [imp.value(node.args[0])], {"alpha": slope})


def _silu(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    sig = imp.emit("Sigmoid", [x], imp.shape(x), imp.dtype(x), tag=f"{node.name}_sigmoid")
    return imp.out(node, "Mul", [x, sig])


def _rsqrt(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    root = imp.emit("Sqrt", [x], imp.shape(x), imp.dtype(x), tag=f"{node.name}_sqrt")
    return imp.out(node, "Reciprocal", [root])


def _convolution(imp: GraphBuilder, node: torch.fx.Node):
    """1-, 2- and 3-D ``Conv``, or ``ConvTranspose`` (whose weight layout torch shares)."""
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args[:9]
    n = len(imp.shape(imp.value(x))) - 2
    if n not in (1, 2, 3):
        raise Refuse(f"{n}-D convolution is not supported (only 1-, 2- and 3-D)")
    weight = imp.value(w)
    pads = int_list(padding, n)
    attrs = {
        "kernel_shape": list(imp.shape(weight)[2:]),
        "strides": int_list(stride, n),
        "pads": pads + pads,
        "dilations": int_list(dilation, n),
        "group": int(groups),
    }
    if transposed:
        attrs["output_padding"] = int_list(output_padding, n)
    inputs = [imp.value(x), weight] + ([imp.value(b)] if b is not None else [])
    return imp.out(node, "ConvTranspose" if transposed else "Conv", inputs, attrs)


def _batch_norm(imp: GraphBuilder, node: torch.fx.Node):
    x, weight, bias, mean, var, _momentum, eps = node.args[:7]
    channels = imp.shape(imp.value(x))[1]
    dtype = dtype_name(node.meta["val"][0].dtype)
    scale = imp.value(weight) if weight is not None else imp.const(np.ones(channels, dtype), "one")
    shift = imp.value(bias) if bias is not None else imp.const(np.zeros(channels, dtype), "zero")
    out = imp.emit(
        "BatchNormalization",
        [imp.value(x), scale, shift, imp.value(mean), imp.value(var)],
        node.meta["val"][0].shape,
        dtype,
        {"epsilon": float(eps)},
        tag=node.name,
    )
    return [out, None, None]


def _layer_norm(imp: GraphBuilder, node: torch.fx.Node):
    """``LayerNormalization`` over the trailing dims ``normalized_shape`` names (axis >= 0).

    ``native_layer_norm``'s mean and 1/std outputs are not translated (eval graphs drop them).
    """
    args = named_args(node)
    x = imp.value(args["input"])
    shape = imp.shape(x)
    axis = len(shape) - len(args["normalized_shape"])
    native = isinstance(node.meta["val"], tuple | list)
    val = node.meta["val"][0] if native else node.meta["val"]
    dtype = dtype_name(val.dtype)
    weight, bias = args["weight"], args["bias"]
    if weight is None:
        scale = imp.const(np.ones(shape[axis:], dtype), "one")
    else:
        scale = imp.value(weight)
    inputs = [x, scale] + ([imp.value(bias)] if bias is not None else [])
    attrs = {"axis": axis, "epsilon": float(args["eps"])}
    out = imp.emit("LayerNormalization", inputs, val.shape, dtype, attrs, tag=node.name)
    return [out, None, None] if native else out


def _group_norm(imp: GraphBuilder, node: torch.fx.Node):
    """``GroupNormalization`` (opset 18-20: scale and bias per group), then torch's per-channel
    affine as ``Mul``/``Add`` over the channel axis.

    The IR speaks opset 20, where GroupNormalization's scale and bias have one entry per
    group; torch's weight and bias have one per channel (opset 21's form), so the group
    scale is 1, the bias 0, and the channel affine follows.
    """
    args = named_args(node)
    x = imp.value(args["input"])
    shape = imp.shape(x)
    groups = int(args["group"] if "group" in args else args["num_groups"])
    native = isinstance(node.meta["val"], tuple | list)
    val = node.meta["val"][0] if native else node.meta["val"]
    dtype = dtype_name(val.dtype)
    unit = [imp.const(np.ones(groups, dtype), "one"), imp.const(np.zeros(groups, dtype), "zero")]
    attrs = {"num_groups": groups, "epsilon": float(args["eps"])}
    out = imp.emit("GroupNormalization", [x, *unit], shape, dtype, attrs, tag=node.name)
    per_channel = [shape[1]] + [1] * (len(shape) - 2)
    for key, op in (("weight", "Mul"), ("bias", "Add")):
        if args[key] is not None:
            affine = imp.reshape(imp.value(args[key]), per_channel, tag=f"{node.name}_{key}")
            out = imp.emit(op, [out, affine], shape, dtype, tag=f"{node.name}_{key}")
    return [out, None, None] if native else out


def _pool_attrs(node: torch.fx.Node, n: int) -> dict:
    kernel = int_list(node.args[1], n)
    stride = node_arg(node, 2, "stride", [])
    pads = int_list(node_arg(node, 3, "padding", 0), n)
    return {
        "kernel_shape": kernel,
        "strides": int_list(stride, n) if stride else kernel,
        "pads": pads + pads,
    }


def _max_pool(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    n = len(imp.shape(x)) - 2
    attrs = _pool_attrs(node, n)
    attrs["dilations"] = int_list(node_arg(node, 4, "dilation", 1), n)
    attrs["ceil_mode"] = int(bool(node_arg(node, 5, "ceil_mode", False)))
    val = node.meta["val"][0]
    return [imp.emit("MaxPool", [x], val.shape, dtype_name(val.dtype), attrs, tag=node.name), None]


def _avg_pool(imp: GraphBuilder, node: torch.fx.Node):
    if node_arg(node, 6, "divisor_override") is not None:
        raise Refuse("divisor_override is not supported")
    x = imp.value(node.args[0])
    attrs = _pool_attrs(node, len(imp.shape(x)) - 2)
    attrs["ceil_mode"] = int(bool(node_arg(node, 4, "ceil_mode", False)))
    attrs["count_include_pad"] = int(bool(node_arg(node, 5, "count_include_pad", True)))
    return imp.out(node, "AveragePool", [x], attrs)


def _adaptive_pool(op: str, with_indices: bool) -> Convert:
    """Adaptive pooling to 1x1 (global) or to sizes that divide the input (fixed windows)."""

    def convert(imp: GraphBuilder, node: torch.fx.Node):
        x = imp.value(node.args[0])
        in_sp = imp.shape(x)[2:]
        out_sp = int_list(node.args[1], len(in_sp))
        val = node.meta["val"][0] if with_indices else node.meta["val"]
        dtype = dtype_name(val.dtype)
        if all(o == 1 for o in out_sp):
            out = imp.emit(f"Global{op}", [x], val.shape, dtype, tag=node.name)
        elif all(i % o == 0 for i, o in zip(in_sp, out_sp, strict=True)):
            kernel = [i // o for i, o in zip(in_sp, out_sp, strict=True)]
            attrs = {"kernel_shape": kernel, "strides": kernel}
            out = imp.emit(op, [x], val.shape, dtype, attrs, tag=node.name)
        else:
            raise Refuse(
                f"adaptive pooling from {tuple(in_sp)} to {tuple(out_sp)}: only output sizes "
                "that divide the input are supported"
            )
        return [out, None] if with_indices else out

    return convert


def _linear(imp: GraphBuilder, node: torch.fx.Node):
    x, w = imp.value(node.args[0]), imp.value(node.args[1])
    b = node_arg(node, 2, "bias")
    if len(imp.shape(x)) == 2:
        inputs = [x, w] + ([imp.value(b)] if b is not None else [])
        return imp.out(node, "Gemm", inputs, {"transB": 1})
    wt = imp.transpose(w, [1, 0], tag=f"{node.name}_wt")
    if b is None:
        return imp.out(node, "MatMul", [x, wt])
    val = node.meta["val"]
    mm = imp.emit("MatMul", [x, wt], val.shape, dtype_name(val.dtype), tag=f"{node.name}_mm")
    return imp.out(node, "Add", [mm, imp.value(b)])


def _addmm(imp: GraphBuilder, node: torch.fx.Node):
    bias, a, b = (imp.value(v) for v in node.args[:3])
    attrs = {
        "beta": float(node.kwargs.get("beta", 1.0)),
        "alpha": float(node.kwargs.get("alpha", 1.0)),
    }
    return imp.out(node, "Gemm", [a, b, bias], attrs)


def _matmul(imp: GraphBuilder, node: torch.fx.Node):
    return imp.out(node, "MatMul", [imp.value(node.args[0]), imp.value(node.args[1])])


def _reduce(op: str) -> Convert:
    def convert(imp: GraphBuilder, node: torch.fx.Node):
        val = node.meta["val"]
        x = imp.value(node.args[0], dtype_name(val.dtype))
        rank = len(imp.shape(x))
        dims = node_arg(node, 1, "dim")
        if isinstance(dims, int):
            dims = [dims]
        dims = list(range(rank)) if not dims else sorted(int(d) % rank for d in dims)
        keep = bool(node_arg(node, 2, "keepdim", False))
        attrs = {"keepdims": int(keep)}
        return imp.out(node, op, [x, imp.ints(dims, "axes")], attrs)

    return convert


def _softmax(op: str) -> Convert:
    def convert(imp: GraphBuilder, node: torch.fx.Node):
        x = imp.value(node.args[0])
        axis = int(node.args[1]) % max(len(imp.shape(x)), 1)
        return imp.out(node, op, [x], {"axis": axis})

    return convert


# ATen overload name -> converter, for the ops this module translates.
COMPUTE_OPS: dict[str, Convert] = {
    "aten._to_copy.default": _to_copy,
    "aten.dropout.default": _dropout,
    "aten.convolution.default": _convolution,
    "aten._native_batch_norm_legit_no_training.default": _batch_norm,
    "aten.native_layer_norm.default": _layer_norm,
    "aten.layer_norm.default": _layer_norm,
    "aten.native_group_norm.default": _group_norm,
    "aten.group_norm.default": _group_norm,
    "aten.max_pool2d_with_indices.default": _max_pool,
    "aten.max_pool3d_with_indices.default": _max_pool,
    "aten.avg_pool2d.default": _avg_pool,
    "aten.avg_pool3d.default": _avg_pool,
    "aten._adaptive_avg_pool2d.default": _adaptive_pool("AveragePool", False),
    "aten._adaptive_avg_pool3d.default": _adaptive_pool("AveragePool", False),
    "aten.adaptive_max_pool2d.default": _adaptive_pool("MaxPool", True),
    "aten.adaptive_max_pool3d.default": _adaptive_pool("MaxPool", True),
    "aten.linear.default": _linear,
    "aten.addmm.default": _addmm,
    "aten.mm.default": _matmul,
    "aten.bmm.default": _matmul,
    "aten.matmul.default": _matmul,
    "aten.relu.default": _unary("Relu"),
    "aten.sigmoid.default": _unary("Sigmoid"),
    "aten.tanh.default": _unary("Tanh"),
    "aten.exp.default": _unary("Exp"),
    "aten.log.default": _unary("Log"),
    "aten.sqrt.default": _unary("Sqrt"),
    "aten.neg.default": _unary("Neg"),
    "aten.abs.default": _unary("Abs"),
    "aten.erf.default": _unary("Erf"),
    "aten.reciprocal.default": _unary("Reciprocal"),
    "aten.hardsigmoid.default": _unary("HardSigmoid", alpha=1 / 6, beta=0.5),
    "aten.hardswish.default": _unary("HardSwish"),
    "aten.rsqrt.default": _rsqrt,
    "aten.silu.default": _silu,
    "aten.gelu.default": _gelu,
    "aten.leaky_relu.default": _leaky_relu,
    "aten.hardtanh.default": _hardtanh,
    "aten.relu6.default": _relu6,
    "aten.clamp.default": _clamp_op,
    "aten.add.Tensor": _binary("Add"),
    "aten.add.Scalar": _binary("Add"),
    "aten.sub.Tensor": _binary("Sub"),
    "aten.sub.Scalar": _binary("Sub"),
    "aten.rsub.Scalar": _binary("Sub", swap=True),
    "aten.rsub.Tensor": _binary("Sub", swap=True),
    "aten.mul.Tensor": _binary("Mul"),
    "aten.mul.Scalar": _binary("Mul"),
    "aten.div.Tensor": _binary("Div"),
    "aten.div.Scalar": _binary("Div"),
    "aten.div.Tensor_mode": _binary("Div"),
    "aten.pow.Tensor_Scalar": _binary("Pow"),
    "aten.pow.Tensor_Tensor": _binary("Pow"),
    "aten.maximum.default": _binary("Max"),
    "aten.minimum.default": _binary("Min"),
    "aten.mean.dim": _reduce("ReduceMean"),
    "aten.mean.default": _reduce("ReduceMean"),
    "aten.sum.dim_IntList": _reduce("ReduceSum"),
    "aten.sum.default": _reduce("ReduceSum"),
    "aten.amax.default": _reduce("ReduceMax"),
    "aten._softmax.default": _softmax("Softmax"),
    "aten._log_softmax.default": _softmax("LogSoftmax"),
}
