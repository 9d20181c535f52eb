"""ONNX Resize (and Upsample) as separable 1-D interpolations, with scales that may be
given at run time.

graphopt's own rather than TVM's ONNX converter: TVM's replaces the scales by the ratio
of output to input size, which is wrong wherever ONNX's size is floor(n * scale) (a
scale of 0.6 on 4 elements), and ignores some coordinate modes; ONNX's node tests show
both.

Per resized axis of input size ``n`` and (static) output size ``m``, each output index
``y`` maps to a source coordinate ``x`` by the coordinate transformation mode, exactly
as ONNX's reference (``onnx/reference/ops/op_resize.py``) writes it; then

- nearest: the index ``floor(x)`` or ``floor(x) + 1`` by ``nearest_mode``;
- linear: ``(1 - r) * d[floor(x)] + r * d[floor(x) + 1]``, ``r = x - floor(x)``;
- cubic: the four neighbours ``floor(x) - 1 .. floor(x) + 2`` with the Keys
  coefficients of ``cubic_coeff_a``;

neighbour indices clamped to ``[0, n - 1]`` (the reference's edge padding), or given
weight 0 and the rest renormalized with ``exclude_outside``. ``tf_crop_and_resize``
gives ``extrapolation_value`` where ``x`` falls outside ``[0, n - 1]``; axes are done
last to first, as the reference nests them. Coordinates are computed in float64 from
the scales (a tensor, so a run-time scales input works), indices in int64.
Antialiasing is not done here (refused by the check).
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as R

from graphopt.ir import Node

__all__ = ["resize"]

F64 = "float64"


def _f(v: float) -> relax.Expr:
    return relax.const(v, F64)


def _text(node: Node, key: str, default: str) -> str:
    v = node.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


def _source(node: Node, y: relax.Expr, scale: relax.Expr, sizes: tuple, roi):  # noqa: ANN001
    """Source coordinates (float64, shape [m]) of the output indices ``y``."""
    n, m = sizes
    mode = _text(node, "coordinate_transformation_mode", "half_pixel")
    half = R.subtract(R.divide(R.add(y, _f(0.5)), scale), _f(0.5))
    # The reference's output width is scale * n, a float: not always m.
    width = R.multiply(scale, _f(float(n)))
    single = R.equal(width, _f(1.0))
    safe = R.where(single, _f(2.0), width)  # keeps the unused branch finite
    if mode == "align_corners":
        return R.where(
            single, R.zeros_like(y), R.divide(R.multiply(y, _f(n - 1)), R.subtract(safe, _f(1.0)))
        )
    if mode == "asymmetric":
        return R.divide(y, scale)
    if mode == "pytorch_half_pixel":
        return R.where(single, R.full_like(y, _f(-0.5)), half)
    if mode == "half_pixel":
        return half
    if mode == "half_pixel_symmetric":
        adjustment = R.divide(_f(float(m)), width)
        offset = R.multiply(_f(n / 2), R.subtract(_f(1.0), adjustment))
        return R.add(offset, half)
    if mode == "tf_crop_and_resize":
        start, end = roi
        span = R.multiply(R.subtract(end, start), _f(n - 1))
        at = R.where(single, R.full_like(y, _f(0.5)), R.divide(y, R.subtract(safe, _f(1.0))))
        return R.add(R.multiply(at, span), R.multiply(start, _f(n - 1)))
    raise ValueError(f"coordinate_transformation_mode={mode!r}")


def _cubic(ratio: relax.Expr, a: float) -> list[relax.Expr]:
    def near(t):  # |t| <= 1
        return R.add(
            R.multiply(R.multiply(R.subtract(R.multiply(_f(a + 2), t), _f(a + 3)), t), t), _f(1.0)
        )

    def far(t):  # 1 < |t| < 2
        inner = R.add(R.multiply(R.subtract(R.multiply(_f(a), t), _f(5 * a)), t), _f(8 * a))
        return R.subtract(R.multiply(inner, t), _f(4 * a))

    rest = R.subtract(_f(1.0), ratio)
    return [far(R.add(ratio, _f(1.0))), near(ratio), near(rest), far(R.add(rest, _f(1.0)))]


def _taps(node: Node, x: relax.Expr) -> tuple[list[relax.Expr], list[relax.Expr] | None]:
    """Neighbour offsets from floor(x) as int64 index tensors, and their weights (None:
    nearest, one tap)."""
    floor = R.floor(x)
    ratio = R.subtract(x, floor)
    base = R.astype(floor, "int64")
    mode = _text(node, "mode", "nearest")
    if mode == "nearest":
        rounding = _text(node, "nearest_mode", "round_prefer_floor")
        up = {
            "round_prefer_floor": R.greater(ratio, _f(0.5)),
            "round_prefer_ceil": R.greater_equal(ratio, _f(0.5)),
            "floor": None,
            "ceil": R.greater(ratio, _f(0.0)),
        }[rounding]
        if up is not None:
            base = R.add(base, R.astype(up, "int64"))
        return [base], None
    if mode == "linear":
        offsets, weights = (0, 1), [R.subtract(_f(1.0), ratio), ratio]
    else:
        offsets, weights = (
            (-1, 0, 1, 2),
            _cubic(ratio, float(node.attrs.get("cubic_coeff_a", -0.75))),
        )
    return [R.add(base, relax.const(o, "int64")) for o in offsets], weights


def _resize_axis(data, node: Node, axis: int, sizes: tuple, scale, roi):  # noqa: ANN001
    n, m = sizes
    dt = str(data.ty.dtype)
    y = relax.const(np.arange(m, dtype=np.float64), F64)
    x = _source(node, y, scale, sizes, roi)
    idxs, weights = _taps(node, x)
    lo, hi = relax.const(0, "int64"), relax.const(n - 1, "int64")
    clamped = [R.minimum(R.maximum(i, lo), hi) for i in idxs]
    if weights is None:
        out = R.take(data, clamped[0], axis=axis, mode="clip")
    else:
        if node.attrs.get("exclude_outside", 0):
            inside = [R.logical_and(R.greater_equal(i, lo), R.less_equal(i, hi)) for i in idxs]
            weights = [R.where(k, w, R.zeros_like(w)) for k, w in zip(inside, weights, strict=True)]
            total = weights[0]
            for w in weights[1:]:
                total = R.add(total, w)
            weights = [R.divide(w, total) for w in weights]
        rank = len(data.ty.shape)
        shape = [m if i == axis else 1 for i in range(rank)]
        out = None
        for i, w in zip(clamped, weights, strict=True):
            term = R.multiply(
                R.astype(R.take(data, i, axis=axis, mode="clip"), F64), R.reshape(w, shape)
            )
            out = term if out is None else R.add(out, term)
        out = R.astype(out, dt) if dt != F64 else out
    if _text(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        rank = len(data.ty.shape)
        shape = [m if i == axis else 1 for i in range(rank)]
        outside = R.logical_or(R.less(x, _f(0.0)), R.greater(x, _f(n - 1)))
        fill = relax.const(float(node.attrs.get("extrapolation_value", 0.0)), dt)
        out = R.where(R.reshape(outside, shape), R.full_like(out, fill), out)
    return out


def _input(ctx, node: Node, i: int):  # noqa: ANN001
    """Input ``i`` as a Relax expression, or None when absent or an empty tensor."""
    name = node.inputs[i] if len(node.inputs) > i else ""
    if not name:
        return None
    value = ctx.graph.values.get(name)
    if value is not None and value.shape is not None and 0 in value.shape:
        return None
    return ctx.x(name)


def _pick(t: relax.Expr, i: int) -> relax.Expr:
    return R.astype(R.take(t, relax.const(i, "int64"), axis=0), F64)


def resize(ctx, node: Node) -> list[relax.Expr]:  # noqa: ANN001 - relax._Ctx
    """Resize ``node`` (Upsample: asymmetric, floor-rounding Resize of its scales)."""
    if node.op_type == "Upsample":
        attrs = {
            "mode": node.attrs.get("mode", b"nearest"),
            "coordinate_transformation_mode": b"asymmetric",
            "nearest_mode": b"floor",
        }
        if "scales" in node.attrs:  # opset 7: an attribute
            const = relax.const(np.array(node.attrs["scales"], np.float32))
            return _resize(
                ctx, Node(node.name, "Resize", node.inputs[:1], node.outputs, attrs), const
            )
        inputs = [node.inputs[0], "", node.inputs[1]]
        node = Node(node.name, "Resize", inputs, node.outputs, attrs)
    return _resize(ctx, node, None)


def _resize(ctx, node: Node, given: relax.Expr | None) -> list[relax.Expr]:  # noqa: ANN001
    data = ctx.x(node.inputs[0])
    shape = tuple(int(d) for d in ctx.shape(node.inputs[0]))
    out_shape = tuple(int(d) for d in ctx.graph.values[node.outputs[0]].shape)
    rank = len(shape)
    axes = [int(a) % rank for a in node.attrs.get("axes", range(rank))]
    roi, scales = _input(ctx, node, 1), given if given is not None else _input(ctx, node, 2)
    sizes = _input(ctx, node, 3)
    policy = _text(node, "keep_aspect_ratio_policy", "stretch")
    common = None  # the one scale of every resized axis under a keep-aspect-ratio policy
    if scales is None and sizes is not None and policy != "stretch":
        ratios = [R.divide(_pick(sizes, k), _f(float(shape[a]))) for k, a in enumerate(axes)]
        common = ratios[0]
        for r in ratios[1:]:
            common = (R.minimum if policy == "not_larger" else R.maximum)(common, r)
    crop = _text(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
    for axis in reversed(range(rank)):
        if axis not in axes:
            continue
        k = axes.index(axis)
        n, m = shape[axis], out_shape[axis]
        if scales is not None:
            scale = _pick(scales, k)
        elif common is not None:
            scale = common
        else:
            if n == m and not crop:
                continue  # x = y: nothing moves
            scale = _f(m / n)
        window = (_pick(roi, k), _pick(roi, len(axes) + k)) if crop and roi is not None else None
        data = ctx.emit(_resize_axis(data, node, axis, (n, m), scale, window))
    return [data]
