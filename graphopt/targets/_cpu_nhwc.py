"""CPU convolutions in NHWC: their TE computes and the schedule rule that makes them fast.

The ``nhwc`` layout (ARM's default, ``--layout nhwc`` on x86) gives convs NHWC
activations and OHWI[b]o weights (:mod:`graphopt.targets._layout`): output channels
blocked by b, one SIMD register wide, so ``w[co // b, kh, kw, ci, co % b]`` is one
contiguous vector per reduction step, and a whole block's reduction walks its weights
front to back.

1. ``LEGALIZE`` (a LegalizeOps customize map, merged over ``_cpu_schedules.LEGALIZE``):
   TOPI has no conv with a blocked weight, so these TE computes do, the padding as a
   separate ``data_pad`` stage; their anchor blocks carry the ``graphopt.kernel``
   annotation the rule looks for. Any other conv2d goes to ``_cpu_schedules``' handler.
2. ``RULES``: ``conv2d_nhwc``, ``depthwise_nhwc``, ``grouped_nhwc`` (one schedule,
   :func:`rule_conv2d_nhwc`, named by the conv family it takes), put before
   ``_cpu_schedules.RULES`` (``ApplyCPUSchedules(rules=[*nhwc.RULES, *cpu.RULES])``).
   They decline every kernel without the annotation, so they cost nothing in the other
   layouts.

The register tile is ``reg_n`` adjacent output pixels of one row by one channel block:
``reg_n`` accumulator vectors stay in registers over the whole reduction (kh, kw, ci),
each step one weight vector load, ``reg_n`` broadcasts of an input channel (contiguous
in NHWC) and ``reg_n`` FMAs; the fused epilogue (bias, ReLU, residual add) is applied on
the way out; (n, channel block, row) run in parallel, the channel block outermost so a
thread's weights stay in its cache across rows. Depthwise convs use the same tile with
only (kh, kw) to reduce, the channel lanes reading contiguous input vectors. Grouped convs
(ResNeXt, RegNet) block their output channels inside one group, so a block's lanes share
their input channels: the dense tile over the group's ``ci``.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, s_tir, te, tirx, topi

from graphopt.targets import _cpu_schedules as cpu

__all__ = [
    "LEGALIZE",
    "RULE",
    "RULES",
    "conv2d_nhwc_te",
    "depthwise_conv2d_nhwc_te",
    "rule_conv2d_nhwc",
    "schedule_conv2d_nhwc",
    "TUNABLE",
]

_ANNOTATION = "graphopt.kernel"  # the key _cpu_schedules' rules look for
_KINDS = ("conv2d_nhwc", "depthwise_conv2d_nhwc", "grouped_conv2d_nhwc")
_OHWIO = re.compile(r"^OHWI(\d+)o$")


# --- 1. TE computes and their legalization ---------------------------------------------
def _out_size(size: int, pad: int, k: int, stride: int, dil: int) -> int:
    return (size + pad - (k - 1) * dil - 1) // stride + 1


def _pad_nhwc(data: te.Tensor, padding) -> te.Tensor:  # noqa: ANN001
    top, left, bottom, right = (int(p) for p in padding)
    if top == left == bottom == right == 0:
        return data
    return topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0], name="data_pad")


def _geometry(data, weight, strides, padding, dilation) -> tuple:  # noqa: ANN001
    _, ih, iw, _ = (int(d) for d in data.shape)
    _, kh, kw, _, _ = (int(d) for d in weight.shape)
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    oh = _out_size(ih, int(padding[0]) + int(padding[2]), kh, sh, dh)
    ow = _out_size(iw, int(padding[1]) + int(padding[3]), kw, sw, dw)
    return kh, kw, sh, sw, dh, dw, oh, ow


def conv2d_nhwc_te(data, weight, strides, padding, dilation, out_dtype: str):  # noqa: ANN001, ANN201
    """Dense NHWC conv with OHWI[b]o weights (reductions kh, kw, ci; ci innermost):

    out[n, y, x, c] = sum pad[n, y*s+kh*d, x*s+kw*d, ci] * w[c // b, kh, kw, ci, c % b]
    """
    n, _, _, cin = (int(d) for d in data.shape)
    co_o, _, _, _, b = (int(d) for d in weight.shape)
    kh, kw, sh, sw, dh, dw, oh, ow = _geometry(data, weight, strides, padding, dilation)
    pad = _pad_nhwc(data, padding)
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rc = te.reduce_axis((0, cin), "rc")
    return te.compute(
        (n, oh, ow, co_o * b),
        lambda i, y, x, c: te.sum(
            pad[i, y * sh + rh * dh, x * sw + rw * dw, rc].astype(out_dtype)
            * weight[c // b, rh, rw, rc, c % b].astype(out_dtype),
            axis=[rh, rw, rc],
        ),
        name="conv2d_nhwc",
        attrs={_ANNOTATION: "conv2d_nhwc"},
    )


def depthwise_conv2d_nhwc_te(data, weight, strides, padding, dilation, out_dtype: str):  # noqa: ANN001, ANN201
    """out[n, y, x, c] = sum pad[n, y*s+kh*d, x*s+kw*d, c] * w[c // b, kh, kw, 0, c % b]."""
    n, _, _, channels = (int(d) for d in data.shape)
    b = int(weight.shape[4])
    kh, kw, sh, sw, dh, dw, oh, ow = _geometry(data, weight, strides, padding, dilation)
    pad = _pad_nhwc(data, padding)
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    return te.compute(
        (n, oh, ow, channels),
        lambda i, y, x, c: te.sum(
            pad[i, y * sh + rh * dh, x * sw + rw * dw, c].astype(out_dtype)
            * weight[c // b, rh, rw, 0, c % b].astype(out_dtype),
            axis=[rh, rw],
        ),
        name="depthwise_conv2d_nhwc",
        attrs={_ANNOTATION: "depthwise_conv2d_nhwc"},
    )


def grouped_conv2d_nhwc_te(data, weight, strides, padding, dilation, out_dtype: str, groups: int):  # noqa: ANN001, ANN201, E501, PLR0913
    """Grouped NHWC conv, OHWI[b]o weights with b dividing the output channels per group
    (og), I the input channels per group (ig):

    out[n, y, x, c] = sum pad[n, y*s+kh*d, x*s+kw*d, c // og * ig + ci]
                          * w[c // b, kh, kw, ci, c % b]
    """
    n, _, _, _ = (int(d) for d in data.shape)
    co_o, _, _, ig, b = (int(d) for d in weight.shape)
    og = co_o * b // groups
    kh, kw, sh, sw, dh, dw, oh, ow = _geometry(data, weight, strides, padding, dilation)
    pad = _pad_nhwc(data, padding)
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rc = te.reduce_axis((0, ig), "rc")
    return te.compute(
        (n, oh, ow, co_o * b),
        lambda i, y, x, c: te.sum(
            pad[i, y * sh + rh * dh, x * sw + rw * dw, c // og * ig + rc].astype(out_dtype)
            * weight[c // b, rh, rw, rc, c % b].astype(out_dtype),
            axis=[rh, rw, rc],
        ),
        name="grouped_conv2d_nhwc",
        attrs={_ANNOTATION: "grouped_conv2d_nhwc"},
    )


def _legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    a = call.attrs
    blocked = _OHWIO.match(str(a.kernel_layout))
    if not (str(a.data_layout) == str(a.out_layout) == "NHWC" and blocked):
        return cpu.LEGALIZE["relax.nn.conv2d"](bb, call)
    groups = int(a.groups)
    if groups == 1:
        return cpu.call_conv_te(bb, call, conv2d_nhwc_te, "conv2d_nhwc")
    if groups == int(call.args[0].ty.shape.values[3]) and int(call.args[1].ty.shape.values[3]) == 1:
        return cpu.call_conv_te(bb, call, depthwise_conv2d_nhwc_te, "depthwise_conv2d_nhwc")

    def grouped(data, weight, strides, padding, dilation, out_dtype):  # noqa: ANN001, ANN202, PLR0913
        return grouped_conv2d_nhwc_te(data, weight, strides, padding, dilation, out_dtype, groups)

    return cpu.call_conv_te(bb, call, grouped, "grouped_conv2d_nhwc")


LEGALIZE = {"relax.nn.conv2d": _legalize_conv2d}


# --- 2. the schedule rule ----------------------------------------------------------------
def _channel_block(sch: s_tir.Schedule, conv) -> int | None:  # noqa: ANN001
    """The weight's channel block b: the last extent of the 5-D buffer the conv reads."""
    for region in sch.get(conv).reads:
        shape = region.source.shape
        if len(shape) == 5 and isinstance(shape[4], tirx.IntImm):
            return int(shape[4])
    return None


def rule_conv2d_nhwc(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """NHWC conv (dense or depthwise) with OHWI[b]o weights, plus its fused epilogue.

    Why: conv is >90% of a CNN's time. Tile: ``reg_n`` pixels x one channel block in
    registers over the whole reduction (see the module docstring); a dense conv's
    padding stays a separate parallel pass (inlined, its bounds check would sit in the
    innermost loop); a depthwise conv is memory bound, so its padding is inlined (one
    pass less; the check is per pixel, not per lane, so the loads still vectorize), and
    so is the padding of a thin input (an RGB image: a pass of its own over 3 channels
    cannot vectorize, and its reduction over 3 channels is short anyway).
    """
    return schedule_conv2d_nhwc(s_tir.Schedule(func), target)


def schedule_conv2d_nhwc(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: cpu.Decisions = cpu.DEFAULTS,
    plan: cpu.Plan = cpu.DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """:func:`rule_conv2d_nhwc` on ``sch``, the register tile from ``decisions`` and the
    structure from ``plan`` (see :class:`graphopt.targets._cpu_schedules.Plan`). The
    channel block is the weight layout's (fixed before scheduling)."""
    anchors = [b for b in cpu._root_blocks(sch) if cpu._annotation(sch, b) in _KINDS]
    if len(anchors) != 1:
        return None
    conv = anchors[0]
    block = _channel_block(sch, conv)
    if block is None:
        return None
    lanes = cpu.vector_lanes(target)
    depthwise = cpu._annotation(sch, conv) == "depthwise_conv2d_nhwc"
    pads = [b for b in sch.get_producers(conv) if "pad" in sch.get(b).name_hint]
    thin = any(int(sch.get(p).writes[0].source.shape[-1]) < lanes for p in pads)
    keep = [conv] if depthwise or thin else [conv, *pads]
    cpu._inline_spatial_intermediates(sch, keep=keep)
    out = sch.cache_write(conv, 0, "local")
    cpu._inline_epilogue(sch, out)
    others = cpu._other_root_blocks(sch, [conv, out])
    loops = sch.get_loops(out)
    if len(loops) != 4:
        return None
    n, y, x, c = loops
    vectors = -(-block // lanes)  # accumulator registers per pixel
    most = cpu.max_reg_n(target) // vectors
    height, width = cpu._extent(sch, y), cpu._extent(sch, x)
    rows = 1
    if plan.rows:  # the largest row tile from 2 to 4 (none: the plan declines)
        rows = max((r for r in range(2, min(most, 4) + 1) if height % r == 0), default=1)
        if rows == 1:
            return None
    reg_n = cpu._pick_reg_n(width, most // rows)
    co, ci = sch.split(c, [None, block])
    if plan.rows:
        yo, yi = sch.split(y, [None, decisions.factor(sch, height, rows, 4)])
    xo, xi = sch.split(x, [None, decisions.factor(sch, width, reg_n, max(most // rows, 1))])
    if plan.rows:
        sch.reorder(n, co, yo, xo, yi, xi, ci)
        y = yo
    else:
        sch.reorder(n, co, y, xo, xi, ci)
    sch.parallel(sch.fuse(n, co, y) if plan.parallel_loops == 3 else sch.fuse(n, co))
    sch.vectorize(ci)
    sch.compute_at(conv, xo)
    if plan.rows:
        sch.unroll(yi)
    sch.unroll(xi)
    cpu._split_reduction_into_tile(sch, conv, xo, plan)
    return cpu._schedule_others(sch, others, lanes)


def _family_rule(kind: str):  # noqa: ANN202
    """:func:`rule_conv2d_nhwc` for the kernels whose conv is ``kind`` only."""

    def rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        kinds = [cpu._annotation(sch, b) for b in cpu._root_blocks(sch)]
        if kind not in kinds:
            return None
        return rule_conv2d_nhwc(func, target)

    return rule


def _family_space(kind: str):  # noqa: ANN202
    """:func:`schedule_conv2d_nhwc` for the kernels ``_family_rule(kind)`` takes."""

    def schedule(sch, target, decisions=cpu.DEFAULTS, plan=cpu.DEFAULT_PLAN):  # noqa: ANN001, ANN202
        if kind not in [cpu._annotation(sch, b) for b in cpu._root_blocks(sch)]:
            return None
        return schedule_conv2d_nhwc(sch, target, decisions, plan)

    return schedule


RULE = ("conv2d_nhwc", rule_conv2d_nhwc)  # every family (the one rule of earlier versions)
RULES = [
    ("conv2d_nhwc", _family_rule("conv2d_nhwc")),
    ("depthwise_nhwc", _family_rule("depthwise_conv2d_nhwc")),
    ("grouped_nhwc", _family_rule("grouped_conv2d_nhwc")),
]
# Their search spaces (see ``_cpu_schedules.TUNABLE``).
TUNABLE = {
    "conv2d_nhwc": (_family_space("conv2d_nhwc"), cpu.CONV_PLANS),
    "depthwise_nhwc": (_family_space("depthwise_conv2d_nhwc"), cpu.CONV_PLANS),
    "grouped_nhwc": (_family_space("grouped_conv2d_nhwc"), cpu.CONV_PLANS),
}
