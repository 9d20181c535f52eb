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
from tvm import relax, te, topi
from tvm.relax import op as R

from graphopt.errors import UnsupportedOpsError
from graphopt.ir import Graph, Node, Value
from graphopt.lower import _resize, _rnn_sequence
from graphopt.lower._ops import (
    CONVERTERS,
    const_ints,
    converter_key,
    declared_shape,
    pad_widths,
    runtime_axes,
    slice_picks,
    unsupported_nodes,
)
from graphopt.lower._tvm_onnx import tvm_onnx

_ = tvm_onnx  # named by CONVERTERS entries ("tvm_onnx"), looked up by converter()

__all__ = ["to_relax"]


def _const(array: np.ndarray) -> relax.Expr:
    """A Relax constant with the array's own dtype (TVM narrows int64 to int32 by default)."""
    array = np.asarray(array)
    return relax.const(array, str(array.dtype))


def _static_dim(d: tvm.ir.PrimExpr) -> int | tvm.ir.PrimExpr:
    return int(d) if isinstance(d, tvm.tirx.IntImm) else d


class _Ctx:
    def __init__(self, graph: Graph, bb: relax.BlockBuilder) -> None:
        self.graph = graph
        self.bb = bb
        self.env: dict[str, relax.Expr] = {}
        self.symbols: dict[str, tvm.tirx.Var] = {}  # symbolic dims (dynamic batch), by name
        self.funcs: dict[tuple, tuple] = {}  # PrimFuncs shared by several nodes, by key

    def dim(self, d: int | str) -> int | tvm.tirx.Var:
        """A graph dim as Relax takes it: an int, or the one tir var of its symbol."""
        if isinstance(d, str):
            return self.symbols.setdefault(d, tvm.tirx.Var(_safe(d), "int64"))
        return int(d)

    def x(self, name: str) -> relax.Expr:
        if name not in self.env:
            self.env[name] = _const(self.graph.constants[name])
        return self.env[name]

    def const(self, name: str) -> np.ndarray:
        return self.graph.constants[name]

    def shape(self, name: str) -> tuple:
        """Static dims as ints; a symbolic one (dynamic batch) as its tir expression."""
        expr = self.env.get(name)
        if expr is not None and getattr(expr.ty, "shape", None) is not None:
            return tuple(_static_dim(d) for d in expr.ty.shape.values)
        value = self.graph.values[name]
        return tuple(self.dim(d) for d in value.shape)

    def dtype(self, name: str) -> str:
        return self.graph.values[name].dtype

    def scalar(self, value: float, like: str) -> relax.Expr:
        return relax.const(value, self.dtype(like))

    def emit(self, expr: relax.Expr) -> relax.Expr:
        return self.bb.emit(expr)


def _opt(node: Node, i: int) -> str | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i] else None


# --- shape arithmetic shared by Conv and pooling ------------------------------------
def _spatial_pads(node: Node, in_sp, kernel, strides, dilations, ceil_mode=False):
    """Return (begin, end) paddings per spatial dim after auto_pad/ceil_mode, per ONNX."""
    n = len(in_sp)
    auto_pad = node.attr_str("auto_pad", "NOTSET")
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
    op = {1: R.nn.conv1d, 2: R.nn.conv2d, 3: R.nn.conv3d}[n]
    # float16 accumulates in float32 (as MatMul does): a float16 sum drifts by ulps
    dtype = ctx.dtype(node.inputs[0])
    acc = "float32" if dtype == "float16" else dtype
    out = ctx.emit(
        op(
            data,
            weight,
            strides=strides,
            padding=begin + end,
            dilation=dilations,
            groups=groups,
            out_dtype=acc,
        )
    )
    bias = _opt(node, 2)
    if bias:
        b = ctx.x(bias) if acc == dtype else ctx.emit(R.astype(ctx.x(bias), acc))
        out = ctx.emit(R.add(out, R.reshape(b, [1, -1] + [1] * n)))
    if acc != dtype:
        out = ctx.emit(R.astype(out, dtype))
    return [out]


def _batch_norm_training(ctx: _Ctx, node: Node):
    """Y from the batch's mean and (biased) variance over all axes but C; the running
    mean/var outputs are ``input * momentum + batch * (1 - momentum)``."""
    x = ctx.x(node.inputs[0])
    rank = len(ctx.shape(node.inputs[0]))
    dt = ctx.dtype(node.inputs[0])
    axes = [0, *range(2, rank)]
    eps = relax.const(float(node.attrs.get("epsilon", 1e-5)), dt)
    momentum = float(node.attrs.get("momentum", 0.9))
    mean = ctx.emit(R.mean(x, axis=axes, keepdims=True))
    diff = ctx.emit(R.subtract(x, mean))
    var = ctx.emit(R.mean(R.multiply(diff, diff), axis=axes, keepdims=True))
    bshape = [1, -1] + [1] * (rank - 2)
    scale, bias = (R.reshape(ctx.x(i), bshape) for i in node.inputs[1:3])
    y = R.add(R.multiply(R.divide(diff, R.sqrt(R.add(var, eps))), scale), bias)
    outs = [ctx.emit(y)]
    for name, old, new in zip(node.outputs[1:3], node.inputs[3:5], (mean, var), strict=False):
        if name:
            keep = R.multiply(ctx.x(old), relax.const(momentum, dt))
            update = R.multiply(R.reshape(new, [-1]), relax.const(1 - momentum, dt))
            outs.append(ctx.emit(R.add(keep, update)))
    return outs


def batch_norm(ctx: _Ctx, node: Node):
    if node.attrs.get("training_mode", 0):
        return _batch_norm_training(ctx, node)
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
    op = {1: R.nn.max_pool1d, 2: R.nn.max_pool2d, 3: R.nn.max_pool3d}[n]
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
    auto_pad = node.attr_str("auto_pad", "NOTSET")
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
    op = {1: R.nn.avg_pool1d, 2: R.nn.avg_pool2d, 3: R.nn.avg_pool3d}[n]
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


def _half_exp_pair(combine: Callable) -> Callable:
    """``combine(e^x, e^-x) / 2``: cosh and sinh, which LLVM has no intrinsic for on
    TVM's x86 back end."""

    def convert(ctx: _Ctx, node: Node):
        x = ctx.x(node.inputs[0])
        half = ctx.scalar(0.5, node.inputs[0])
        return [ctx.emit(R.multiply(combine(R.exp(x), R.exp(R.negative(x))), half))]

    return convert


cosh = _half_exp_pair(R.add)
sinh = _half_exp_pair(R.subtract)


def clip(ctx: _Ctx, node: Node):
    x = ctx.x(node.inputs[0])
    lo = _opt(node, 1)
    hi = _opt(node, 2)
    for name, key, fn in ((lo, "min", R.maximum), (hi, "max", R.minimum)):
        if name and not ctx.graph.is_constant(name):  # a run-time bound: a 0-d tensor
            x = fn(x, ctx.x(name))
            continue
        v = ctx.const(name).reshape(-1)[0] if name else node.attrs.get(key)
        if v is not None:
            x = fn(x, relax.const(v, ctx.dtype(node.inputs[0])))
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
    approx = node.attr_str("approximate", "none")
    op = R.nn.gelu_tanh if approx == "tanh" else R.nn.gelu
    return [ctx.emit(op(ctx.x(node.inputs[0])))]


def reciprocal(ctx: _Ctx, node: Node):
    return [ctx.emit(R.divide(ctx.scalar(1.0, node.inputs[0]), ctx.x(node.inputs[0])))]


def _softmax_like(fn: Callable) -> Callable:
    def convert(ctx: _Ctx, node: Node):
        shape = ctx.shape(node.inputs[0])
        x = ctx.x(node.inputs[0])
        if ctx.dtype(node.inputs[0]) == "float16" and ctx.graph.opset >= 13:
            wide = fn(R.astype(x, "float32"), axis=int(node.attrs.get("axis", -1)))
            return [ctx.emit(R.astype(wide, "float16"))]
        if ctx.graph.opset >= 13:
            return [ctx.emit(fn(x, axis=int(node.attrs.get("axis", -1))))]
        # Before opset 13 the input is coerced to 2-D at `axis` (default 1).
        axis = int(node.attrs.get("axis", 1)) % max(len(shape), 1)
        flat = R.reshape(x, [math.prod(shape[:axis]), math.prod(shape[axis:])])
        return [ctx.emit(R.reshape(fn(flat, axis=-1), list(shape)))]

    return convert


def concat(ctx: _Ctx, node: Node):
    return [ctx.emit(R.concat([ctx.x(i) for i in node.inputs], axis=int(node.attrs["axis"])))]


def reshape(ctx: _Ctx, node: Node):
    if not ctx.graph.is_constant(node.inputs[1]):  # the check let it through: see declared_shape
        return [ctx.emit(R.reshape(ctx.x(node.inputs[0]), declared_shape(ctx.graph, node)))]
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
    new = [math.prod(shape[:axis]), math.prod(shape[axis:])]  # tir exprs with a symbolic dim
    return [ctx.emit(R.reshape(ctx.x(node.inputs[0]), new))]


def transpose(ctx: _Ctx, node: Node):
    perm = node.attrs.get("perm")
    return [ctx.emit(R.permute_dims(ctx.x(node.inputs[0]), list(perm) if perm else None))]


def _axes(ctx: _Ctx, node: Node) -> list[int] | None:
    name = _opt(node, 1)
    if name and not ctx.graph.is_constant(name):  # run-time axes: read off the shapes
        return runtime_axes(ctx.graph, node)
    if name:
        return const_ints(ctx.graph, name)
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def squeeze(ctx: _Ctx, node: Node):
    if _opt(node, 1) and not ctx.graph.is_constant(node.inputs[1]):
        return [ctx.emit(R.reshape(ctx.x(node.inputs[0]), declared_shape(ctx.graph, node)))]
    return [ctx.emit(R.squeeze(ctx.x(node.inputs[0]), _axes(ctx, node)))]


def unsqueeze(ctx: _Ctx, node: Node):
    if not ctx.graph.is_constant(node.inputs[1]):
        return [ctx.emit(R.reshape(ctx.x(node.inputs[0]), declared_shape(ctx.graph, node)))]
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
        if not axes and _opt(node, 1) and not ctx.graph.is_constant(node.inputs[1]):
            return [ctx.x(node.inputs[0])]  # only size-1 axes: nothing to reduce
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                return [ctx.x(node.inputs[0])]
            axes = None
        return [ctx.emit(fn(ctx.x(node.inputs[0]), axis=axes, keepdims=keepdims))]

    return convert


def _max_with_inf(x: relax.Expr, axis, keepdims: bool) -> relax.Expr:  # noqa: ANN001
    """R.max, except that TVM starts a float max at the lowest finite value, so a max over
    only -inf comes out -FLT_MAX: where no element is that value, the answer is -inf."""
    dt = str(x.ty.dtype)
    m = R.max(x, axis=axis, keepdims=keepdims)
    if "float" not in dt:
        return m
    lowest = relax.const(float(np.finfo(dt).min), dt)
    seen = R.max(R.astype(R.equal(x, lowest), "int8"), axis=axis, keepdims=keepdims)
    only_inf = R.logical_and(R.equal(m, lowest), R.equal(seen, relax.const(0, "int8")))
    return R.where(only_inf, relax.const(-np.inf, dt), m)


def divide(ctx: _Ctx, node: Node):
    """Integer Div truncates toward zero (C++-style, as ONNX's reference does); a zero
    divisor gives 0 (numpy's answer) instead of a SIGFPE."""
    x, y = ctx.x(node.inputs[0]), ctx.x(node.inputs[1])
    dt = ctx.dtype(node.inputs[0])
    if not np.issubdtype(np.dtype(dt), np.integer):
        return [ctx.emit(R.divide(x, y))]
    zero, one = relax.const(0, dt), relax.const(1, dt)
    nonzero = R.not_equal(y, zero)
    safe = R.where(nonzero, y, R.ones_like(y))
    q, r = R.floor_divide(x, safe), R.floor_mod(x, safe)
    if np.issubdtype(np.dtype(dt), np.signedinteger):
        signs = R.logical_xor(R.less(x, zero), R.less(safe, zero))
        q = R.where(R.logical_and(R.not_equal(r, zero), signs), R.add(q, one), q)
    return [ctx.emit(R.where(nonzero, q, R.zeros_like(q)))]


def matmul(ctx: _Ctx, node: Node):
    """float16 products accumulate in float32, as numpy and onnxruntime do."""
    a, b = ctx.x(node.inputs[0]), ctx.x(node.inputs[1])
    if ctx.dtype(node.inputs[0]) != "float16":
        return [ctx.emit(R.matmul(a, b))]
    return [ctx.emit(R.astype(R.matmul(a, b, out_dtype="float32"), "float16"))]


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
    if node.attr_str("mode", "constant") != "constant":  # edge, reflect, wrap: TVM's
        return tvm_onnx(ctx, node)
    width = pad_widths(ctx.graph, node, len(ctx.shape(node.inputs[0])))
    value_name = _opt(node, 2)
    value = float(ctx.const(value_name).reshape(-1)[0]) if value_name else 0.0
    return [ctx.emit(R.nn.pad(ctx.x(node.inputs[0]), width, pad_value=value))]


def expand(ctx: _Ctx, node: Node):
    if ctx.graph.is_constant(node.inputs[1]):
        return tvm_onnx(ctx, node)
    return [ctx.emit(R.broadcast_to(ctx.x(node.inputs[0]), declared_shape(ctx.graph, node)))]


def nll_loss(ctx: _Ctx, node: Node):
    """loss[n, d...] = -input[n, target[n, d...], d...] * weight[target[n, d...]], zero
    where target is ignore_index; 'mean' divides the sum by the weights' sum."""
    x, target = ctx.x(node.inputs[0]), ctx.x(node.inputs[1])
    tdt = ctx.dtype(node.inputs[1])
    keep = None
    if "ignore_index" in node.attrs:
        keep = R.not_equal(target, relax.const(int(node.attrs["ignore_index"]), tdt))
        target = R.where(keep, target, relax.const(0, tdt))
    picked = R.gather_elements(x, R.expand_dims(target, [1]), axis=1)
    picked = R.squeeze(picked, [1])
    weight = _opt(node, 2)
    if weight:
        w = R.take(ctx.x(weight), target, axis=0, mode="clip")
    else:
        w = R.ones_like(picked)
    if keep is not None:
        w = R.where(keep, w, R.zeros_like(w))
    loss = R.negative(R.multiply(picked, w))
    reduction = node.attr_str("reduction", "mean")
    if reduction == "sum":
        loss = R.sum(loss)
    elif reduction == "mean":
        loss = R.divide(R.sum(loss), R.sum(w))
    return [ctx.emit(loss)]


def layer_norm(ctx: _Ctx, node: Node):
    """Y = (X - mean) / sqrt(var + epsilon) * scale + bias over the axes from ``axis``
    on (negative counts from the rank), in float32 for stash_type=1 half inputs; the
    optional outputs Mean and InvStdDev keep the reduced axes as 1s."""
    shape, dt = ctx.shape(node.inputs[0]), ctx.dtype(node.inputs[0])
    axis = int(node.attrs.get("axis", -1)) % len(shape)
    axes = list(range(axis, len(shape)))
    work = "float32" if node.attrs.get("stash_type", 1) == 1 and dt == "float16" else dt
    x = ctx.x(node.inputs[0])
    x = R.astype(x, work) if work != dt else x
    mean = ctx.emit(R.mean(x, axis=axes, keepdims=True))
    diff = ctx.emit(R.subtract(x, mean))
    var = R.mean(R.multiply(diff, diff), axis=axes, keepdims=True)
    eps = relax.const(float(node.attrs.get("epsilon", 1e-5)), work)
    inv = ctx.emit(R.divide(relax.const(1.0, work), R.sqrt(R.add(var, eps))))
    y = R.multiply(diff, inv)
    y = R.astype(y, dt) if work != dt else y
    y = R.multiply(y, ctx.x(node.inputs[1]))
    if _opt(node, 2):
        y = R.add(y, ctx.x(node.inputs[2]))
    outs = [ctx.emit(y)]
    for name, expr in zip(node.outputs[1:], (mean, inv), strict=False):
        if name:
            outs.append(ctx.emit(R.astype(expr, ctx.dtype(name))))
    return outs


def _softplus(x: relax.Expr, dt: str) -> relax.Expr:
    """log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(-|x|))."""
    one = relax.const(1.0, dt)
    tail = R.log(R.add(one, R.exp(R.negative(R.abs(x)))))
    return R.add(R.maximum(x, relax.const(0.0, dt)), tail)


def softplus(ctx: _Ctx, node: Node):
    x = ctx.x(node.inputs[0])
    return [ctx.emit(_softplus(x, ctx.dtype(node.inputs[0])))]


def mish(ctx: _Ctx, node: Node):
    x = ctx.x(node.inputs[0])
    return [ctx.emit(R.multiply(x, R.tanh(_softplus(x, ctx.dtype(node.inputs[0])))))]


def is_inf(ctx: _Ctx, node: Node):
    x = ctx.x(node.inputs[0])
    zero = relax.const(0.0, ctx.dtype(node.inputs[0]))
    found = R.isinf(x)
    pos, neg = node.attrs.get("detect_positive", 1), node.attrs.get("detect_negative", 1)
    if not pos:
        found = R.logical_and(found, R.less(x, zero))
    if not neg:
        found = R.logical_and(found, R.greater(x, zero))
    if not pos and not neg:
        found = R.zeros_like(found)
    return [ctx.emit(found)]


def bit_shift(ctx: _Ctx, node: Node):
    """numpy's (and so ONNX's reference) results for shifts outside [0, bits): 0 to the
    left; to the right 0, or -1 for a negative signed value."""
    x, shift = ctx.x(node.inputs[0]), ctx.x(node.inputs[1])
    dt = ctx.dtype(node.inputs[0])
    bits = np.dtype(dt).itemsize * 8
    valid = R.logical_and(
        R.greater_equal(shift, relax.const(0, dt)), R.less(shift, relax.const(bits, dt))
    )
    safe = R.where(valid, shift, relax.const(0, dt))
    if node.attr_str("direction", "LEFT") == "LEFT":
        done, fill = R.left_shift(x, safe), R.zeros_like(x)
    else:
        done = R.right_shift(x, safe)
        signed = np.dtype(dt).kind == "i"
        fill = R.right_shift(x, relax.const(bits - 1, dt)) if signed else R.zeros_like(x)
    return [ctx.emit(R.where(valid, done, fill))]


def conv_transpose(ctx: _Ctx, node: Node):
    """TVM's converter ignores ``output_shape``: turn it into the pads (and, where the
    padding would be negative, the output_padding) ONNX derives from it."""
    if "output_shape" not in node.attrs:
        return tvm_onnx(ctx, node)
    in_sp = ctx.shape(node.inputs[0])[2:]
    n = len(in_sp)
    kernel = list(node.attrs.get("kernel_shape", ctx.shape(node.inputs[1])[2:]))
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    extra = list(node.attrs.get("output_padding", [0] * n))
    want = list(node.attrs["output_shape"])[-n:]
    begin, end = [0] * n, [0] * n
    for i in range(n):
        total = strides[i] * (in_sp[i] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1
        total -= want[i]
        if total < 0:
            extra[i] -= total
            continue
        small = total // 2
        upper = node.attr_str("auto_pad", "NOTSET") == "SAME_UPPER"
        begin[i], end[i] = (small, total - small) if upper else (total - small, small)
    skip = ("output_shape", "auto_pad", "pads", "output_padding")
    attrs = {k: v for k, v in node.attrs.items() if k not in skip}
    attrs |= {"pads": begin + end, "output_padding": extra}
    plain = Node(node.name, node.op_type, node.inputs, node.outputs, attrs, node.domain)
    return tvm_onnx(ctx, plain)


def reduce_tvm(ctx: _Ctx, node: Node):
    """TVM's reduction converters, with run-time axes read off the static shapes."""
    if not _opt(node, 1) or ctx.graph.is_constant(node.inputs[1]):
        return tvm_onnx(ctx, node)
    axes = runtime_axes(ctx.graph, node)
    if not axes:  # only size-1 axes, or none with noop_with_empty_axes: nothing to do
        return [ctx.x(node.inputs[0])]
    return tvm_onnx(ctx, node, {1: np.array(axes, np.int64)})


def top_k(ctx: _Ctx, node: Node):
    """A run-time k is the static outputs' length on the axis."""
    if ctx.graph.is_constant(node.inputs[1]):
        return tvm_onnx(ctx, node)
    k = declared_shape(ctx.graph, node)[int(node.attrs.get("axis", -1))]
    return tvm_onnx(ctx, node, {1: np.array([k], np.int64)})


def split(ctx: _Ctx, node: Node):
    """Split sizes given at run time are the static output shapes' lengths on the axis."""
    if not _opt(node, 1) or ctx.graph.is_constant(node.inputs[1]):
        return tvm_onnx(ctx, node)
    axis = int(node.attrs.get("axis", 0))
    sizes = [ctx.graph.values[o].shape[axis] for o in node.outputs]
    return tvm_onnx(ctx, node, {1: np.array(sizes, np.int64)})


def resize(ctx: _Ctx, node: Node):
    return _resize.resize(ctx, node)


def dropout(ctx: _Ctx, node: Node):
    """Inference (the check saw to it): the data unchanged, and a mask of all true."""
    outs = [ctx.x(node.inputs[0])]
    if len(node.outputs) > 1 and node.outputs[1]:
        outs.append(ctx.emit(R.ones(ctx.shape(node.inputs[0]), "bool")))
    return outs


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
add = _binary(R.add)
subtract = _binary(R.subtract)
multiply = _binary(R.multiply)
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
reduce_max = _reduce(_max_with_inf)
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
        shape = [ctx.dim(d) for d in value.shape]  # a str dim: symbolic (dynamic batch)
        var = relax.Var(_safe(name), relax.TensorType(shape, value.dtype))
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
        dims = tuple(d if isinstance(d, int) else str(d) for d in map(_static_dim, ty.shape.values))
        graph.values[name] = Value(name, dims, str(ty.dtype))
    mod = bb.get()
    _refuse_empty_constants(mod)
    return mod


def _refuse_empty_constants(mod: tvm.IRModule) -> None:
    """An empty constant the function uses (a folded empty output, say) builds, but the
    library then fails to load ("Invalid DLTensor file format"): refuse it here."""
    empty: list[tuple[int, ...]] = []

    def visit(expr) -> None:  # noqa: ANN001
        if isinstance(expr, tvm.ir.expr.GenericConst):  # a tensor constant
            shape = getattr(expr.ty, "shape", None)
            dims = [getattr(d, "value", None) for d in shape.values] if shape is not None else []
            if 0 in dims:
                empty.append(tuple(dims))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    if empty:
        raise UnsupportedOpsError(
            [
                (
                    "Constant",
                    "",
                    f"an empty constant of shape {list(empty[0])}: empty tensors are not supported",
                )
            ]
        )


def _safe(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out and not out[0].isdigit() else "v_" + out


# --- graphopt::RNNStep: one fused recurrent step (made by expand-rnn) ------------------
# Each key (cell, shapes, activations, row stride) is one PrimFunc for every step of a
# layer (ctx.funcs); the step's first projection row is an argument (a 1-element int64
# tensor, so kernel timers that call it with zeros stay in range), not baked into code.


def _rnn_act(name: str, x):  # noqa: ANN001, ANN202 - te tensors
    """The activation as the CPU legalization computes it (TOPI's polynomial exp/tanh),
    kept as its own block (``*_act``): the step's schedule materializes it once instead
    of inlining the polynomial into every use (a GRU's tanh of an expression holding a
    sigmoid would repeat that sigmoid a dozen times)."""
    if name == "Sigmoid":
        e = topi.fast_exp(topi.negative(x))
        y = te.compute(x.shape, lambda *i: 1 / (1 + e(*i)), name="sigmoid")
    elif name == "Tanh":
        y = topi.fast_tanh(x)
    else:
        y = topi.nn.relu(x)
    return te.compute(x.shape, lambda *i: y(*i), name=f"{x.op.name}_act")


def rnn_step_te(node: Node, shapes: dict[str, tuple], row0):  # noqa: ANN001, ANN201
    """The TE compute of one step: ``acc = H_{t-1} @ R^T`` over the packed weight, then
    the gate math, in one kernel. Returns (inputs, outputs) te tensors; the outputs are
    [B, H/U, U] (hidden unit ``j*U + u`` at ``[b, j, u]``), so the gate math indexes the
    accumulators without a division (a vectorized ``n // U`` turns into lane gathers).

    ``rp`` [H/U, H, G*U] holds R^T with each U-column block of every gate side by side:
    ``rp[j, k, g*U + u] = R^T[k, g*H + j*U + u]``, so the gates of hidden units
    ``j*U ... j*U+U-1`` come out of one pass over a contiguous weight block.
    """
    cell, hidden, block = node.attrs["cell"], int(node.attrs["hidden"]), int(node.attrs["block"])
    acts = [a.decode() if isinstance(a, bytes) else a for a in node.attrs["activations"]]
    stride = int(node.attrs["row_stride"])
    dtype = "float32"
    xw = te.placeholder(shapes["xw"], dtype, "xw")
    h = te.placeholder(shapes["h"], dtype, "h")
    rp = te.placeholder(shapes["rp"], dtype, "rp")
    batch = shapes["h"][0]
    n_blocks, _, n_cols = shapes["rp"]
    out_shape = (batch, n_blocks, block)
    k = te.reduce_axis((0, hidden), "k")
    acc = te.compute(
        (batch, n_blocks, n_cols),
        lambda b, j, q: te.sum(h[b, k] * rp[j, k, q], axis=k),
        name="rnn_step_matmul",
        attrs={"graphopt.kernel": "rnn_step"},
    )

    def pre(g: int):  # noqa: ANN202 - gate g's pre-activation, [B, H/U, U]
        return te.compute(
            out_shape,
            lambda b, j, u: (
                xw[row0 + b * stride, g * hidden + j * block + u] + acc[b, j, g * block + u]
            ),
            name=f"gate{g}",
        )

    inputs = [xw, h]
    if cell == "LSTM":
        f, g, hact = acts
        c = te.placeholder(shapes["c"], dtype, "c")
        inputs.append(c)
        i_, o_, f_, c_ = (_rnn_act(a, pre(q)) for a, q in ((f, 0), (f, 1), (f, 2), (g, 3)))
        c_new = te.compute(
            out_shape,
            lambda b, j, u: f_[b, j, u] * c[b, j * block + u] + i_[b, j, u] * c_[b, j, u],
            name="c_t",
        )
        tc = _rnn_act(hact, c_new)
        h_new = te.compute(out_shape, lambda b, j, u: o_[b, j, u] * tc[b, j, u], name="hidden")
        # No block reads an output (GPU schedule rules inline into outputs, not out of them)
        c_out = te.compute(out_shape, lambda b, j, u: c_new[b, j, u], name="cell")
        return [*inputs, rp], [h_new, c_out]
    if cell == "GRU":  # linear_before_reset=1: n = g(xh + r * (H @ Rh^T + Rbh))
        f, g = acts
        z = _rnn_act(f, pre(0))
        r = _rnn_act(f, pre(1))
        rbh = te.placeholder((hidden,), dtype, "rbh") if "rbh" in shapes else None

        def cand_pre(b, j, u):  # noqa: ANN001, ANN202
            rec = acc[b, j, 2 * block + u]
            if rbh is not None:
                rec = rec + rbh[j * block + u]
            return xw[row0 + b * stride, 2 * hidden + j * block + u] + r[b, j, u] * rec

        cand = _rnn_act(g, te.compute(out_shape, cand_pre, name="gate2"))
        h_new = te.compute(
            out_shape,
            lambda b, j, u: cand[b, j, u] + z[b, j, u] * (h[b, j * block + u] - cand[b, j, u]),
            name="hidden",
        )
        extra = [rbh] if rbh is not None else []
        return [*inputs, rp, *extra], [h_new]
    act = _rnn_act(acts[0], pre(0))
    h_new = te.compute(out_shape, lambda b, j, u: act[b, j, u], name="hidden")
    return [*inputs, rp], [h_new]


def rnn_step(ctx: _Ctx, node: Node):
    """One recurrent step as one kernel (see :func:`rnn_step_te`); inputs ``xw`` (the
    input projection of all steps, [rows, G*H]), ``h``, (LSTM) ``c``, the packed weight,
    (GRU) ``rbh``; outputs H_t (and C_t)."""
    names = ["xw", "h", "c", "rp"] if node.attrs["cell"] == "LSTM" else ["xw", "h", "rp", "rbh"]
    given = zip(names, node.inputs, strict=False)  # a GRU without Rbh has no 4th input
    shapes = {n: tuple(int(d) for d in ctx.shape(i)) for n, i in given}
    acts = tuple(a.decode() if isinstance(a, bytes) else a for a in node.attrs["activations"])
    key = ("rnn_step", node.attrs["cell"], tuple(sorted(shapes.items())), acts)
    key += (int(node.attrs["row_stride"]),)
    if key not in ctx.funcs:
        row = te.placeholder((1,), "int32", "row0")
        ins, outs = rnn_step_te(node, shapes, row[0])
        func = te.create_prim_func([*ins, row, *outs]).without_attr("global_symbol")
        func = func.with_attr("op_pattern", 8)  # opaque: FuseOps leaves it whole
        gvar = ctx.bb.add_func(func, f"rnn_step_{node.attrs['cell'].lower()}")
        out_ty = [relax.TensorType([int(d) for d in o.shape], "float32") for o in outs]
        ctx.funcs[key] = (gvar, out_ty)
    gvar, out_ty = ctx.funcs[key]
    args = [ctx.x(i) for i in node.inputs]
    args.append(_const(np.array([node.attrs["row0"]], np.int32)))  # a tensor: in range at 0
    call = ctx.emit(relax.call_tir(gvar, args, out_ty if len(out_ty) > 1 else out_ty[0]))
    outs = [call] if len(out_ty) == 1 else [relax.TupleGetItem(call, i) for i in range(len(out_ty))]
    return [ctx.emit(R.reshape(o, shapes["h"])) for o in outs]  # [B, H/U, U] -> [B, H]: a view


# --- graphopt::RNNSequence: a whole recurrent layer (made by expand-rnn) ----------------
def rnn_sequence(ctx: _Ctx, node: Node):
    """Every step of every direction as one kernel (:mod:`graphopt.lower._rnn_sequence`);
    inputs ``xw`` [rows, D*G*H], ``h0`` [D, B, H], (LSTM) ``c0``, the packed weight
    [D, H/U, H, G*U], (GRU) ``rbh`` [D, H]; outputs the states of every step
    [T, D, B, H] and (LSTM) the last cell state [D, B, H]. Lowered as the plain loop
    nest; the CPU targets' rule ``rnn_sequence`` swaps in the vectorized, parallel one."""
    a = node.attrs
    _text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    cell = _text(a["cell"])
    shape_h0 = tuple(int(d) for d in ctx.shape(node.inputs[1]))
    dirs, batch, hidden = shape_h0
    acts = [_text(x) for x in a["activations"]]
    per_dir = len(acts) // dirs
    spec = _rnn_sequence.Spec(
        cell=cell,
        seq=int(a["seq"]),
        batch=batch,
        hidden=hidden,
        block=int(a["block"]),
        reverse=tuple(bool(r) for r in a["reverse"]),
        acts=tuple(tuple(acts[d * per_dir : (d + 1) * per_dir]) for d in range(dirs)),
        row_t=int(a["row_t"]),
        row_b=int(a["row_b"]),
        rbh=cell == "GRU" and len(node.inputs) > 3,
    )
    if spec not in ctx.funcs:
        func = _rnn_sequence.sequence_func(spec).with_attr("op_pattern", 8)  # opaque
        gvar = ctx.bb.add_func(func, f"rnn_sequence_{cell.lower()}")
        out_ty = [relax.TensorType([spec.seq, dirs, batch, hidden], "float32")]
        if cell == "LSTM":
            out_ty.append(relax.TensorType([dirs, batch, hidden], "float32"))
        ctx.funcs[spec] = (gvar, out_ty)
    gvar, out_ty = ctx.funcs[spec]
    args = [ctx.x(i) for i in node.inputs]
    call = ctx.emit(relax.call_tir(gvar, args, out_ty if len(out_ty) > 1 else out_ty[0]))
    if len(out_ty) == 1:
        return [call]
    return [ctx.emit(relax.TupleGetItem(call, i)) for i in range(len(out_ty))]
