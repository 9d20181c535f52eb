"""Float32 GEMM with a packed constant weight on CPUs (x86 and ARM): ``x @ w`` where ``w``
is a constant [K, N] and ``x`` has rows to tile (an RNN's input projection over all time
steps, a ConvNeXt or transformer MLP over all pixels or tokens).

Why not the reduction rule's register tile over ``w`` as it is: each step of the
reduction loop reads a row segment of ``w``, N x 4 bytes after the previous one. At N =
1024 that stride is 4 KiB, so every row falls into the same L1 set and the tile's weight
reads miss L1; and with the row blocks outermost, each one streams the whole weight from
L3 once it is larger than the core's L2 (512 KiB on a Zen 3). The LSTM classifier's input
projections ([512, 256] x [256, 1024]) ran at 35-55 GFLOP/s on two Zen 3 cores that way.

What this module does (as BLIS and oneDNN do, at compile time):

1. ``WRAP_LEGALIZE``: a float32 matmul [..., M, K] x [K, N] whose weight is a constant
   (possibly behind folded ops), with at least ``_MIN_ROWS`` rows, becomes a kernel of
   its own that lays the weight out as ``wp[N/nb, K, nb]`` (FoldConstant runs it once, at
   compile time) and the product ``out[..., m, n] = sum_k x[..., m, k] * wp[n / nb, k,
   n % nb]`` (``matmul_packed``). Each column block's K x nb panel is then contiguous. An
   N that is not whole blocks (a 37-class head) is padded with zero columns, and the
   product's first N columns are the result. A GEMV (fewer rows) takes the same path
   when its weight is ``_GEMV_STREAM_BYTES`` or more (see the end).
2. ``RULES``: the product's schedule::

       parallel for (panel, row block, column block in the panel):    # one launch
           acc[rows, nb] = 0                                           # registers
           for k in K: acc[r, :] += x[m + r, k] * wp[block, k, :]      # r unrolled
           out[m:m+rows, block] = acc (+ the fused epilogue: bias, activation)

   A panel is as many column blocks as fit ``_PANEL_BYTES`` of weight (64 KiB: a share
   of any L2), so a thread runs every row block of its panel while the panel stays in
   its L2; threads get whole panels where there are enough of them.

The tile: ``nb`` is two SIMD vectors (16 floats on AVX2, 32 on AVX-512, 8 on NEON) or
one, and ``rows`` the largest divisor of M that keeps ``rows x nb / lanes`` accumulators
within the register file less the spare ones (12 of AVX2's 16 registers); between the two
widths the tile with more accumulators, the wider on a tie. Measured on the LSTM
projection above (Zen 3, 2 threads, the kernel alone): 4 rows x 16 floats with 64 KiB
panels 2.4-2.9 ms (93-113 GFLOP/s) against 5-8 ms for the reduction rule's tile.

A GEMV with a large weight (a classifier head: [1, 2048] x [2048, 1000], 8 MB) reads its
weight once per call, from memory inside a model: what counts is that the read streams.
The reduction rule vectorizes N across rows N x 4 bytes apart, one vector of each row at
a time, and a head of 1000 classes (not whole 16-float vectors) got 8-float halves: in
ResNet-50 on a 2-core Xeon the head ran 0.66 ms in the model where onnxruntime's took
0.34. Packed, each thread streams its panels front to back. Paired against the build
without it (2-core Xeon, AVX-512, separately loaded builds, onnxruntime in the rounds):
VGG-11 1.28x faster (its 411 MB, 67 MB and 16 MB heads), MobileNetV3-large 1.04x,
ResNet-50 1.02x, MobileNetV2 1.005x.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te, tirx

from graphopt.targets import _cpu_schedules as cpu
from graphopt.targets._bf16 import static_shape

__all__ = ["RULE", "WRAP_LEGALIZE", "RULES", "TUNABLE", "plan_tile", "matmul_packed_te"]

RULE = "matmul_packed"
# Rows (the product of x's dims but K) from which a matmul is packed: below it the weight
# is read about once per call anyway (a GEMV, a batch-1 head), and for a weight that stays
# cached the reduction rule's widened GEMV row is the better tile.
_MIN_ROWS = 16
# Weight bytes from which a GEMV (fewer rows) is packed too: past a core's cache the
# weight comes from memory each call, and the packed panels stream it (the dense convs'
# threshold for streaming their weights, one figure for both).
_GEMV_STREAM_BYTES = cpu._STREAM_WEIGHT_BYTES
# Weight bytes of one panel (the column blocks a thread runs every row block over).
_PANEL_BYTES = 64 << 10
# Ops between a constant and the weight that FoldConstant folds (their first input the
# weight); deeper chains are not followed.
_MAX_DEPTH = 8


def plan_tile(rows: int, n: int, target: tvm.target.Target) -> tuple[int, int] | None:
    """``(nb, tile rows)`` of the packed product for ``rows`` x ``n`` outputs, or None
    where no whole vector divides ``n``."""
    lanes = cpu.vector_lanes(target)
    most = cpu.max_reg_n(target)
    best = None
    for vectors in (2, 1):
        nb = lanes * vectors
        if n % nb:
            continue
        r = cpu._pick_reg_n(rows, most // vectors)
        key = (r * vectors, nb)
        if best is None or key > best[0]:
            best = (key, (nb, r))
    return None if best is None else best[1]


def _pack_weight(w: te.Tensor, nb: int) -> te.Tensor:
    """w [K, N] -> [ceil(N/nb), K, nb]: each column block's panel contiguous, the columns
    past N zero."""
    k, n = (int(d) for d in w.shape)

    def pack(j, kk, c):  # noqa: ANN001, ANN202
        col = j * nb + c
        return w[kk, col] if n % nb == 0 else te.if_then_else(col < n, w[kk, col], 0.0)

    return te.compute((-(-n // nb), k, nb), pack, name="matmul_weight_pack")


def _first_columns(y: te.Tensor, n: int) -> te.Tensor:
    """y [..., N'] -> [..., n]: the product's real columns (N' padded to whole blocks)."""
    return te.compute((*y.shape[:-1], n), lambda *idx: y[idx], name="matmul_packed_columns")


def matmul_packed_te(x: te.Tensor, wp: te.Tensor) -> te.Tensor:
    """out[..., m, n] = sum_k x[..., m, k] * wp[n / nb, k, n % nb] (x's leading dims are
    batch dims sharing the weight)."""
    *lead, k = (int(d) for d in x.shape)
    blocks, _, nb = (int(d) for d in wp.shape)
    rk = te.reduce_axis((0, k), "rk")
    return te.compute(
        (*lead, blocks * nb),
        lambda *idx: te.sum(x[(*idx[:-1], rk)] * wp[idx[-1] // nb, rk, idx[-1] % nb], axis=[rk]),
        name=RULE,
        attrs={cpu._ANNOTATION: RULE},
    )


def _is_constant(bb: relax.BlockBuilder, expr, depth: int = 0) -> bool:  # noqa: ANN001
    """A constant, or a value computed from constants only (a legalized transpose or
    reshape of a weight: what FoldConstant folds after LegalizeOps)."""
    if isinstance(expr, tvm.ir.expr.Constant | relax.ShapeExpr):
        return True
    if depth > _MAX_DEPTH:
        return False
    if isinstance(expr, relax.Var):
        bound = bb.lookup_binding(expr)
        return bound is not None and _is_constant(bb, bound, depth + 1)
    if isinstance(expr, relax.Tuple):
        return all(_is_constant(bb, f, depth + 1) for f in expr.fields)
    if isinstance(expr, relax.Call):
        args = list(expr.args)
        if isinstance(expr.op, relax.GlobalVar):
            return False
        if expr.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            args = [args[1]]  # (func, args tuple[, shape])
        return bool(args) and all(_is_constant(bb, a, depth + 1) for a in args)
    return False


def legalize_matmul(fallback):  # noqa: ANN001, ANN201
    """A matmul legalization: float32 [..., M, K] x constant [K, N] with enough rows (or
    a weight too large to stay cached) through the packed product
    (:mod:`graphopt.targets._gemm`); any other through ``fallback``."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        x, w = call.args[0], call.args[1]
        xs, ws = static_shape(x), static_shape(w)
        target = tvm.target.Target.current(allow_none=True)
        if (
            target is None
            or xs is None
            or ws is None
            or len(xs) < 2
            or len(ws) != 2
            or str(x.ty.dtype) != "float32"
            or str(w.ty.dtype) != "float32"
            or str(call.attrs.out_dtype) not in ("", "void", "None", "float32")
        ):
            return fallback(bb, call)
        rows = 1
        for d in xs[:-1]:
            rows *= d
        lanes = cpu.vector_lanes(target)
        n = ws[1]
        plan = plan_tile(rows, -(-n // lanes) * lanes, target)
        streams = ws[0] * ws[1] * 4 >= _GEMV_STREAM_BYTES
        if (rows < _MIN_ROWS and not streams) or plan is None or not _is_constant(bb, w):
            return fallback(bb, call)
        nb, _ = plan
        packed = bb.emit_te(_pack_weight, w, nb, primfunc_name_hint="matmul_weight_pack")
        if n % nb == 0:
            return bb.call_te(matmul_packed_te, x, packed, primfunc_name_hint=RULE)
        # N not whole blocks (a 37-class head): the product over the padded columns, then
        # its first N (fused into the same kernel; the epilogue runs as a pass of its own).
        padded = bb.emit_te(matmul_packed_te, x, packed, primfunc_name_hint=RULE)
        return bb.call_te(_first_columns, padded, n, primfunc_name_hint="matmul_packed_columns")

    return legalize


def rule_matmul_packed(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """The packed product (and its fused epilogue): panels of the packed weight, row
    blocks and column blocks in one parallel loop, a rows x nb register tile inside."""
    return schedule_matmul_packed(s_tir.Schedule(func), target)


def schedule_matmul_packed(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: cpu.Decisions = cpu.DEFAULTS,
    plan: cpu.Plan = cpu.DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """:func:`rule_matmul_packed` on ``sch`` (None: not a packed product); the tile's rows
    and the panel's column blocks from ``decisions``. ``plan`` is accepted for the tuning
    space's signature; this rule has one structure."""
    del plan
    reductions = [b for b in cpu._root_blocks(sch) if "R" in cpu._iter_kinds(sch, b)]
    if len(reductions) != 1 or cpu._annotation(sch, reductions[0]) != RULE:
        return None
    (mm,) = reductions
    wp = sch.get(mm).reads[-1].source  # x[..., m, k] * wp[n / nb, k, n % nb]
    if len(wp.shape) != 3:
        return None
    blocks, k, nb = (int(d) for d in wp.shape)
    cpu._inline_spatial_intermediates(sch, keep=[mm])
    out = sch.cache_write(mm, 0, "local")
    cpu._inline_epilogue(sch, out)
    others = cpu._other_root_blocks(sch, [mm, out])
    *lead, m, n = sch.get_loops(out)
    if lead and cpu._extent(sch, m) == 1:
        # x's leading dims are the rows (a time-major [T, 1, K] projection). Only where m
        # is 1: a row tile split from fused rows of several (ConvNeXt's [1, 56, 56, C])
        # has bindings TVM cannot prove affine, and the rule then failed to vectorize.
        m = sch.fuse(*lead, m)
        lead = []
    m_extent = cpu._extent(sch, m)
    tile = plan_tile(m_extent, blocks * nb, target)
    most = cpu.max_reg_n(target) // max(nb // cpu.vector_lanes(target), 1)
    rows = tile[1] if tile is not None and tile[0] == nb else cpu._pick_reg_n(m_extent, most)
    rows = decisions.factor(sch, m_extent, rows, most) if rows > 1 else 1
    per_panel = cpu._pick_reg_n(blocks, max(_PANEL_BYTES // (k * nb * 4), 1))
    per_panel = decisions.factor(sch, blocks, per_panel, blocks) if per_panel > 1 else 1
    no, ni = sch.split(n, [None, nb])
    mo, mi = sch.split(m, [None, rows])
    panel, col = sch.split(no, [None, per_panel])
    sch.reorder(panel, *lead, mo, col, mi, ni)
    outer = sch.fuse(panel, *lead, mo, col)
    if m_extent * blocks * nb * k >= cpu._PARALLEL_MIN * 64:
        sch.parallel(outer)
    sch.vectorize(ni)
    sch.compute_at(mm, outer)
    cpu._split_reduction_into_tile(sch, mm, outer)
    return cpu._schedule_others(sch, others, cpu.vector_lanes(target))


# The legalization graphopt.targets._cpu layers over the fp32 ones (innermost: the bf16
# and fp16 modules see a matmul first).
WRAP_LEGALIZE = {"relax.matmul": legalize_matmul}

# Takes only matmul_packed kernels.
RULES = [(RULE, rule_matmul_packed)]

# For ``graphopt tune`` (graphopt/tuning/_space.py): the tile's rows and the panel width.
TUNABLE = {RULE: (schedule_matmul_packed, (cpu.DEFAULT_PLAN,))}
