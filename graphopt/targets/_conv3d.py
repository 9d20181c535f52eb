"""Packed 3-D convs on CPUs (x86 AVX-512/AVX2, ARM NEON): video CNNs (R3D, C3D, I3D).

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
    "DEPTHWISE",
    "FAMILIES",
    "GROUPED",
    "RULE",
    "RULES",
    "TUNABLE",
    "WRAP_LEGALIZE",
    "blocks",
    "conv3d_ncdhwc_te",
    "legalize_conv3d",
    "schedule_conv3d_ncdhwc",
]

RULE = "conv3d_ncdhwc"  # dense (and the name of the family's rules' anchor stage)
DEPTHWISE = "depthwise3d_ncdhwc"
GROUPED = "grouped3d_ncdhwc"
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


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pack_weight(w: te.Tensor, bi: int, bo: int) -> te.Tensor:
    """OIDHW -> OIDHW[bi]i[bo]o in float32, zero where the blocks pad the channels."""
    cout, cin, kd, kh, kw = (int(d) for d in w.shape)
    exact = cout % bo == 0 and cin % bi == 0

    def value(o, i, z, y, x, ii, oo):  # noqa: ANN001, ANN202, PLR0913
        oc, ic = o * bo + oo, i * bi + ii
        value = w[oc, ic, z, y, x].astype("float32")
        if exact:
            return value
        inside = tirx.all(oc < cout, ic < cin)
        return tirx.if_then_else(inside, value, tirx.const(0, "float32"))

    shape = (_ceil_div(cout, bo), _ceil_div(cin, bi), kd, kh, kw, bi, bo)
    return te.compute(shape, value, name="weight_pack3d")


def _pack_data(data: te.Tensor, bi: int, padding) -> te.Tensor:  # noqa: ANN001
    """NCDHW -> NCDHW[bi]c in float32, zero-padded: ``padding`` (front, top, left, back, bottom,
    right) and the channels up to a multiple of ``bi``."""
    n, cin, d, h, w = (int(v) for v in data.shape)
    front, top, left, back, bottom, right = (int(p) for p in padding)
    shape = (n, _ceil_div(cin, bi), d + front + back, h + top + bottom, w + left + right, bi)
    exact = cin % bi == 0 and not any(int(p) for p in padding)

    def value(b, c, z, y, x, i):  # noqa: ANN001, ANN202, PLR0913
        ch, zz, yy, xx = c * bi + i, z - front, y - top, x - left
        value = data[b, ch, zz, yy, xx].astype("float32")
        if exact:
            return value
        inside = [zz >= 0, zz < d, yy >= 0, yy < h, xx >= 0, xx < w]
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
    pad = _pack_data(data, bo if rule == DEPTHWISE else bi, padding)
    od = (int(pad.shape[2]) - (kd - 1) * dd - 1) // sd + 1
    oh = (int(pad.shape[3]) - (kh - 1) * dh - 1) // sh + 1
    ow = (int(pad.shape[4]) - (kw - 1) * dw - 1) // sw + 1
    rd = te.reduce_axis((0, kd), "rd")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")

    def window_of(b, c, z, y, x, i):  # noqa: ANN001, ANN202, PLR0913
        return pad[b, c, z * sd + rd * dd, y * sh + rh * dh, x * sw + rw * dw, i]

    if rule == DEPTHWISE:
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
    return te.compute(
        (n, cout, od, oh, ow),
        lambda b, c, z, y, x: conv[b, c // bo, z, y, x, c % bo],
        name="conv3d_unpack",
    )


def legalize_conv3d(fallback):  # noqa: ANN001, ANN201
    """A conv3d legalization: the convs :func:`_takes` accepts through the packed kernel
    (weights packed by a kernel of their own, which FoldConstant runs at compile time),
    any other through ``fallback``."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        target = tvm.target.Target.current(allow_none=True)
        lanes = cpu.vector_lanes(target) if target is not None else 8
        family = _family(call, lanes)
        if family is None:
            return fallback(bb, call)
        rule, bi, bo = family
        a = call.attrs
        weight = bb.emit_te(_pack_weight, call.args[1], bi if rule != DEPTHWISE else 1, bo,
                            primfunc_name_hint="weight_pack3d")  # fmt: skip
        window = ([int(s) for s in a.strides], [int(p) for p in a.padding],
                  [int(d) for d in a.dilation])  # fmt: skip
        cout, groups = _static(call.args[1])[0], int(a.groups)

        def compute(data: te.Tensor, packed: te.Tensor) -> te.Tensor:
            return conv3d_ncdhwc_te(data, packed, window, cout, (rule, groups))

        return bb.call_te(compute, call.args[0], weight, primfunc_name_hint=rule)

    return legalize


# --- the schedule rule ------------------------------------------------------------------------
FAMILIES = (RULE, DEPTHWISE, GROUPED)


def _anchor(sch: s_tir.Schedule, family: str | None = None):  # noqa: ANN202
    """The one packed 3-D conv stage of ``sch`` (of ``family`` if given), or None."""
    found = [b for b in cpu._root_blocks(sch) if cpu._annotation(sch, b) in FAMILIES]
    if len(found) != 1 or family not in (None, cpu._annotation(sch, found[0])):
        return None
    return found[0]


def _inline_tail(sch: s_tir.Schedule, block) -> None:  # noqa: ANN001
    """Fold the unpack and every elementwise consumer chain into ``block`` (the register
    tile's write-back), whatever their shape: reverse_compute_inline refuses what it
    cannot express (a broadcast that reads one value for many outputs stays a loop nest)."""
    progress = True
    while progress:
        progress = False
        for consumer in sch.get_consumers(block):
            try:
                sch.reverse_compute_inline(consumer)
            except s_tir.schedule.ScheduleError:
                continue
            progress = True
            break


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
    _inline_spatial_intermediates(sch, keep=[conv, *packs])
    out = sch.cache_write(conv, 0, "local")
    _inline_tail(sch, out)
    others = _other_root_blocks(sch, [conv, out])
    loops = sch.get_loops(out)
    if len(loops) != 6:
        return None
    n, co, z, y, x, o = loops
    tile = cpu._register_tile(sch, (y, x), decisions, plan)
    if tile is None:
        return None
    xo, xi, tile_loops = tile
    if plan.rows:
        yo, yi = tile_loops
        sch.reorder(yo, xo, yi, xi)
        y = yo
    outer = sch.fuse(n, co, z, y) if plan.parallel_loops == 3 else sch.fuse(n, co)
    sch.parallel(outer)
    sch.vectorize(o)
    sch.compute_at(conv, xo)
    if plan.rows:
        sch.unroll(tile_loops[1])
    sch.unroll(xi)
    cpu._split_reduction_into_tile(sch, conv, xo)
    return _schedule_others(sch, others, lanes)


# The legalization graphopt.targets._cpu layers over the previous one.
WRAP_LEGALIZE = {"relax.nn.conv3d": legalize_conv3d}

# Ordered, first fit wins; each takes only kernels with its own packed 3-D conv stage.
RULES = [(family, _rule(family)) for family in FAMILIES]

# Their search spaces for ``graphopt tune`` (as ``_cpu_schedules.TUNABLE``).
_PLANS = (cpu.DEFAULT_PLAN, cpu.Plan(parallel_loops=2), cpu.Plan(rows=True))
TUNABLE = {family: (_space(family), _PLANS) for family in FAMILIES}
