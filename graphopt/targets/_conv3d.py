"""Packed 3-D convs on CPUs (x86 AVX-512/AVX2, ARM NEON): video CNNs (R3D, C3D, I3D); and
the 2-D convs the packed-NCHWc layout pass leaves in NCHW, as depth-1 3-D ones.

A ``conv3d`` with float32 sums (float32 operands, or ``precision=bf16|fp16`` ones, which
the packing converts to float32, every product exact) and static shapes (any stride,
padding, dilation) is legalized into one kernel of three stages, so the packed layout
never leaves it and the graph between convs stays NCDHW:

1. ``data_pack``: NCDHW data -> NCDHW[bi]c, padded (spatially, and with zero channels
   up to a multiple of ``bi``) in the same pass;
2. the conv in the packed layout (the anchor, its ``graphopt.kernel`` annotation the
   family's rule name: ``conv3d_ncdhwc`` dense, ``depthwise3d_ncdhwc``,
   ``grouped3d_ncdhwc``), weights ``OIDHW[bi]i[bo]o`` (depthwise ``OIDHW1i[b]o``): a
   separate Relax kernel acting on the constant weight, so FoldConstant packs (and
   zero-pads) it once, at compile time;
3. ``conv3d_unpack``: back to NCDHW (only the real output channels).

Because the kernel's output is NCDHW, FuseOps fuses the conv's elementwise tail (bias
add, the BN scale/shift graphopt's passes fold, ReLU, a residual add) into it, and the
schedule rules write that tail straight from the registers: the unpack and the tail
are inlined into the register tile's write-back (a strided store per lane).

The rule is the 2-D packed rule (``conv2d_nchwc`` in :mod:`graphopt.targets._cpu_schedules`)
one dimension up: a register tile of ``reg_n`` output pixels by one output-channel
block (the SIMD width: 16 with AVX-512, 8 with AVX2, 4 with NEON), the whole reduction
(input channel chunk, kd, kh, kw, input channel lane) inside it, one weight vector load
and ``reg_n`` broadcasts + FMAs per step; the (n, channel chunk, depth, row) loops are
fused and parallel. ``data_pack`` is a parallel, vectorized pass of its own.

Blocks (dense): ``bo`` is the first of (lanes, 8, 4, 2) that divides the output
channels, else the lanes (or the next power of two for fewer channels) with the output
channels padded by zero weights; ``bi`` the same for input channels, except that a thin
input (fewer channels than lanes, as the 3 of an RGB video) is one block of its own.
Depthwise and grouped convs: one block for input and output, the first of (lanes, 8, 4,
2) dividing the channels (of a group); where none does, and for symbolic shapes, the
previous legalization (TOPI's NCDHW conv, a generic rule).

2-D convs: :mod:`graphopt.targets._nchwc` packs a conv2d only where a block of (lanes, 8,
4, 2) divides its channels, and not where only a block of 2 or 4 would vectorize its
output on more than one pixel (and ``layout=nchw`` packs none); ``layout=nhwc`` blocks the
weights only where a block divides the output channels. The rest (RexNet's 27, 61, 151
channels, ShuffleNetV2's 58 and 116, a 21-class segmentation head) used to reach TOPI's
NCHW/NHWC conv and a generic rule. An NCHW/OIHW or NHWC/OHWI conv2d with float32 sums
and static shapes is the kernel above with a depth of 1, reading and writing its own layout (rules
``conv2d_padded`` dense, 1x1 included, ``depthwise_conv2d_padded``,
``grouped_conv2d_padded``). Its blocks (:func:`blocks2d`): the output block is ``lanes``
(zero output channels up to a multiple: one full-width FMA beats narrower ones), or the
next power of two for fewer channels; the input block (broadcast, not vectorized) the
first of (lanes, 8, 4, 2) dividing the input channels, else all of them (no zero
work); depthwise: the output rule for both (zero-padded channels); grouped: a block
dividing the channels of a group, else the old path. Packed NCHW[x]c and blocked NHWC
(OHWI[x]o) convs never reach this legalization (their layouts differ), so their kernels
are unchanged.

Hooked into the CPU pipeline by :mod:`graphopt.targets._cpu` (``WRAP_LEGALIZE``,
``RULES``, ``TUNABLE``).
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te, tirx

from graphopt.targets import _cpu_schedules as cpu
from graphopt.targets._cpu_schedules import (
    _inline_spatial_intermediates,
    _other_root_blocks,
    _schedule_others,
)
from graphopt.targets._nchwc import channel_block

__all__ = [
    "CONV2D",
    "DEPTHWISE",
    "DEPTHWISE2D",
    "FAMILIES",
    "GROUPED",
    "GROUPED2D",
    "RULE",
    "RULES",
    "TUNABLE",
    "WRAP_LEGALIZE",
    "blocks",
    "blocks2d",
    "conv3d_ncdhwc_te",
    "legalize_conv2d",
    "legalize_conv3d",
    "schedule_conv3d_ncdhwc",
]

RULE = "conv3d_ncdhwc"  # dense (and the name of the family's rules' anchor stage)
DEPTHWISE = "depthwise3d_ncdhwc"
GROUPED = "grouped3d_ncdhwc"
# 2-D convs the packed-NCHWc layout pass left in NCHW (channel counts no block divides)
CONV2D = "conv2d_padded"
DEPTHWISE2D = "depthwise_conv2d_padded"
GROUPED2D = "grouped_conv2d_padded"
_DEPTHWISE = (DEPTHWISE, DEPTHWISE2D)
_ANNOTATION = "graphopt.kernel"


# --- legalization ---------------------------------------------------------------------------
def _static(expr) -> list[int] | None:  # noqa: ANN001
    shape = getattr(expr.ty, "shape", None)
    try:
        return [int(d) for d in shape.values]
    except (TypeError, AttributeError):
        return None


def _block(channels: int, lanes: int, thin: bool) -> int:
    """The channel block: one of (lanes, 8, 4, 2) dividing ``channels``; a thin input
    (``thin``, fewer channels than lanes) whole; else ``lanes`` (zero-padded channels)."""
    found = channel_block(channels, lanes)
    if found is not None:
        return found
    if thin and channels < lanes:
        return channels
    return next(b for b in (2, 4, 8, lanes) if b >= min(channels, lanes))


def blocks(cin: int, cout: int, lanes: int) -> tuple[int, int]:
    """(input block, output block) of a packed 3-D conv (see the module docstring)."""
    return _block(cin, lanes, thin=True), _block(cout, lanes, thin=False)


def _float32_sums(call: relax.Call) -> bool:
    """float32 operands, or bf16/fp16 ones (``precision=``) summed into float32: the
    packing stages convert them to float32, where every product is exact."""
    dx, dw, out = (
        str(call.args[0].ty.dtype),
        str(call.args[1].ty.dtype),
        str(call.attrs.out_dtype),
    )
    if dx != dw or dx not in ("float32", "bfloat16", "float16"):
        return False
    return out == "float32" or (dx == "float32" and out in ("", "void", "None"))


def _family(call: relax.Call, lanes: int) -> tuple[str, int, int] | None:
    """(rule, input block, output block) for a conv3d the packed path takes (float32
    NCDHW/OIDHW, static shapes; dense, depthwise, or grouped with a block dividing the
    channels of a group), else None."""
    a = call.attrs
    data, weight = _static(call.args[0]), _static(call.args[1])
    if (
        (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCDHW", "OIDHW", "NCDHW")
        or data is None
        or weight is None
        or len(data) != 5
        or len(weight) != 5
        or not _float32_sums(call)
    ):
        return None
    groups, cin, cout = int(a.groups), data[1], weight[0]
    if groups == 1 and weight[1] == cin:
        return (RULE, *blocks(cin, cout, lanes))
    if groups == cin == cout and weight[1] == 1:
        b = channel_block(cin, lanes)
        return None if b is None else (DEPTHWISE, b, b)
    if cin % groups or cout % groups or weight[1] != cin // groups:
        return None
    b = channel_block(cout // groups, lanes, cin // groups)
    return None if b is None else (GROUPED, b, b)


def _output_block(channels: int, lanes: int) -> int:
    """A 2-D conv's output (vectorized) block: ``lanes`` where the channels fill one (zero
    output channels up to a multiple: one full-width FMA beats two narrower ones), else the
    next power of two."""
    return lanes if channels >= lanes else next(b for b in (2, 4, 8, lanes) if b >= channels)


def blocks2d(cin: int, cout: int, lanes: int) -> tuple[int, int]:
    """(input block, output block) of a packed dense 2-D conv the layout pass left in NCHW:
    the input block is not vectorized (each of its lanes is broadcast), so the first of
    (lanes, 8, 4, 2) dividing the input channels, else all of them (no zero padding)."""
    return channel_block(cin, lanes) or cin, _output_block(cout, lanes)


_LAYOUTS_2D = (("NCHW", "OIHW", "NCHW"), ("NHWC", "OHWI", "NHWC"))


def _family2d(call: relax.Call, lanes: int) -> tuple[str, int, int] | None:
    """(rule, input block, output block) for a conv2d the packed path takes (float32 sums,
    NCHW/OIHW or NHWC/OHWI, static shapes: dense; depthwise, its channels zero-padded to
    a block; grouped with a block dividing the channels of a group), else None."""
    a = call.attrs
    layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout))
    data, weight = _static(call.args[0]), _static(call.args[1])
    if (
        layouts not in _LAYOUTS_2D
        or data is None
        or weight is None
        or len(data) != 4
        or len(weight) != 4
        or not _float32_sums(call)
    ):
        return None
    groups, cout = int(a.groups), weight[0]
    cin, per_group = (data[1], weight[1]) if layouts[0] == "NCHW" else (data[3], weight[3])
    if groups == 1 and per_group == cin:
        return (CONV2D, *blocks2d(cin, cout, lanes))
    if groups == cin == cout and per_group == 1:
        b = _output_block(cin, lanes)
        return (DEPTHWISE2D, b, b)
    if cin % groups or cout % groups or per_group != cin // groups:
        return None
    b = channel_block(cout // groups, lanes, cin // groups)
    return None if b is None else (GROUPED2D, b, b)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _read(t: te.Tensor, layout: str, **axes):  # noqa: ANN003, ANN202
    """``t``'s element at ``axes`` (one index per letter of ``layout``, e.g. "NHWC")."""
    return t[tuple(axes[letter] for letter in layout)]


def _dims(t: te.Tensor, layout: str) -> dict[str, int]:
    """{letter: extent} of ``t`` in ``layout``; a missing depth ("D") is 1."""
    return {"D": 1} | {letter: int(v) for letter, v in zip(layout, t.shape, strict=True)}


def _pack_weight(w: te.Tensor, bi: int, bo: int, layout: str = "OIDHW") -> te.Tensor:
    """OIDHW (OIHW, OHWI: a depth of 1) -> OIDHW[bi]i[bo]o in float32, zero where the
    blocks pad the channels."""
    dims = _dims(w, layout)
    cout, cin, kd, kh, kw = (dims[letter] for letter in "OIDHW")
    exact = cout % bo == 0 and cin % bi == 0

    def value(o, i, z, y, x, ii, oo):  # noqa: ANN001, ANN202, PLR0913
        oc, ic = o * bo + oo, i * bi + ii
        value = _read(w, layout, O=oc, I=ic, D=z, H=y, W=x).astype("float32")
        if exact:
            return value
        inside = tirx.all(oc < cout, ic < cin)
        return tirx.if_then_else(inside, value, tirx.const(0, "float32"))

    shape = (_ceil_div(cout, bo), _ceil_div(cin, bi), kd, kh, kw, bi, bo)
    return te.compute(shape, value, name="weight_pack3d" if "D" in layout else "weight_pack2d")


def _pack_data(data: te.Tensor, bi: int, padding, layout: str = "NCDHW") -> te.Tensor:  # noqa: ANN001
    """NCDHW (NCHW, NHWC: a depth of 1, ``padding`` front and back 0) -> NCDHW[bi]c in
    float32, zero-padded: ``padding`` (front, top, left, back, bottom, right) and the
    channels up to a multiple of ``bi``."""
    flat = "D" not in layout
    dims = _dims(data, layout)
    n, cin, d, h, w = (dims[letter] for letter in "NCDHW")
    front, top, left, back, bottom, right = (int(p) for p in padding)
    shape = (n, _ceil_div(cin, bi), d + front + back, h + top + bottom, w + left + right, bi)
    exact = cin % bi == 0 and not any(int(p) for p in padding)

    def value(b, c, z, y, x, i):  # noqa: ANN001, ANN202, PLR0913
        ch, zz, yy, xx = c * bi + i, z - front, y - top, x - left
        value = _read(data, layout, N=b, C=ch, D=zz, H=yy, W=xx).astype("float32")
        if exact:
            return value
        inside = [yy >= 0, yy < h, xx >= 0, xx < w]
        if not flat:
            inside = [zz >= 0, zz < d, *inside]
        if cin % bi:
            inside.append(ch < cin)
        return tirx.if_then_else(tirx.all(*inside), value, tirx.const(0, "float32"))

    return te.compute(shape, value, name="data_pack")


def conv3d_ncdhwc_te(
    data: te.Tensor,
    weight: te.Tensor,
    window: tuple,
    cout: int,
    kind: tuple[str, int] = (RULE, 1),
    layout: str = "NCDHW",
) -> te.Tensor:
    """NCDHW ``data`` conv a packed ``weight`` (``OIDHW[bi]i[bo]o``), NCDHW out.

    ``window``: (strides, padding, dilation); ``kind``: (rule, groups). Dense and
    grouped (``og``/``ig``: output/input channel blocks per group; dense: one group)::

        conv[n, co, z, y, x, o] = sum pad[n, co // og * ig + ci, z*s+kd*d, y*s+kh*d,
                                          x*s+kw*d, i] * w[co, ci, kd, kh, kw, i, o]

    depthwise: ``conv[n, c, z, y, x, o] = sum pad[n, c, .., o] * w[c, 0, kd, kh, kw, 0, o]``;
    then ``out[n, c, z, y, x] = conv[n, c // bo, z, y, x, c % bo]``.
    """
    strides, padding, dilation = window
    rule, groups = kind
    oc_o, ic_o, kd, kh, kw, bi, bo = (int(v) for v in weight.shape)
    n = int(data.shape[0])
    sd, sh, sw = (int(s) for s in strides)
    dd, dh, dw = (int(v) for v in dilation)
    pad = _pack_data(data, bo if rule in _DEPTHWISE else bi, padding, layout)
    od = (int(pad.shape[2]) - (kd - 1) * dd - 1) // sd + 1
    oh = (int(pad.shape[3]) - (kh - 1) * dh - 1) // sh + 1
    ow = (int(pad.shape[4]) - (kw - 1) * dw - 1) // sw + 1
    rd = te.reduce_axis((0, kd), "rd")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")

    def window_of(b, c, z, y, x, i):  # noqa: ANN001, ANN202, PLR0913
        return pad[b, c, z * sd + rd * dd, y * sh + rh * dh, x * sw + rw * dw, i]

    if rule in _DEPTHWISE:
        conv = te.compute(
            (n, oc_o, od, oh, ow, bo),
            lambda b, c, z, y, x, o: te.sum(
                window_of(b, c, z, y, x, o) * weight[c, 0, rd, rh, rw, 0, o], axis=[rd, rh, rw]
            ),
            name=rule,
            attrs={_ANNOTATION: rule},
        )
    else:
        og = oc_o // groups
        rco = te.reduce_axis((0, ic_o), "rco")
        rci = te.reduce_axis((0, bi), "rci")

        def first(co):  # noqa: ANN001, ANN202 - the group's first input block
            return 0 if groups == 1 else co // og * ic_o

        conv = te.compute(
            (n, oc_o, od, oh, ow, bo),
            lambda b, co, z, y, x, o: te.sum(
                window_of(b, first(co) + rco, z, y, x, rci) * weight[co, rco, rd, rh, rw, rci, o],
                axis=[rco, rd, rh, rw, rci],
            ),
            name=rule,
            attrs={_ANNOTATION: rule},
        )
    if layout == "NCHW":  # a conv2d: depth 1
        return te.compute(
            (n, cout, oh, ow),
            lambda b, c, y, x: conv[b, c // bo, 0, y, x, c % bo],
            name="conv2d_unpack",
        )
    if layout == "NHWC":
        return te.compute(
            (n, oh, ow, cout),
            lambda b, y, x, c: conv[b, c // bo, 0, y, x, c % bo],
            name="conv2d_unpack_nhwc",
        )
    return te.compute(
        (n, cout, od, oh, ow),
        lambda b, c, z, y, x: conv[b, c // bo, z, y, x, c % bo],
        name="conv3d_unpack",
    )


def _legalize(fallback, family_of):  # noqa: ANN001, ANN202
    """A conv legalization: the convs ``family_of(call, lanes)`` names through the packed
    kernel (weights packed by a kernel of their own, which FoldConstant runs at compile
    time), any other through ``fallback``."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        lanes = cpu.legalize_lanes()
        family = family_of(call, lanes)
        if family is None:
            return fallback(bb, call)
        rule, bi, bo = family
        a = call.attrs
        layout, kernel_layout = str(a.data_layout), str(a.kernel_layout)
        flat = "D" not in layout
        pack = "weight_pack2d" if flat else "weight_pack3d"
        weight = bb.emit_te(_pack_weight, call.args[1], bi if rule not in _DEPTHWISE else 1, bo,
                            kernel_layout, primfunc_name_hint=pack)  # fmt: skip
        window = ([int(s) for s in a.strides], [int(p) for p in a.padding],
                  [int(d) for d in a.dilation])  # fmt: skip
        if flat:  # (1, sh, sw), (0, top, left, 0, bottom, right), (1, dh, dw)
            top, left, bottom, right = window[1]
            window = ([1, *window[0]], [0, top, left, 0, bottom, right], [1, *window[2]])
        cout, groups = _static(call.args[1])[0], int(a.groups)

        def compute(data: te.Tensor, packed: te.Tensor) -> te.Tensor:
            return conv3d_ncdhwc_te(data, packed, window, cout, (rule, groups), layout)

        return bb.call_te(compute, call.args[0], weight, primfunc_name_hint=rule)

    return legalize


def legalize_conv3d(fallback):  # noqa: ANN001, ANN201
    """A conv3d legalization: the convs :func:`_family` takes through the packed kernel,
    any other through ``fallback``."""
    return _legalize(fallback, _family)


def legalize_conv2d(fallback):  # noqa: ANN001, ANN201
    """A conv2d legalization: the NCHW convs :func:`_family2d` takes (those the layout pass
    did not pack, or every conv with ``layout=nchw``) through the packed kernel (depth 1),
    any other (packed NCHW[x]c, NHWC) through ``fallback``."""
    return _legalize(fallback, _family2d)


# --- the schedule rule ------------------------------------------------------------------------
FAMILIES = (RULE, DEPTHWISE, GROUPED, CONV2D, DEPTHWISE2D, GROUPED2D)


def _anchor(sch: s_tir.Schedule, family: str | None = None):  # noqa: ANN202
    """The one packed 3-D conv stage of ``sch`` (of ``family`` if given), or None."""
    found = [b for b in cpu._root_blocks(sch) if cpu._annotation(sch, b) in FAMILIES]
    if len(found) != 1 or family not in (None, cpu._annotation(sch, found[0])):
        return None
    return found[0]


def _rule(family: str):  # noqa: ANN202
    """The rule that takes the packed 3-D convs of ``family`` and their fused tails."""

    def rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        return None if _anchor(sch, family) is None else schedule_conv3d_ncdhwc(sch, target)

    rule.__name__ = f"rule_{family}"
    return rule


def _space(family: str):  # noqa: ANN202
    """:func:`schedule_conv3d_ncdhwc` for the kernels ``_rule(family)`` takes."""

    def schedule(sch, target, decisions=cpu.DEFAULTS, plan=cpu.DEFAULT_PLAN):  # noqa: ANN001, ANN202
        if _anchor(sch, family) is None:
            return None
        return schedule_conv3d_ncdhwc(sch, target, decisions, plan)

    return schedule


def schedule_conv3d_ncdhwc(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: cpu.Decisions = cpu.DEFAULTS,
    plan: cpu.Plan = cpu.DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """The packed 3-D conv of ``sch`` (any family) and its fused tail, the register tile's
    write-back; the register tile's pixels (and rows with
    ``plan.rows``) from ``decisions``, the parallel loops from ``plan.parallel_loops``
    (3: n, channel chunk, depth and row fused; 2: n and channel chunk)."""
    conv = _anchor(sch)
    if conv is None:
        return None
    lanes = cpu.vector_lanes(target)
    packs = [b for b in sch.get_producers(conv) if sch.get(b).name_hint.startswith("data_pack")]
    # NCHW out (2-D): the write-back stores along the pixels (contiguous), not the lanes
    pixels_out = any(sch.get(b).name_hint == "conv2d_unpack" for b in sch.get_consumers(conv))
    _inline_spatial_intermediates(sch, keep=[conv, *packs])
    out = sch.cache_write(conv, 0, "local")
    cpu._inline_tail(sch, out)
    others = _other_root_blocks(sch, [conv, out])
    loops = sch.get_loops(out)
    if len(loops) != 6:
        return None
    n, co, z, y, x, o = loops
    tile = cpu._register_tile(sch, (y, x), decisions, plan, cpu.max_reg_n(target))
    if tile is None:
        return None
    xo, xi, tile_loops = tile
    if plan.rows:
        yo, yi = tile_loops
        sch.reorder(yo, xo, yi, xi)
        y = yo
    outer = sch.fuse(n, co, z, y) if plan.parallel_loops == 3 else sch.fuse(n, co)
    sch.parallel(outer)
    if pixels_out:  # one vector store per channel of the tile, from its pixels
        sch.compute_at(conv, xo)
        sch.reorder(o, xi)
        sch.unroll(o)
        sch.vectorize(xi)
    else:
        sch.vectorize(o)
        sch.compute_at(conv, xo)
        sch.unroll(xi)
    if plan.rows:
        sch.unroll(tile_loops[1])
    cpu._split_reduction_into_tile(sch, conv, xo)
    return _schedule_others(sch, others, lanes)


# The legalization graphopt.targets._cpu layers over the previous one.
WRAP_LEGALIZE = {"relax.nn.conv3d": legalize_conv3d, "relax.nn.conv2d": legalize_conv2d}

# Ordered, first fit wins; each takes only kernels with its own packed 3-D conv stage.
RULES = [(family, _rule(family)) for family in FAMILIES]

# Their search spaces for ``graphopt tune`` (as ``_cpu_schedules.TUNABLE``).
_PLANS = (cpu.DEFAULT_PLAN, cpu.Plan(parallel_loops=2), cpu.Plan(rows=True))
TUNABLE = {family: (_space(family), _PLANS) for family in FAMILIES}
