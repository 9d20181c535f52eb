"""The op table: which ONNX ops lower, the static checks that refuse attribute values, and
the name of each op's converter.

``CONVERTERS`` maps an op to its :class:`OpRule` (check, converter name), one entry per
op. Checks run without TVM, so ``graphopt inspect`` can name every op that would fail
before a compile starts; the converters live in :mod:`graphopt.lower.relax`, which imports
TVM, and are named here by string.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.ir import Graph, Node

_FLOAT = ("float32",)


def _needs_const(*positions: int) -> Callable[[Graph, Node], str | None]:
    def check(graph: Graph, node: Node) -> str | None:
        for p in positions:
            if len(node.inputs) > p and node.inputs[p] and not graph.is_constant(node.inputs[p]):
                return f"input {p} ({node.inputs[p]!r}) must be a constant"
        return None

    return check


def _static(graph: Graph, name: str) -> tuple[int, ...] | None:
    """``name``'s shape when every dim is known; None for symbolic ones (``graphopt
    inspect`` shows models before their shapes are fixed: they are judged at compile)."""
    value = graph.values.get(name) if name else None
    return tuple(value.shape) if value is not None and value.is_static else None


def _window(node: Node, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> str | None:
    """Check a Conv/pool window (kernel, strides, dilations, pads) against the ONNX rules,
    and that every output position exists: TVM asserts (or divides by zero) on a
    stride 0, a negative pad or an empty output instead of saying which node is wrong."""
    n = len(spatial)
    if len(kernel) != n or any(k < 1 for k in kernel):
        return f"kernel shape {list(kernel)} does not fit a {n}-D input"
    for key, size, least in (("strides", n, 1), ("dilations", n, 1), ("pads", 2 * n, 0)):
        values = node.attrs.get(key)
        if values is not None and (len(values) != size or any(v < least for v in values)):
            return f"{key}={list(values)}: expected {size} values of at least {least}"
    auto_pad = node.attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode(errors="replace") if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        return f"auto_pad={auto_pad!r} is not an ONNX auto_pad mode"
    dilations = node.attrs.get("dilations", [1] * n)
    pads = node.attrs.get("pads", [0] * 2 * n) if auto_pad == "NOTSET" else [0] * 2 * n
    for i in range(n):
        span = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("NOTSET", "VALID") and spatial[i] + pads[i] + pads[n + i] < span:
            return f"the window ({span} wide with dilation) is larger than the padded input"
    return None


def _check_conv(graph: Graph, node: Node) -> str | None:
    value = graph.values.get(node.inputs[0])
    if value is None or value.shape is None or len(value.shape) not in (3, 4, 5):
        return "only 1-D, 2-D and 3-D convolutions are supported"
    x, w = _static(graph, node.inputs[0]), _static(graph, node.inputs[1])
    if x is None or w is None:
        return None
    group = node.attrs.get("group", 1)
    if len(w) != len(x) or group < 1 or x[1] != w[1] * group or w[0] % group:
        return f"input shape {x}, weight shape {w} and group={group} do not fit together"
    bias = _static(graph, node.inputs[2]) if len(node.inputs) > 2 else None
    if bias is not None and bias != (w[0],):
        return f"bias shape {bias} does not match the {w[0]} output channels"
    kernel = tuple(node.attrs.get("kernel_shape", w[2:]))
    if kernel != w[2:]:
        return f"kernel_shape={list(kernel)} disagrees with the weight shape {w}"
    return _window(node, x[2:], kernel)


def _check_pool(graph: Graph, node: Node) -> str | None:
    if len([o for o in node.outputs if o]) > 1:
        return "the Indices output is not supported"
    value = graph.values.get(node.inputs[0])
    if value is None or value.shape is None or len(value.shape) not in (3, 4, 5):
        return "only 1-D, 2-D and 3-D pooling is supported"
    if node.attrs.get("storage_order", 0):
        return "storage_order=1 is not supported"
    x = _static(graph, node.inputs[0])
    return None if x is None else _window(node, x[2:], tuple(node.attrs["kernel_shape"]))


def _check_global_pool(graph: Graph, node: Node) -> str | None:
    value = graph.values.get(node.inputs[0])
    if value is not None and value.shape is not None and len(value.shape) < 3:
        return f"the input has rank {len(value.shape)}; global pooling needs N, C and spatial dims"
    return None


def _check_bn(graph: Graph, node: Node) -> str | None:
    """Training mode (batch statistics, updated running mean/var) from opset 14 on, where
    its outputs are Y, running_mean, running_var; before that outputs differ."""
    training = node.attrs.get("training_mode", 0)
    if len([o for o in node.outputs if o]) > 1 and not (training and graph.opset >= 14):
        return "the mean/var outputs are only supported with training_mode=1, opset 14+"
    return None


def _check_softmax(graph: Graph, node: Node) -> str | None:
    return None


def const_ints(graph: Graph, name: str) -> list[int]:
    """A constant's values as ints, flattened: ONNX wants axes, pads and shapes 1-D, but
    shape inference passes a scalar too."""
    return [int(v) for v in np.asarray(graph.constants[name]).reshape(-1)]


def slice_picks(graph: Graph, node: Node, shape: tuple[int, ...]) -> list[tuple[int, range]]:
    """Per sliced axis of a Slice node (constant operands), the axis and the indices it
    takes, in the order taken; ValueError names what is wrong (ONNX's clamping rules are
    Python's slice rules, negative steps included)."""
    starts, ends = const_ints(graph, node.inputs[1]), const_ints(graph, node.inputs[2])
    axes_name = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    steps_name = node.inputs[4] if len(node.inputs) > 4 and node.inputs[4] else None
    axes = const_ints(graph, axes_name) if axes_name else list(range(len(starts)))
    steps = const_ints(graph, steps_name) if steps_name else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("starts, ends, axes and steps differ in length")
    if any(not -len(shape) <= a < len(shape) for a in axes):
        raise ValueError(f"axes {axes} out of range for rank {len(shape)}")
    if 0 in steps:
        raise ValueError("a step of 0")
    picks = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        picked = range(*slice(start, end, step).indices(shape[axis % len(shape)]))
        if not picked:
            raise ValueError("an empty slice is not supported")
        picks.append((axis % len(shape), picked))
    return picks


def pad_widths(graph: Graph, node: Node, rank: int) -> list[int]:
    """A Pad node's (constant) pads as ``[begin0, end0, begin1, end1, ...]`` over all
    ``rank`` axes; ValueError names what is wrong."""
    pads = const_ints(graph, node.inputs[1])
    axes_name = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    axes = const_ints(graph, axes_name) if axes_name else list(range(rank))
    if len(pads) != 2 * len(axes) or any(not -rank <= a < rank for a in axes):
        raise ValueError(f"pads {pads} do not fit axes {axes} of a rank-{rank} input")
    width = [0] * (2 * rank)
    for i, a in enumerate(axes):
        width[2 * (a % rank)], width[2 * (a % rank) + 1] = pads[i], pads[len(axes) + i]
    if any(w < 0 for w in width):
        raise ValueError("negative pads are not supported")
    return width


def _check_slice(graph: Graph, node: Node) -> str | None:
    shape = _static(graph, node.inputs[0])
    reason = _needs_const(1, 2, 3, 4)(graph, node)
    if reason or shape is None:
        return reason
    try:
        slice_picks(graph, node, shape)
    except ValueError as exc:
        return str(exc)
    return None


def _check_pad(graph: Graph, node: Node) -> str | None:
    mode = node.attrs.get("mode", b"constant")
    mode = mode.decode(errors="replace") if isinstance(mode, bytes) else mode
    if mode not in ("constant", "edge", "reflect", "wrap"):
        return f"mode={mode!r} is not an ONNX Pad mode"
    shape = _static(graph, node.inputs[0])
    reason = _needs_const(1, 2, 3)(graph, node)
    if reason or shape is None:
        return reason
    if len(node.inputs) > 2 and node.inputs[2] and graph.constants[node.inputs[2]].size != 1:
        return "the constant_value input must hold one value"
    try:
        pad_widths(graph, node, len(shape))
    except ValueError as exc:
        return str(exc)
    return None


def declared_shape(graph: Graph, node: Node) -> list[int]:
    """The static shape ONNX shape inference (or the model's declaration) gives the
    node's first output: what a shape input computed at run time must produce."""
    return list(_static(graph, node.outputs[0]) or ())


def _runtime_shape(graph: Graph, node: Node, position: int) -> str | None:
    """A shape input that is not a constant is allowed when the output's shape is
    static anyway (declared in the model, or inferred): the result is then fixed by that
    shape, and the shape input's values are not needed. Otherwise only a run knows."""
    name = node.inputs[position] if len(node.inputs) > position else ""
    if not name or graph.is_constant(name) or _static(graph, node.outputs[0]) is not None:
        return None
    return f"input {position} ({name!r}) sets the output shape, which only a run would know"


def _check_reshape(graph: Graph, node: Node) -> str | None:
    """The target shape must be one ONNX allows for this input: TVM would fail on a
    wrong element count with an error that names no node."""
    shape = _static(graph, node.inputs[0])
    reason = _runtime_shape(graph, node, 1)
    if reason or shape is None:
        return reason
    if not graph.is_constant(node.inputs[1]):
        out = declared_shape(graph, node)
        fits = math.prod(out) == math.prod(shape)
        return None if fits else f"cannot reshape {list(shape)} to {out}"
    target = const_ints(graph, node.inputs[1])
    if not node.attrs.get("allowzero", 0):
        if any(d == 0 and i >= len(shape) for i, d in enumerate(target)):
            return f"shape {target} copies a dim (0) the rank-{len(shape)} input lacks"
        target = [shape[i] if d == 0 else d for i, d in enumerate(target)]
    if target.count(-1) > 1 or any(d < -1 for d in target):
        return f"{target} is not a Reshape target"
    known = math.prod(d for d in target if d != -1)
    total = math.prod(shape)
    fits = (known > 0 and total % known == 0) if -1 in target else known == total
    return None if fits else f"cannot reshape {list(shape)} ({total} elements) to {target}"


def _check_expand(graph: Graph, node: Node) -> str | None:
    return _runtime_shape(graph, node, 1)


def _check_squeeze(graph: Graph, node: Node) -> str | None:
    """Axes given at run time are fine when the output shape is static: Squeeze and
    Unsqueeze only reshape (lowered as a reshape to that shape)."""
    return _runtime_shape(graph, node, 1)


# Reductions for which reducing a size-1 axis changes nothing (L1, L2, SumSquare and
# LogSum do change it: |x|, x*x, log x).
_SIZE1_IDENTITY = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                   "ReduceLogSumExp"}  # fmt: skip


def runtime_axes(graph: Graph, node: Node) -> list[int]:
    """The axes a reduction with run-time ``axes`` must have used, read off its static
    input and output shapes; ValueError when the shapes allow more than one answer that
    would compute different values."""
    shape, out = _static(graph, node.inputs[0]), _static(graph, node.outputs[0])
    if shape is None or out is None:
        raise ValueError("its axes are only known at run time")
    keep = node.attrs.get("keepdims", 1)
    found = set()
    for picked in itertools.product((False, True), repeat=len(shape)):
        axes = [i for i, p in enumerate(picked) if p]
        if not axes and not node.attrs.get("noop_with_empty_axes", 0):
            axes = list(range(len(shape)))
        if keep:
            got = tuple(1 if i in axes else d for i, d in enumerate(shape))
        else:
            got = tuple(d for i, d in enumerate(shape) if i not in axes)
        if got != out:
            continue
        if node.op_type in _SIZE1_IDENTITY:  # size-1 axes: the same values either way
            axes = [a for a in axes if shape[a] != 1] if keep else axes
        found.add(tuple(axes))
    if len(found) != 1 or not keep and any(shape[a] == 1 for a in next(iter(found))):
        raise ValueError(f"its run-time axes are ambiguous for shapes {list(shape)} -> {list(out)}")
    return list(next(iter(found)))


def _check_reduce(graph: Graph, node: Node) -> str | None:
    value = graph.values.get(node.inputs[0])
    if value is not None and value.dtype == "bool":  # TVM has no min/max value for bool
        return "reductions over bool tensors are not supported"
    name = node.inputs[1] if len(node.inputs) > 1 else ""
    if not name or graph.is_constant(name):
        return None
    try:
        runtime_axes(graph, node)
    except ValueError as exc:
        return f"input 1 ({name!r}): {exc}"
    return None


def _check_clip(graph: Graph, node: Node) -> str | None:
    bounds = [i for i in node.inputs[1:3] if i]
    shapes = [_static(graph, i) for i in bounds]
    if any(s is None or math.prod(s) != 1 or len(s) > 1 for s in shapes):
        return "min and max must be scalars"
    return None


def _check_gemm(graph: Graph, node: Node) -> str | None:
    """ONNX shape inference checks A and B but not that C broadcasts to the [M, N]
    result; Relax's add then fails naming no node."""
    a, b = _static(graph, node.inputs[0]), _static(graph, node.inputs[1])
    if a is None or b is None:
        return None
    if len(a) != 2 or len(b) != 2:
        return f"A {list(a)} and B {list(b)} must be matrices"
    m, k = a[::-1] if node.attrs.get("transA", 0) else a
    k2, n = b[::-1] if node.attrs.get("transB", 0) else b
    c = _static(graph, node.inputs[2]) if len(node.inputs) > 2 else None
    if k != k2:
        return f"A {list(a)} and B {list(b)} do not multiply (transA/transB applied)"
    if c is not None and not _broadcasts_to(c, (m, n)):
        return f"C {list(c)} does not broadcast to the [{m}, {n}] result"
    return None


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def _check_flatten(graph: Graph, node: Node) -> str | None:
    value, axis = graph.values.get(node.inputs[0]), node.attrs.get("axis", 1)
    rank = len(value.shape) if value is not None and value.shape is not None else None
    if rank is not None and not -rank <= axis <= rank:
        return f"axis={axis} is outside [-{rank}, {rank}]"
    return None


def _check_transpose(graph: Graph, node: Node) -> str | None:
    shape, perm = _static(graph, node.inputs[0]), node.attrs.get("perm")
    if shape is not None and perm is not None and sorted(perm) != list(range(len(shape))):
        return f"perm={list(perm)} is not a permutation of the {len(shape)} axes"
    return None


def _check_cast(graph: Graph, node: Node) -> str | None:
    """FLOAT8, E8M0, INT4/INT2, bfloat16, strings: TVM gives wrong values or fails at run
    time on them; refused here whether or not shape inference typed the output."""
    try:
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    except (KeyError, ValueError, TypeError):
        return f"to={node.attrs.get('to')!r} is not an element type graphopt knows"
    return None if dtype in _DTYPES else f"casting to {dtype} is not supported"


def _check_dropout(graph: Graph, node: Node) -> str | None:
    """Inference only: a training_mode that is not a constant false drops at random
    (unless the ratio is a constant 0)."""
    training = node.inputs[2] if len(node.inputs) > 2 else ""
    ratio = node.inputs[1] if len(node.inputs) > 1 else ""
    if not training:
        return None
    if graph.is_constant(training) and not np.asarray(graph.constants[training]).any():
        return None
    if ratio and graph.is_constant(ratio) and not np.asarray(graph.constants[ratio]).any():
        return None
    return "training_mode may be true: dropout at random is not supported"


def _ok(graph: Graph, node: Node) -> str | None:
    return None


def _all(*checks: Callable[[Graph, Node], str | None]) -> Callable[[Graph, Node], str | None]:
    def check(graph: Graph, node: Node) -> str | None:
        return next((r for r in (c(graph, node) for c in checks) if r), None)

    return check


# --- ops lowered by TVM's own ONNX converters (graphopt.lower._tvm_onnx) ----------
# Each entry is the check that refuses what TVM's converter gets wrong, or what would
# fail at run time; the node cases of ONNX's backend tests say which those are.


def _const_inputs(*positions: int) -> Callable[[Graph, Node], str | None]:
    """Shape-like inputs (shapes, axes, sizes, scales, repeats, pads) must be folded to
    constants: a shape only a run would know cannot be compiled."""
    need = _needs_const(*positions)

    def check(graph: Graph, node: Node) -> str | None:
        reason = need(graph, node)
        return (
            f"{reason}: it sets the output shape, which only a run would know" if reason else None
        )

    return check


def _check_top_k(graph: Graph, node: Node) -> str | None:
    """A run-time k is the static outputs' length on the axis. TVM's sort fails at run
    time on uint64."""
    value = graph.values.get(node.inputs[0])
    if value is not None and value.dtype == "uint64":
        return "TopK over uint64 is not supported"
    return _runtime_shape(graph, node, 1)


def _check_split(graph: Graph, node: Node) -> str | None:
    """Run-time split sizes are fine when every output's shape is static (they are then
    those shapes' lengths on the axis)."""
    name = node.inputs[1] if len(node.inputs) > 1 else ""
    if name and not graph.is_constant(name):
        if any(_static(graph, o) is None for o in node.outputs if o):
            return f"input 1 ({name!r}) sets the output shapes, which only a run would know"
    return None


def _attr_text(node: Node, key: str, default: str) -> str:
    v = node.attrs.get(key, default)
    return v.decode(errors="replace") if isinstance(v, bytes) else v


def _check_resize(graph: Graph, node: Node) -> str | None:
    """graphopt's own Resize (lower/_resize.py) needs the output shape static; scales,
    sizes and roi may come at run time. Antialiasing is not implemented."""
    if node.attrs.get("antialias", 0):
        return "antialias=1 is not supported"
    shape, out = _static(graph, node.inputs[0]), _static(graph, node.outputs[0])
    if out is None:
        return "its output shape is only known at run time"
    if shape is not None and len(shape) != len(out):
        return f"output rank {len(out)} differs from input rank {len(shape)}"
    mode = _attr_text(node, "mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        return f"mode={mode!r} is not a Resize mode"
    return None


def _check_mod(graph: Graph, node: Node) -> str | None:
    value = graph.values.get(node.inputs[0])
    if not node.attrs.get("fmod", 0) and value is not None and "float" in value.dtype:
        return "fmod=0 on floats (TVM's floor_mod differs from numpy's mod at the edges)"
    return None


def _check_space_to_depth(graph: Graph, node: Node) -> str | None:
    mode = node.attrs.get("mode", b"DCR")
    mode = mode.decode(errors="replace") if isinstance(mode, bytes) else mode
    return None if mode == "DCR" else f"mode={mode!r} is not supported (TVM's converter ignores it)"


def _check_rms_norm(graph: Graph, node: Node) -> str | None:
    value = graph.values.get(node.inputs[0])
    rank = len(value.shape) if value is not None and value.shape is not None else None
    if rank and int(node.attrs.get("axis", -1)) % rank == 0:
        return "normalizing over every axis (axis 0) is not supported (TVM fails to build it)"
    return None


def _check_pow(graph: Graph, node: Node) -> str | None:
    value = graph.values.get(node.inputs[0])
    if value is not None and "float" not in value.dtype:
        return f"an integer base ({value.dtype}): TVM's power only takes floats"
    return None


TVM_OPS: dict[str, Callable[[Graph, Node], str | None]] = {
    # element-wise
    **dict.fromkeys(
        "Acos Acosh Asin Asinh Atan Atanh Cos Sin Tan Floor Ceil Round Sign "
        "Softsign Selu Elu PRelu ThresholdedRelu Shrink IsNaN Not "
        "And Or Xor Equal Less LessOrEqual Greater GreaterOrEqual "
        "BitwiseAnd BitwiseOr BitwiseXor BitwiseNot Where Sum Mean CastLike".split(),
        _ok,
    ),
    # normalization
    **dict.fromkeys(
        "GroupNormalization InstanceNormalization LRN MeanVarianceNormalization".split(),
        _ok,
    ),
    "RMSNormalization": _check_rms_norm,
    # index ops
    **dict.fromkeys("ArgMax ArgMin GatherElements GatherND Einsum".split(), _ok),
    "Mod": _check_mod,
    "SpaceToDepth": _check_space_to_depth,
    "CumSum": _needs_const(1),
    "Trilu": _needs_const(1),
    "OneHot": _const_inputs(1),
    # shapes
    "Tile": _const_inputs(1),
    "Range": _const_inputs(0, 1, 2),
    "ConstantOfShape": _const_inputs(0),
    "DepthToSpace": _ok,
    "EyeLike": _ok,
    "Size": _ok,
    "LpPool": _ok,
    "GlobalLpPool": _ok,
    "MaxUnpool": _ok,
    "ScatterElements": _ok,
    "ScatterND": _ok,
}


@dataclass(frozen=True)
class OpRule:
    """What graphopt knows about one op it compiles.

    ``check(graph, node)`` returns why a node cannot be lowered, or None; it runs without
    TVM (``graphopt inspect`` and ``prepare`` call it first). ``lower`` names the function
    of :mod:`graphopt.lower.relax` that converts the node, so this table loads without
    importing TVM; ``tests/lower/test_ops.py`` checks that every name resolves.
    """

    check: Callable[[Graph, Node], str | None]
    lower: str


# converter key (see converter_key) -> its check and converter, the one table of ops.
CONVERTERS: dict[str, OpRule] = {
    "Conv": OpRule(_check_conv, "conv"),
    "BatchNormalization": OpRule(_check_bn, "batch_norm"),
    "MaxPool": OpRule(_check_pool, "max_pool"),
    "AveragePool": OpRule(_check_pool, "avg_pool"),
    "GlobalAveragePool": OpRule(_check_global_pool, "global_avg_pool"),
    "GlobalMaxPool": OpRule(_check_global_pool, "global_max_pool"),
    "Gemm": OpRule(_check_gemm, "gemm"),
    "MatMul": OpRule(_ok, "matmul"),
    "Add": OpRule(_ok, "add"),
    "Sub": OpRule(_ok, "subtract"),
    "Mul": OpRule(_ok, "multiply"),
    "Div": OpRule(_ok, "divide"),
    "Pow": OpRule(_check_pow, "power"),
    "Cosh": OpRule(_ok, "cosh"),
    "Sinh": OpRule(_ok, "sinh"),
    "Max": OpRule(_ok, "maximum"),
    "Min": OpRule(_ok, "minimum"),
    "Relu": OpRule(_ok, "relu"),
    "LeakyRelu": OpRule(_ok, "leaky_relu"),
    "Sigmoid": OpRule(_ok, "sigmoid"),
    "HardSigmoid": OpRule(_ok, "hard_sigmoid"),
    "HardSwish": OpRule(_ok, "hard_swish"),
    "Tanh": OpRule(_ok, "tanh"),
    "Exp": OpRule(_ok, "exp"),
    "Log": OpRule(_ok, "log"),
    "Sqrt": OpRule(_ok, "sqrt"),
    "Neg": OpRule(_ok, "negative"),
    "Abs": OpRule(_ok, "absolute"),
    "Erf": OpRule(_ok, "erf"),
    "Reciprocal": OpRule(_ok, "reciprocal"),
    "Gelu": OpRule(_ok, "gelu"),
    "Clip": OpRule(_check_clip, "clip"),
    "Softmax": OpRule(_check_softmax, "softmax"),
    "LogSoftmax": OpRule(_check_softmax, "log_softmax"),
    "Concat": OpRule(_ok, "concat"),
    "Reshape": OpRule(_check_reshape, "reshape"),
    "Flatten": OpRule(_check_flatten, "flatten"),
    "Transpose": OpRule(_check_transpose, "transpose"),
    "Squeeze": OpRule(_check_squeeze, "squeeze"),
    "Unsqueeze": OpRule(_check_squeeze, "unsqueeze"),
    "ReduceMean": OpRule(_check_reduce, "reduce_mean"),
    "ReduceSum": OpRule(_check_reduce, "reduce_sum"),
    "ReduceMax": OpRule(_check_reduce, "reduce_max"),
    "Identity": OpRule(_ok, "identity"),
    "Dropout": OpRule(_check_dropout, "dropout"),
    "Cast": OpRule(_check_cast, "cast"),
    "Gather": OpRule(_ok, "gather"),
    "Slice": OpRule(_check_slice, "slice_"),
    "Pad": OpRule(_check_pad, "pad"),
    "Expand": OpRule(_check_expand, "expand"),
    "NegativeLogLikelihoodLoss": OpRule(_ok, "nll_loss"),
    "LayerNormalization": OpRule(_ok, "layer_norm"),
    "Softplus": OpRule(_ok, "softplus"),
    "Mish": OpRule(_ok, "mish"),
    "IsInf": OpRule(_ok, "is_inf"),
    "BitShift": OpRule(_ok, "bit_shift"),
    "Split": OpRule(_check_split, "split"),
    **dict.fromkeys(
        "ReduceMin ReduceProd ReduceLogSumExp ReduceLogSum ReduceSumSquare ReduceL1 "
        "ReduceL2".split(),
        OpRule(_check_reduce, "reduce_tvm"),
    ),
    "TopK": OpRule(_check_top_k, "top_k"),
    "ConvTranspose": OpRule(_ok, "conv_transpose"),
    "Resize": OpRule(_check_resize, "resize"),
    "Upsample": OpRule(_check_resize, "resize"),
    # graphopt's own domain: ops a pass makes (definitions in graphopt.passes._functions)
    "graphopt::SiLU": OpRule(_ok, "silu"),
    "graphopt::Gelu": OpRule(_ok, "gelu"),
    # one fused LSTM/GRU/RNN step (expand-rnn; float32 only, made with packed weights)
    "graphopt::RNNStep": OpRule(_ok, "rnn_step"),
    # a whole LSTM/GRU/RNN layer, the time loop in one kernel (expand-rnn sequence)
    "graphopt::RNNSequence": OpRule(_ok, "rnn_sequence"),
} | {op: OpRule(rule, "tvm_onnx") for op, rule in TVM_OPS.items()}


def converter_key(node: Node) -> str:
    """The key of ``node`` in ``CONVERTERS``: the op type, domain-qualified unless ONNX's."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


# Ops with no converter because a graph pass rewrites them into ops that have one.
_EXPANDED_BY_PASS: dict[str, str] = {
    op: "expanded by the expand-rnn pass, which did not run" for op in ("LSTM", "GRU", "RNN")
}


def unsupported_nodes(graph: Graph) -> list[tuple[str, str, str]]:
    """Every node graphopt cannot lower, as ``(op_type, node_name, reason)``."""
    found = []
    for node in graph.nodes():
        if node.domain not in ("", "ai.onnx") and converter_key(node) not in CONVERTERS:
            found.append((f"{node.domain}::{node.op_type}", node.name, "custom op domain"))
            continue
        rule = CONVERTERS.get(converter_key(node))
        if rule is None:
            found.append((node.op_type, node.name, _EXPANDED_BY_PASS.get(node.op_type, "")))
            continue
        reason = (
            _check_operands(graph, node)
            or _check_dtypes(graph, node)
            or rule.check(graph, node)
            or _check_empty(graph, node)
        )
        if reason:
            found.append((node.op_type, node.name, reason))
    for name in graph.outputs:  # a constant output (folded) has no node to check
        value = graph.values.get(name)
        if value is not None and value.dtype not in _DTYPES:
            found.append(("Output", name, f"element type {value.dtype} is not supported"))
    return found


# Element types TVM compiles kernels for and numpy/onnxruntime agree on. ONNX also has
# strings, complex numbers, bfloat16 and 8/4-bit floats; TVM fails on those late, with
# an error that names no node.
_DTYPES = {"bool", "float16", "float32", "float64"} | {
    f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)
}


# Inputs an op may leave out (an empty name); every other one is required. onnx.checker
# lets an empty name through in some variadic positions (Min's second input, say).
_OPTIONAL_INPUTS = {
    "Conv": {2},
    "Gemm": {2},
    "Clip": {1, 2},
    "Slice": {3, 4},
    "Pad": {2, 3},
    "Dropout": {1, 2},
    "Squeeze": {1},
    "ReduceMean": {1},
    "ReduceSum": {1},
    "ReduceMax": {1},
}
# Inputs that hold the data, which must share one element type; the rest are shapes,
# axes, indices or flags. Where ONNX allows an op mixed types, the converter reconciles
# them (Pow's exponent); everywhere else TVM fails on a mix with an error naming no node.
_DATA_INPUTS = {
    op: (0,)
    for op in ("Reshape", "Slice", "Squeeze", "Unsqueeze", "ReduceMean", "ReduceSum",
               "ReduceMax", "Gather", "Cast", "Dropout", "Pow", "BatchNormalization")
} | {"Pad": (0, 2)}  # fmt: skip


def _schema_operands(graph: Graph, node: Node) -> str | None:
    """Operands against the op's ONNX schema: required inputs present, inputs that share a
    type parameter of the same element type (TVM fails on a mix naming no node)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, graph.opset)
    except onnx.defs.SchemaError:
        return f"ONNX opset {graph.opset} has no {node.op_type}"
    formal = list(schema.inputs)
    groups: dict[str, set[str]] = {}
    for i, name in enumerate(node.inputs):
        if not formal:
            break
        param = formal[min(i, len(formal) - 1)]
        if not name:
            if param.option != onnx.defs.OpSchema.FormalParameterOption.Optional:
                return f"input {i} is empty, and {node.op_type} needs it"
            continue
        value = graph.values.get(name)
        if value is not None and not param.type_str.startswith("tensor("):
            groups.setdefault(param.type_str, set()).add(value.dtype)
    mixed = next((sorted(d) for d in groups.values() if len(d) > 1), None)
    return f"inputs of different element types ({', '.join(mixed)})" if mixed else None


# graphopt's own converters whose operands the ONNX schema describes (mixed types).
_SCHEMA_OPERANDS = {
    *("ReduceMin", "ReduceProd", "ReduceLogSumExp", "ReduceLogSum", "ReduceSumSquare"),
    *("ReduceL1", "ReduceL2", "TopK"),
    *("ConvTranspose", "Split", "Resize", "Upsample", "Expand", "IsInf"),
    *("NegativeLogLikelihoodLoss", "LayerNormalization"),
}


def _check_operands(graph: Graph, node: Node) -> str | None:
    if node.op_type in TVM_OPS or node.op_type in _SCHEMA_OPERANDS:
        return _schema_operands(graph, node)
    optional = _OPTIONAL_INPUTS.get(node.op_type, set())
    blank = [i for i, name in enumerate(node.inputs) if not name and i not in optional]
    if blank:
        return f"input {blank[0]} is empty, and {node.op_type} needs it"
    data = _DATA_INPUTS.get(node.op_type, range(len(node.inputs)))
    values = [graph.values.get(node.inputs[i]) for i in data if i < len(node.inputs)]
    dtypes = sorted({v.dtype for v in values if v is not None})
    if len(dtypes) > 1:
        return f"inputs of different element types ({', '.join(dtypes)})"
    return None


def _check_empty(graph: Graph, node: Node) -> str | None:
    """TVM cannot build a kernel over an empty tensor (it fails vectorizing a loop of
    extent 0, naming no node); ONNX allows them, e.g. a Gather with no indices."""
    for name in node.outputs:
        shape = _static(graph, name)
        if shape is not None and 0 in shape:
            return (
                f"output {name!r} is empty (shape {list(shape)}); empty tensors are not supported"
            )
    return None


def _check_dtypes(graph: Graph, node: Node) -> str | None:
    for name in [*node.inputs, *node.outputs]:
        value = graph.values.get(name) if name else None
        if value is not None and value.dtype not in _DTYPES:
            return f"{name!r} has element type {value.dtype}, which is not supported"
        if name and graph.is_constant(name):
            kind = np.asarray(graph.constants[name]).dtype
            if str(kind) not in _DTYPES:
                return f"{name!r} is a constant of element type {kind}, which is not supported"
    return None
