"""Converters from ONNX-semantics nodes to Relax ops.

Each converter takes the :class:`_Ctx` and a node and returns one Relax expression per
output. Shapes are static (the frontend fixes them), so attribute arithmetic such as
SAME padding or ceil-mode pooling is done here in Python, exactly as the ONNX spec
states it, and Relax only sees explicit paddings. Where Relax's own op semantics differ
from ONNX (average-pool divisors at borders), the exact ONNX result is built from
simpler ops instead of trusting the match.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R

from graphopt.errors import UnsupportedOpsError
from graphopt.ir import Graph, Node, Value
from graphopt.lower._ops import (
    CONVERTERS,
    const_ints,
    converter_key,
    pad_widths,
    slice_picks,
    unsupported_nodes,
)

__all__ = ["to_relax"]


def _const(array: np.ndarray) -> relax.Expr:
    """A Relax constant with the array's own dtype (TVM narrows int64 to int32 by default)."""
    array = np.asarray(array)
    return relax.const(array, str(array.dtype))


class _Ctx:
    def __init__(self, graph: Graph, bb: relax.BlockBuilder) -> None:
        self.graph = graph
        self.bb = bb
        self.env: dict[str, relax.Expr] = {}

    def x(self, name: str) -> relax.Expr:
        if name not in self.env:
            self.env[name] = _const(self.graph.constants[name])
        return self.env[name]

    def const(self, name: str) -> np.ndarray:
        return self.graph.constants[name]

    def shape(self, name: str) -> tuple[int, ...]:
        expr = self.env.get(name)
        if expr is not None and getattr(expr.ty, "shape", None) is not None:
            return tuple(int(d) for d in expr.ty.shape.values)
        value = self.graph.values[name]
        return tuple(int(d) for d in value.shape)

    def dtype(self, name: str) -> str:
        return self.graph.values[name].dtype

    def scalar(self, value: float, like: str) -> relax.Expr:
        return relax.const(value, self.dtype(like))

    def emit(self, expr: relax.Expr) -> relax.Expr:
        return self.bb.emit(expr)


def _opt(node: Node, i: int) -> str | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i] else None


def _attr_str(node: Node, key: str, default: str) -> str:
    v = node.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


# --- shape arithmetic shared by Conv and pooling ------------------------------------
def _spatial_pads(node: Node, in_sp, kernel, strides, dilations, ceil_mode=False):
    """Return (begin, end) paddings per spatial dim after auto_pad/ceil_mode, per ONNX."""
    n = len(in_sp)
    auto_pad = _attr_str(node, "auto_pad", "NOTSET")
    pads = list(node.attrs.get("pads", [0] * 2 * n))
    begin, end = pads[:n], pads[n:]
    eff_k = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(n):
            out = math.ceil(in_sp[i] / strides[i])
            total = max((out - 1) * strides[i] + eff_k[i] - in_sp[i], 0)
            small, big = total // 2, total - total // 2
            begin[i], end[i] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        begin, end = [0] * n, [0] * n
    if ceil_mode:
        for i in range(n):
            span = in_sp[i] + begin[i] + end[i] - eff_k[i]
            out = -(-span // strides[i]) + 1
            # ONNX/ORT drop a last window that would start entirely in the end padding.
            if (out - 1) * strides[i] >= in_sp[i] + begin[i]:
                out -= 1
            need = (out - 1) * strides[i] + eff_k[i] - (in_sp[i] + begin[i])
            end[i] = max(end[i], need)
    return begin, end


def _pool_params(ctx: _Ctx, node: Node):
    in_shape = ctx.shape(node.inputs[0])
    n = len(in_shape) - 2
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    begin, end = _spatial_pads(
        node, in_shape[2:], kernel, strides, dilations, bool(node.attrs.get("ceil_mode", 0))
    )
    return in_shape, n, kernel, strides, dilations, begin, end


# --- converters ----------------------------------------------------------------------
def conv(ctx: _Ctx, node: Node):
    data, weight = ctx.x(node.inputs[0]), ctx.x(node.inputs[1])
    in_shape, w_shape = ctx.shape(node.inputs[0]), ctx.shape(node.inputs[1])
    n = len(in_shape) - 2
    kernel = list(node.attrs.get("kernel_shape", w_shape[2:]))
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    begin, end = _spatial_pads(node, in_shape[2:], kernel, strides, dilations)
    groups = int(node.attrs.get("group", 1))
    op = R.nn.conv2d if n == 2 else R.nn.conv1d
    out = ctx.emit(
        op(data, weight, strides=strides, padding=begin + end, dilation=dilations, groups=groups)
    )
    bias = _opt(node, 2)
    if bias:
        out = ctx.emit(R.add(out, R.reshape(ctx.x(bias), [1, -1] + [1] * n)))
    return [out]


def batch_norm(ctx: _Ctx, node: Node):
    x = ctx.x(node.inputs[0])
    rank = len(ctx.shape(node.inputs[0]))
    eps = float(node.attrs.get("epsilon", 1e-5))
    bshape = [1, -1] + [1] * (rank - 2)
    if all(ctx.graph.is_constant(i) for i in node.inputs[1:5]):
        gamma, beta, mean, var = (ctx.const(i).astype(np.float64) for i in node.inputs[1:5])
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        dt = ctx.dtype(node.inputs[0])
        scale_c = _const(scale.astype(dt).reshape([-1] + [1] * (rank - 2)))
        shift_c = _const(shift.astype(dt).reshape([-1] + [1] * (rank - 2)))
        return [ctx.emit(R.add(R.multiply(x, scale_c), shift_c))]
    gamma, beta, mean, var = (R.reshape(ctx.x(i), bshape) for i in node.inputs[1:5])
    inv = R.divide(gamma, R.sqrt(R.add(var, ctx.scalar(eps, node.inputs[0]))))
    return [ctx.emit(R.add(R.multiply(R.subtract(x, mean), inv), beta))]


def max_pool(ctx: _Ctx, node: Node):
    _, n, kernel, strides, dilations, begin, end = _pool_params(ctx, node)
    op = R.nn.max_pool2d if n == 2 else R.nn.max_pool1d
    return [
        ctx.emit(
            op(
                ctx.x(node.inputs[0]),
                pool_size=kernel,
                strides=strides,
                padding=begin + end,
                dilation=dilations,
            )
        )
    ]


def _window_sum(a: np.ndarray, kernel, strides, dilations) -> np.ndarray:
    """Sum-pool a 1-D/2-D numpy array (spatial dims only), no padding."""
    out_sp = [
        (a.shape[i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(a.ndim)
    ]
    out = np.zeros(out_sp, dtype=np.float64)
    for offs in np.ndindex(*kernel):
        sl = tuple(
            slice(
                offs[i] * dilations[i],
                offs[i] * dilations[i] + (out_sp[i] - 1) * strides[i] + 1,
                strides[i],
            )
            for i in range(a.ndim)
        )
        out += a[sl]
    return out


def avg_pool(ctx: _Ctx, node: Node):
    """Average pool with the ONNX divisor computed exactly at compile time.

    Sum over each window of the zero-padded input, then divide by a constant map of how
    many elements ONNX counts for that window: input elements only, or also explicit
    pads with ``count_include_pad=1``; never the extra right-hand cells ceil_mode adds.
    """
    in_shape, n, kernel, strides, dilations, begin, end = _pool_params(ctx, node)
    x = ctx.x(node.inputs[0])
    dt = ctx.dtype(node.inputs[0])
    in_sp = in_shape[2:]
    pads = list(node.attrs.get("pads", [0] * 2 * n))
    auto_pad = _attr_str(node, "auto_pad", "NOTSET")
    if any(begin) or any(end):
        x = ctx.emit(R.nn.pad(x, [0, 0, 0, 0] + [v for i in range(n) for v in (begin[i], end[i])]))
    mask = np.zeros([in_sp[i] + begin[i] + end[i] for i in range(n)])
    include_pad = bool(node.attrs.get("count_include_pad", 0)) and auto_pad == "NOTSET"
    if include_pad:  # explicit pads count; ceil_mode overrun beyond them does not
        lo = [begin[i] - pads[i] for i in range(n)]
        hi = [begin[i] + in_sp[i] + pads[n + i] for i in range(n)]
    else:
        lo = begin
        hi = [begin[i] + in_sp[i] for i in range(n)]
    mask[tuple(slice(max(lo[i], 0), hi[i]) for i in range(n))] = 1.0
    counts = _window_sum(mask, kernel, strides, dilations)
    ksize = float(np.prod(kernel))
    op = R.nn.avg_pool2d if n == 2 else R.nn.avg_pool1d
    # avg_pool without padding divides every window by prod(kernel): undo that exactly.
    pooled = ctx.emit(op(x, pool_size=kernel, strides=strides, dilation=dilations))
    factor = ksize / counts
    if np.all(factor == 1.0):  # no pads and no ceil overrun: every window is full
        return [pooled]
    return [ctx.emit(R.multiply(pooled, _const(factor.astype(dt))))]


def global_avg_pool(ctx: _Ctx, node: Node):
    rank = len(ctx.shape(node.inputs[0]))
    return [ctx.emit(R.mean(ctx.x(node.inputs[0]), axis=list(range(2, rank)), keepdims=True))]


def global_max_pool(ctx: _Ctx, node: Node):
    rank = len(ctx.shape(node.inputs[0]))
    return [ctx.emit(R.max(ctx.x(node.inputs[0]), axis=list(range(2, rank)), keepdims=True))]


def gemm(ctx: _Ctx, node: Node):
    a, b = ctx.x(node.inputs[0]), ctx.x(node.inputs[1])
    if node.attrs.get("transA", 0):
        a = R.permute_dims(a, [1, 0])
    if node.attrs.get("transB", 0):
        b = R.permute_dims(b, [1, 0])
    out = R.matmul(a, b)
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    if alpha != 1.0:
        out = R.multiply(out, ctx.scalar(alpha, node.inputs[0]))
    c = _opt(node, 2)
    if c:
        cexpr = ctx.x(c)
        if beta != 1.0:
            cexpr = R.multiply(cexpr, ctx.scalar(beta, node.inputs[0]))
        out = R.add(out, cexpr)
    return [ctx.emit(out)]


def _binary(fn: Callable) -> Callable:
    def convert(ctx: _Ctx, node: Node):
        return [ctx.emit(fn(ctx.x(node.inputs[0]), ctx.x(node.inputs[1])))]

    return convert


def _variadic(fn: Callable) -> Callable:
    def convert(ctx: _Ctx, node: Node):
        out = ctx.x(node.inputs[0])
        for name in node.inputs[1:]:
            out = fn(out, ctx.x(name))
        return [ctx.emit(out)]

    return convert


def _unary(fn: Callable) -> Callable:
    def convert(ctx: _Ctx, node: Node):
        return [ctx.emit(fn(ctx.x(node.inputs[0])))]

    return convert


def clip(ctx: _Ctx, node: Node):
    x = ctx.x(node.inputs[0])
    lo = _opt(node, 1)
    hi = _opt(node, 2)
    lo_v = ctx.const(lo).reshape(-1)[0] if lo else node.attrs.get("min")
    hi_v = ctx.const(hi).reshape(-1)[0] if hi else node.attrs.get("max")
    if lo_v is not None:
        x = R.maximum(x, ctx.scalar(float(lo_v), node.inputs[0]))
    if hi_v is not None:
        x = R.minimum(x, ctx.scalar(float(hi_v), node.inputs[0]))
    return [ctx.emit(x)]


def leaky_relu(ctx: _Ctx, node: Node):
    return [ctx.emit(R.nn.leakyrelu(ctx.x(node.inputs[0]), float(node.attrs.get("alpha", 0.01))))]


def _hard_sigmoid(ctx: _Ctx, x, like: str, alpha: float, beta: float):
    y = R.add(R.multiply(x, ctx.scalar(alpha, like)), ctx.scalar(beta, like))
    return R.minimum(R.maximum(y, ctx.scalar(0.0, like)), ctx.scalar(1.0, like))


def hard_sigmoid(ctx: _Ctx, node: Node):
    alpha = float(node.attrs.get("alpha", 0.2))
    beta = float(node.attrs.get("beta", 0.5))
    return [ctx.emit(_hard_sigmoid(ctx, ctx.x(node.inputs[0]), node.inputs[0], alpha, beta))]


def hard_swish(ctx: _Ctx, node: Node):
    x = ctx.x(node.inputs[0])
    return [ctx.emit(R.multiply(x, _hard_sigmoid(ctx, x, node.inputs[0], 1 / 6, 0.5)))]


def gelu(ctx: _Ctx, node: Node):
    approx = _attr_str(node, "approximate", "none")
    op = R.nn.gelu_tanh if approx == "tanh" else R.nn.gelu
    return [ctx.emit(op(ctx.x(node.inputs[0])))]


def reciprocal(ctx: _Ctx, node: Node):
    return [ctx.emit(R.divide(ctx.scalar(1.0, node.inputs[0]), ctx.x(node.inputs[0])))]


def _softmax_like(fn: Callable) -> Callable:
    def convert(ctx: _Ctx, node: Node):
        shape = ctx.shape(node.inputs[0])
        x = ctx.x(node.inputs[0])
        if ctx.graph.opset >= 13:
            return [ctx.emit(fn(x, axis=int(node.attrs.get("axis", -1))))]
        # Before opset 13 the input is coerced to 2-D at `axis` (default 1).
        axis = int(node.attrs.get("axis", 1)) % max(len(shape), 1)
        flat = R.reshape(x, [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))])
        return [ctx.emit(R.reshape(fn(flat, axis=-1), list(shape)))]

    return convert


def concat(ctx: _Ctx, node: Node):
    return [ctx.emit(R.concat([ctx.x(i) for i in node.inputs], axis=int(node.attrs["axis"])))]


def reshape(ctx: _Ctx, node: Node):
    in_shape = ctx.shape(node.inputs[0])
    target = const_ints(ctx.graph, node.inputs[1])
    if not node.attrs.get("allowzero", 0):
        target = [in_shape[i] if d == 0 else d for i, d in enumerate(target)]
    return [ctx.emit(R.reshape(ctx.x(node.inputs[0]), target))]


def flatten(ctx: _Ctx, node: Node):
    shape = ctx.shape(node.inputs[0])
    axis = int(node.attrs.get("axis", 1))
    if axis < 0:  # counts from the rank r (axis is in [-r, r]), not from r + 1
        axis += len(shape)
    new = [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]
    return [ctx.emit(R.reshape(ctx.x(node.inputs[0]), new))]


def transpose(ctx: _Ctx, node: Node):
    perm = node.attrs.get("perm")
    return [ctx.emit(R.permute_dims(ctx.x(node.inputs[0]), list(perm) if perm else None))]


def _axes(ctx: _Ctx, node: Node) -> list[int] | None:
    name = _opt(node, 1)
    if name:
        return const_ints(ctx.graph, name)
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def squeeze(ctx: _Ctx, node: Node):
    return [ctx.emit(R.squeeze(ctx.x(node.inputs[0]), _axes(ctx, node)))]


def unsqueeze(ctx: _Ctx, node: Node):
    rank = len(ctx.shape(node.outputs[0])) if node.outputs[0] in ctx.graph.values else None
    axes = _axes(ctx, node)
    if rank is None:
        rank = len(ctx.shape(node.inputs[0])) + len(axes)
    axes = sorted(a % rank for a in axes)
    return [ctx.emit(R.expand_dims(ctx.x(node.inputs[0]), axes))]


def _reduce(fn: Callable) -> Callable:
    def convert(ctx: _Ctx, node: Node):
        axes = _axes(ctx, node)
        keepdims = bool(node.attrs.get("keepdims", 1))
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                return [ctx.x(node.inputs[0])]
            axes = None
        return [ctx.emit(fn(ctx.x(node.inputs[0]), axis=axes, keepdims=keepdims))]

    return convert


def cast(ctx: _Ctx, node: Node):
    import onnx

    dtype = str(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    return [ctx.emit(R.astype(ctx.x(node.inputs[0]), dtype))]


def gather(ctx: _Ctx, node: Node):
    axis = int(node.attrs.get("axis", 0))
    data_shape = ctx.shape(node.inputs[0])
    idx_name = node.inputs[1]
    if ctx.graph.is_constant(idx_name):
        idx = ctx.const(idx_name).astype(np.int64)
        idx = np.where(idx < 0, idx + data_shape[axis], idx)
        indices = _const(idx)
        if idx.ndim == 0:
            out = R.take(ctx.x(node.inputs[0]), R.reshape(indices, [1]), axis=axis, mode="clip")
            return [ctx.emit(R.squeeze(out, [axis % len(data_shape)]))]
    else:
        indices = ctx.x(idx_name)
        dim = relax.const(data_shape[axis], ctx.dtype(idx_name))
        zero = relax.const(0, ctx.dtype(idx_name))
        # ONNX allows negative indices: wrap them once, as onnxruntime does.
        indices = R.where(R.less(indices, zero), R.add(indices, dim), indices)
    # Indices are in range after the wrap above; "clip" keeps a bad index from reading
    # out of bounds (TVM's "fast" mode may segfault on one).
    return [ctx.emit(R.take(ctx.x(node.inputs[0]), indices, axis=axis, mode="clip"))]


def slice_(ctx: _Ctx, node: Node):
    begin, end, strides, axes, flips = [], [], [], [], []
    for axis, picked in slice_picks(ctx.graph, node, ctx.shape(node.inputs[0])):
        if picked.step < 0:  # take the same elements with a positive step, then reverse them
            picked = picked[::-1]
            flips.append(axis)
        begin.append(picked[0])
        end.append(picked[-1] + 1)
        strides.append(picked.step)
        axes.append(axis)
    out = R.strided_slice(ctx.x(node.inputs[0]), axes=axes, begin=begin, end=end, strides=strides)
    for axis in flips:
        out = R.flip(out, axis)
    return [ctx.emit(out)]


def pad(ctx: _Ctx, node: Node):
    width = pad_widths(ctx.graph, node, len(ctx.shape(node.inputs[0])))
    value_name = _opt(node, 2)
    value = float(ctx.const(value_name).reshape(-1)[0]) if value_name else 0.0
    return [ctx.emit(R.nn.pad(ctx.x(node.inputs[0]), width, pad_value=value))]


def identity(ctx: _Ctx, node: Node):
    return [ctx.x(node.inputs[0])]


def power(ctx: _Ctx, node: Node):
    """ONNX lets the exponent's type differ from the base's (``x ** 2`` with an int64 2);
    Relax wants one type, and the result has the base's."""
    base, exponent = node.inputs[0], node.inputs[1]
    y = ctx.x(exponent)
    if ctx.dtype(exponent) != ctx.dtype(base):
        y = R.astype(y, ctx.dtype(base))
    return [ctx.emit(R.power(ctx.x(base), y))]


# Converters that are one Relax op each; graphopt.lower._ops.CONVERTERS names them.
matmul = _binary(R.matmul)
add = _binary(R.add)
subtract = _binary(R.subtract)
multiply = _binary(R.multiply)
divide = _binary(R.divide)
maximum = _variadic(R.maximum)
minimum = _variadic(R.minimum)
relu = _unary(R.nn.relu)
sigmoid = _unary(R.sigmoid)
tanh = _unary(R.tanh)
exp = _unary(R.exp)
log = _unary(R.log)
sqrt = _unary(R.sqrt)
negative = _unary(R.negative)
absolute = _unary(R.abs)
erf = _unary(R.erf)
softmax = _softmax_like(R.nn.softmax)
log_softmax = _softmax_like(R.nn.log_softmax)
reduce_mean = _reduce(R.mean)
reduce_sum = _reduce(R.sum)
reduce_max = _reduce(R.max)
silu = _unary(R.nn.silu)


def converter(key: str) -> Callable[[_Ctx, Node], list]:
    """The converter of op ``key`` (see ``converter_key``): the function of this module
    that ``CONVERTERS[key].lower`` names."""
    return globals()[CONVERTERS[key].lower]


def to_relax(graph: Graph) -> tvm.IRModule:
    """Build ``main(*graph.inputs) -> tuple(graph.outputs)`` as a Relax IRModule."""
    bad = unsupported_nodes(graph)
    if bad:
        raise UnsupportedOpsError(bad)
    bb = relax.BlockBuilder()
    ctx = _Ctx(graph, bb)
    params = []
    for name in graph.inputs:
        value = graph.values[name]
        var = relax.Var(_safe(name), relax.TensorType(list(value.shape), value.dtype))
        ctx.env[name] = var
        params.append(var)
    with bb.function("main", params):
        try:
            with bb.dataflow():
                for node in graph.nodes():
                    outs = converter(converter_key(node))(ctx, node)
                    for name, expr in zip([o for o in node.outputs if o], outs, strict=True):
                        ctx.env[name] = expr
                outputs = [ctx.x(o) for o in graph.outputs]
                result = bb.emit_output(relax.Tuple(outputs))
        except Exception:
            # TVM's function scope leaves the block and variable scope the body opened
            # when it raises; the builder then logs "BlockBuilder destroyed with remaining
            # blocks!" to stderr when collected: a line after the user's one error line.
            bb._end_block()
            bb.end_scope()
            raise
        bb.emit_func_output(result)
    # What runs is what Relax computed: record its output shapes (ONNX shape inference
    # disagrees with onnxruntime and the spec text on ceil-mode pooling, for one).
    for name, expr in zip(graph.outputs, outputs, strict=True):
        ty = expr.ty
        graph.values[name] = Value(name, tuple(int(d) for d in ty.shape.values), str(ty.dtype))
    return bb.get()


def _safe(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out and not out[0].isdigit() else "v_" + out
