"""x86 bf16 kernels on the hardware: AVX512-BF16 ``vdpbf16ps`` (AMX tiles: :mod:`._amx`).

``vdpbf16ps acc, a, b`` adds, for each of 16 float32 lanes ``i``,
``a[2i] * b[2i] + a[2i+1] * b[2i+1]`` (bf16 products, float32 sums) to ``acc[i]``. A
packed conv and a matmul become that instruction when the reduction's innermost axis is
a *pair* of input channels and the output channel block (16 lanes) sits just outside it:

- weights ``OIHW[bi]i[16]o`` are re-laid out as ``OIHW[bi/2]i[16]o[2]i`` (the int8 VNNI
  layout ``OIHW4i16o4i`` of TVM's x86 ``dot_16x4_vnni``, with pairs instead of quads);
  the relayout acts on a constant, so FoldConstant does it once, at compile time;
- the activation pair ``data[..., 2k:2k+2]`` (32 bits) is broadcast to all 16 lanes.

``DOT_16x2_BF16`` is the tensor intrinsic (description: 16 lanes x 2 products; body: one
``vdpbf16ps``; the accumulator a ``local`` buffer, as the rules keep it). TVM's bf16
support lowers bfloat16 arithmetic to float32 and its storage
to uint16 before LLVM, so the LLVM intrinsic (typed ``<32 x bfloat>``) cannot be called
directly from TIR; the body instead calls a 5-line LLVM IR function (``_DPBF16PS_LL``)
that bitcasts ``<16 x i32>`` to ``<32 x bfloat>``. It is linked into the kernel with the
``pragma_import_llvm`` annotation and inlined by LLVM, leaving one ``vdpbf16ps``. The
broadcast pair is its last operand, the one x86 lets be a memory broadcast (``{1to16}``),
so LLVM folds the load into the instruction instead of a separate ``vbroadcastss``
(the products are symmetric, so the order changes no result).

Hooked into the CPU pipeline by :mod:`graphopt.targets._cpu`: ``legalize_conv2d`` and
``legalize_matmul`` wrap the existing legalizations (bf16 operands on a CPU with
avx512bf16 take the paths here, everything else the old ones); ``RULES`` go first in the
schedule phase. Rule names: ``conv2d_nchwc_bf16``, ``matmul_bf16``.

``TUNABLE`` offers both rules to ``graphopt tune`` (graphopt/tuning/_space.py) the way
the fp32 rules are offered: ``schedule_conv2d_nchwc_bf16`` and ``schedule_matmul_bf16``
take their numeric choices from a ``Decisions`` (the conv's register tile: pixels up to
24 accumulators, rows with a row plan; the matmul's output blocks in registers, up to 8,
and rows) and their structure from a plan (the conv: the fp32 ``CONV_PLANS``; the matmul:
:class:`MatmulPlan`); with the defaults they are the rules. Every point keeps the
vdpbf16ps tensorization.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from graphopt.targets import _cpu_schedules as cpu
from graphopt.targets._cpu_schedules import (
    _inline_epilogue,
    _inline_spatial_intermediates,
    _other_root_blocks,
    _schedule_others,
)

__all__ = [
    "DOT_16x2_BF16",
    "MATMUL_PLANS",
    "MatmulPlan",
    "RULES",
    "TUNABLE",
    "WRAP_LEGALIZE",
    "has_avx512_bf16",
    "pair_matrix",
    "paired_matmul_te",
    "static_shape",
    "legalize_conv2d",
    "legalize_matmul",
    "schedule_conv2d_nchwc_bf16",
    "schedule_matmul_bf16",
]

_ANNOTATION = "graphopt.kernel"
_LANES = 16  # float32 lanes of one zmm register: the output channel block
_MAX_REG_N = 24  # output pixels per register tile (accumulators; 32 zmm registers)
_MAX_N_TILE = 8  # matmul: 16-wide output blocks kept in registers at once
_NCHWC = re.compile(r"^NCHW(\d+)c$")
_OIHWIO = re.compile(r"^OIHW(\d+)i(\d+)o$")

_DPBF16PS_LL = """
define internal <16 x float> @graphopt_dpbf16ps(<16 x float> %c, <16 x i32> %a, <16 x i32> %b)
    alwaysinline {
  %a1 = bitcast <16 x i32> %a to <32 x bfloat>
  %b1 = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c,
                                                            <32 x bfloat> %b1, <32 x bfloat> %a1)
  ret <16 x float> %r
}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""


# --- the tensor intrinsic -----------------------------------------------------------------
@T.prim_func(s_tir=True)
def _dot_16x2_desc(
    A: T.Buffer((2,), "bfloat16", offset_factor=1),
    B: T.Buffer((16, 2), "bfloat16", offset_factor=1),
    C: T.Buffer((16,), "float32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "float32") * T.cast(B[vi, vk], "float32")


@T.prim_func(s_tir=True)
def _dot_16x2_vdpbf16ps(
    A: T.Buffer((2,), "bfloat16", offset_factor=1),
    B: T.Buffer((16, 2), "bfloat16", offset_factor=1),
    C: T.Buffer((16,), "float32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        # int16 views: bf16 values would be widened to float32 by TVM's bf16 legalization
        a16 = T.decl_buffer((2,), "int16", data=A.data, elem_offset=A.elem_offset)
        b16 = T.decl_buffer((32,), "int16", data=B.data, elem_offset=B.elem_offset)
        pair = T.reinterpret(a16.vload([0], "int16x2"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_pure_extern(
            "float32x16",
            "graphopt_dpbf16ps",
            C.vload([0], dtype="float32x16"),
            T.broadcast(pair, 16),
            T.reinterpret(b16.vload([0], dtype="int16x32"), dtype="int32x16"),
        )


DOT_16x2_BF16 = "graphopt_dot_16x2_bf16_vdpbf16ps"
TensorIntrin.register(DOT_16x2_BF16, _dot_16x2_desc, _dot_16x2_vdpbf16ps, override=True)


def has_avx512_bf16(target: tvm.target.Target | None) -> bool:
    """Whether LLVM may emit vdpbf16ps for ``target`` (x86 with avx512bf16)."""
    if target is None or target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    return "avx512bf16" in {str(f) for f in codegen.llvm_get_cpu_features(target)}


# --- legalization: the bf16 computes ------------------------------------------------------
def _pair_weight(w: te.Tensor) -> te.Tensor:
    """OIHW[bi]i[bo]o -> OIHW[ceil(bi/2)]i[bo]o[2]i: the two channels of a pair adjacent;
    an odd block (the 3-channel stem) gets a zero channel."""
    o, i, kh, kw, bi, bo = (int(d) for d in w.shape)
    zero = tvm.tirx.const(0, w.dtype)
    return te.compute(
        (o, i, kh, kw, (bi + 1) // 2, bo, 2),
        lambda a, b, c, d, k, oc, j: tvm.tirx.if_then_else(
            2 * k + j < bi, w[a, b, c, d, tvm.tirx.min(2 * k + j, bi - 1), oc], zero
        ),
        name="weight_pairs",
    )


def conv2d_nchwc_bf16_te(data, weight, strides, padding, dilation):  # noqa: ANN001, ANN201
    """Packed conv over bf16 pairs, float32 sums:

    out[n, oc, y, x, c] = sum data[n, ic, y*s+kh*d, x*s+kw*d, 2k+j] * w[oc, ic, kh, kw, k, c, j]
    """
    n, ic_o, ih, iw, bi = (int(d) for d in data.shape)
    oc_o, _, kh, kw, pairs, bo, _ = (int(d) for d in weight.shape)
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    top, left, bottom, right = (int(p) for p in padding)
    oh = (ih + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (iw + left + right - (kw - 1) * dw - 1) // sw + 1
    pad = data
    if top or left or bottom or right or bi % 2:  # spatial padding, a zero channel to pair
        pad = te.compute(
            (n, ic_o, ih + top + bottom, iw + left + right, bi + bi % 2),
            lambda b, c, y, x, ci: tvm.tirx.if_then_else(
                tvm.tirx.all(y >= top, y < ih + top, x >= left, x < iw + left, ci < bi),
                data[b, c, y - top, x - left, tvm.tirx.min(ci, bi - 1)],
                tvm.tirx.const(0, data.dtype),
            ),
            name="data_pad",
        )
    rco = te.reduce_axis((0, ic_o), "rco")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rk = te.reduce_axis((0, pairs), "rk")
    rj = te.reduce_axis((0, 2), "rj")
    return te.compute(
        (n, oc_o, oh, ow, bo),
        lambda b, co, y, x, c: te.sum(
            pad[b, rco, y * sh + rh * dh, x * sw + rw * dw, rk * 2 + rj].astype("float32")
            * weight[co, rco, rh, rw, rk, c, rj].astype("float32"),
            axis=[rco, rh, rw, rk, rj],
        ),
        name="conv2d_nchwc_bf16",
        attrs={_ANNOTATION: "conv2d_nchwc_bf16"},
    )


def _bf16_conv_ok(call: relax.Call) -> bool:
    a = call.attrs
    data_m, out_m = _NCHWC.match(str(a.data_layout)), _NCHWC.match(str(a.out_layout))
    kern_m = _OIHWIO.match(str(a.kernel_layout))
    return bool(
        data_m
        and out_m
        and kern_m
        and static_shape(call.args[0]) is not None  # a symbolic batch: the fp32 path
        and int(a.groups) == 1
        and str(call.args[0].ty.dtype) == "bfloat16"
        and str(call.args[1].ty.dtype) == "bfloat16"
        and str(a.out_dtype) == "float32"
        and int(kern_m.group(2)) == _LANES
        and has_avx512_bf16(tvm.target.Target.current(allow_none=True))
    )


# A conv with at most this many input channels (an RGB stem) stays float32 under bf16.
_STEM_CHANNELS = 4


def keeps_fp32(call: relax.Call, precision: str) -> bool:
    """True for a dense packed conv with at most ``_STEM_CHANNELS`` input channels (the
    RGB stem) compiled in bf16: it stays float32. vdpbf16ps multiplies channel pairs and
    an AMX tile step is 32 channels deep, so 3 channels leave a quarter of each pair (and
    most of a tile) zero, where the fp32 packed conv wastes nothing; the conv is a small
    share of the model's FLOPs and reads a 3-channel input, so float32 costs little.
    ResNet-18's 7x7 stem on a Xeon with AMX (2 cores): 1.65 ms in bf16 (vdpbf16ps),
    0.7 ms in float32."""
    if precision != "bf16" or call.op.name != "relax.nn.conv2d":
        return False
    a = call.attrs
    data = cpu._shape(call.args[0])
    return bool(
        data is not None
        and _NCHWC.match(str(a.data_layout))
        and int(a.groups) == 1
        and str(call.args[0].ty.dtype) == "float32"
        and data[1] * data[4] <= _STEM_CHANNELS
    )


def _in_fp32(bb: relax.BlockBuilder, call: relax.Call) -> relax.Call:
    """``call`` on its operands cast back to float32: a bf16 conv the vdpbf16ps compute
    does not take (grouped and depthwise convs, a symbolic batch) computes on bf16-rounded values in
    float32 on the fp32 rules, which convert no bf16 in their inner loops. The weight's
    cast acts on a constant (folded at compile time)."""
    x32, w32 = (
        bb.emit_te(topi.cast, arg, "float32", primfunc_name_hint="cast") for arg in call.args[:2]
    )
    return bb.normalize(relax.Call(call.op, [x32, w32, *call.args[2:]], call.attrs))


def legalize_conv2d(fallback):  # noqa: ANN001, ANN201
    """A conv2d legalization: packed dense bf16 convs (16-channel output block, on a CPU
    with avx512bf16) through :func:`conv2d_nchwc_bf16_te`; other bf16
    convs there through ``fallback`` in float32 (:func:`_in_fp32`); any other conv
    through ``fallback``."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _bf16_conv_ok(call):
            if str(call.args[0].ty.dtype) == "bfloat16" and has_avx512_bf16(
                tvm.target.Target.current(allow_none=True)
            ):
                return fallback(bb, _in_fp32(bb, call))
            return fallback(bb, call)
        a = call.attrs
        pairs = bb.emit_te(_pair_weight, call.args[1], primfunc_name_hint="weight_pairs")
        return bb.call_te(
            conv2d_nchwc_bf16_te,
            call.args[0],
            pairs,
            list(a.strides),
            list(a.padding),
            list(a.dilation),
            primfunc_name_hint="conv2d_nchwc_bf16",
        )

    return legalize


def pair_matrix(w: te.Tensor) -> te.Tensor:
    """[K, N] -> [N/16, K/2, 16, 2]: per 16-column block, K/2 rows of 16 bf16 pairs (the
    layout vdpbf16ps broadcasts against, and the B tile rows AMX's tdpbf16ps reads)."""
    k, n = (int(d) for d in w.shape)
    return te.compute(
        (n // _LANES, k // 2, _LANES, 2),
        lambda no, kp, ni, j: w[kp * 2 + j, no * _LANES + ni],
        name="weight_pairs",
    )


def paired_matmul_te(x: te.Tensor, w: te.Tensor, kind: str = "matmul_bf16") -> te.Tensor:
    """out[m, n] = sum x[m, 2k+j] * w[n/16, k, n%16, j], float32 sums; the compute block
    is named and annotated ``kind`` (the rule that takes it: ``matmul_bf16``, AMX's
    ``matmul_amx``)."""
    m, k = (int(d) for d in x.shape)
    n = int(w.shape[0]) * _LANES
    rk = te.reduce_axis((0, k // 2), "rk")
    rj = te.reduce_axis((0, 2), "rj")
    return te.compute(
        (m, n),
        lambda i, j: te.sum(
            x[i, rk * 2 + rj].astype("float32")
            * w[j // _LANES, rk, j % _LANES, rj].astype("float32"),
            axis=[rk, rj],
        ),
        name=kind,
        attrs={_ANNOTATION: kind},
    )


def matmul_bf16_te(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    return paired_matmul_te(x, w, "matmul_bf16")


def static_shape(expr) -> list[int] | None:  # noqa: ANN001
    try:
        return [int(d) for d in expr.ty.shape.values]
    except (AttributeError, TypeError):
        return None


def legalize_matmul(fallback):  # noqa: ANN001, ANN201
    """A matmul legalization: 2-D bf16 x bf16 -> float32 with K even and N a multiple of
    16 (on a CPU with avx512bf16) through :func:`matmul_bf16_te`; other bf16 matmuls there
    through ``fallback`` in float32 (:func:`_in_fp32`); others through ``fallback``."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        x, w = call.args[0], call.args[1]
        xs, ws = static_shape(x), static_shape(w)
        ok = (
            xs is not None
            and ws is not None
            and len(xs) == 2
            and len(ws) == 2
            and str(x.ty.dtype) == "bfloat16"
            and str(w.ty.dtype) == "bfloat16"
            and str(call.attrs.out_dtype) == "float32"
            and xs[1] % 2 == 0
            and ws[1] % _LANES == 0
            and has_avx512_bf16(tvm.target.Target.current(allow_none=True))
        )
        if not ok:
            if str(x.ty.dtype) == "bfloat16" and has_avx512_bf16(
                tvm.target.Target.current(allow_none=True)
            ):
                return fallback(bb, _in_fp32(bb, call))
            return fallback(bb, call)
        pairs = bb.emit_te(pair_matrix, w, primfunc_name_hint="weight_pairs")
        return bb.call_te(matmul_bf16_te, x, pairs, primfunc_name_hint="matmul_bf16")

    return legalize


# --- schedule rules -----------------------------------------------------------------------
# The rules' choices, as the fp32 rules expose theirs (``_cpu_schedules.TUNABLE``): numeric
# ones from ``decisions`` (plain defaults, or sampling instructions whose decision is the
# default), structural ones from a plan (one design space each, the default first).
@dataclass(frozen=True)
class MatmulPlan:
    """The structural choices of :func:`schedule_matmul_bf16` (the default ``MatmulPlan()``
    is today's schedule). ``rows``: a register tile of several output rows, each loaded
    weight vector feeding one vdpbf16ps per row; ``n_outer``: the output-block chunk loop
    outside the row loop in the parallel loop (a thread's rows share its weight block)."""

    rows: bool = False
    n_outer: bool = False


MATMUL_PLANS = (MatmulPlan(), MatmulPlan(rows=True), MatmulPlan(n_outer=True))
# The conv's design spaces: the fp32 packed conv's plans (one change at a time).
CONV_PLANS = cpu.CONV_PLANS
_MAX_TILE_ROWS = 4  # output rows of a multi-row register tile, at most
# iter vars of the conv2d_nchwc_bf16 block: n, co, y, x, c, rco, rh, rw, rk, rj
_CONV_RCO, _CONV_RH, _CONV_RW = 5, 6, 7


def _anchor(sch: s_tir.Schedule, kind: str):  # noqa: ANN202
    found = [
        b
        for b in cpu._root_blocks(sch)
        if sch.get(b).annotations is not None
        and str(sch.get(b).annotations.get(_ANNOTATION, "")) == kind
    ]
    return found[0] if len(found) == 1 else None


def _extent(sch: s_tir.Schedule, loop) -> int:  # noqa: ANN001
    return int(sch.get(loop).extent)


def _largest_divisor(n: int, limit: int) -> int:
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def _loop_iters(sch: s_tir.Schedule, block, outer) -> list[tuple]:  # noqa: ANN001
    """``(loop, index of the block iter var it feeds)`` for the loops under ``outer``
    (loops of extent 1 are left out by compute_at; their iter vars have none)."""
    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    loops = list(sch.get_loops(block))
    start = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(outer))) + 1
    out = []
    for lp in loops[start:]:
        var = sch.get(lp).loop_var
        used = [
            i
            for i, value in enumerate(realize.iter_values)
            if any(v.same_as(var) for v in tirx.analysis.undefined_vars(value, []))
        ]
        if len(used) != 1:
            raise ValueError("a loop feeds several block iter vars")
        out.append((lp, used[0]))
    return out


def _tensorize_tail(  # noqa: PLR0913
    sch: s_tir.Schedule,
    block,  # noqa: ANN001
    outer,  # noqa: ANN001
    lanes_iter: int,
    first: tuple = (),
    unroll: tuple = (),
) -> None:
    """Under ``outer``: the reductions (the pair axis, the block's last iter var, last)
    around the register tile (the 16-lane axis ``lanes_iter`` last); the init split off;
    each pair step one vdpbf16ps. The reduction loops of the iter vars in ``first`` go
    outermost (a conv's kernel window outside its channel chunk), those of ``unroll`` are
    unrolled. Raises (the rule declines) when the nest has no reduction loop besides the
    pair axis, or when a loop ``first`` or ``unroll`` names is not there (that plan would
    be the default's)."""
    iters = _loop_iters(sch, block, outer)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    pair_iter = len(kinds) - 1
    last_lanes = max(k for k, (_, i) in enumerate(iters) if i == lanes_iter)
    reduce = [(lp, i) for lp, i in iters if kinds[i] == tirx.IterVar.CommReduce and i != pair_iter]
    spatial = [
        lp
        for k, (lp, i) in enumerate(iters)
        if kinds[i] == tirx.IterVar.DataPar and k != last_lanes
    ]
    lanes = iters[last_lanes][0]  # a split lane axis: its inner 16
    pair = next(lp for lp, i in iters if i == pair_iter)
    if not reduce:
        raise ValueError("no reduction loop to split the init at")
    if first:
        moved = [r for r in reduce if r[1] in first] + [r for r in reduce if r[1] not in first]
        if moved == reduce:
            raise ValueError("the loops to move are outermost already")
        reduce = moved
    unrolled = [lp for lp, i in reduce if i in unroll]
    if len(unrolled) != len(unroll):
        raise ValueError("no loop to unroll")
    sch.reorder(*(lp for lp, _ in reduce), *spatial, lanes, pair)
    init = sch.decompose_reduction(block, reduce[0][0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(lanes, DOT_16x2_BF16)
    for lp in spatial:
        if _extent(sch, lp) > 1:
            sch.unroll(lp)
    for lp in unrolled:
        sch.unroll(lp)


def _open_register_tile(sch: s_tir.Schedule, anchor, keep: list) -> tuple[list, list]:  # noqa: ANN001
    """The opening of the packed-conv rules (fp32 and bf16 alike): every spatial block but
    ``keep`` inlined, the anchor's sums cached in a ``local`` register tile whose
    write-back takes the elementwise epilogue. Returns the blocks left to schedule (pads)
    and the write-back's loops."""
    _inline_spatial_intermediates(sch, keep=keep)
    out = sch.cache_write(anchor, 0, "local")
    _inline_epilogue(sch, out)
    return _other_root_blocks(sch, [anchor, out]), sch.get_loops(out)


def _choose(sch: s_tir.Schedule, decisions: cpu.Decisions, options: list[int], default: int):
    """``default``, or with sampling ``decisions`` a ``sample_categorical`` over
    ``options`` (which hold ``default``) whose decision is the default."""
    if not decisions.sampling or len(options) < 2:
        return default
    probs = [1.0 / len(options)] * len(options)
    return sch.sample_categorical(options, probs, decision=options.index(default))


def rule_conv2d_nchwc_bf16(func: tirx.PrimFunc, target: tvm.target.Target):  # noqa: ANN201
    """A bf16 packed conv plus its fused epilogue: the fp32 rule's register tile (reg_n
    output pixels x 16 output channels, accumulated over the whole reduction), each
    reduction step one vdpbf16ps per pixel (two input channels at once)."""
    return schedule_conv2d_nchwc_bf16(s_tir.Schedule(func), target)


def schedule_conv2d_nchwc_bf16(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: cpu.Decisions = cpu.DEFAULTS,
    plan: cpu.Plan = cpu.DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """:func:`rule_conv2d_nchwc_bf16` on ``sch``, its choices from ``decisions`` (the
    register tile's pixels, up to _MAX_REG_N accumulators; its rows with ``plan.rows``)
    and ``plan`` (:class:`graphopt.targets._cpu_schedules.Plan`: the parallel loops, a
    rows x pixels tile, the kernel window outside the channel chunk, kw unrolled)."""
    if not has_avx512_bf16(target):
        return None
    conv = _anchor(sch, "conv2d_nchwc_bf16")
    if conv is None:
        return None
    pads = [b for b in sch.get_producers(conv) if "pad" in sch.get(b).name_hint]
    others, loops = _open_register_tile(sch, conv, keep=[conv, *pads])
    if len(loops) != 5:
        return None
    n, co, y, x, ci = loops
    rows = 1
    if plan.rows:  # the largest row tile from 2 to 4 (none: the plan declines)
        height = _extent(sch, y)
        rows = max((r for r in range(2, _MAX_TILE_ROWS + 1) if height % r == 0), default=1)
        if rows == 1:
            return None
        yo, yi = sch.split(y, [None, decisions.factor(sch, height, rows, _MAX_TILE_ROWS)])
    width, most = _extent(sch, x), _MAX_REG_N // rows
    reg_n = _largest_divisor(width, most)
    xo, xi = sch.split(x, [None, decisions.factor(sch, width, reg_n, most)])
    if plan.rows:
        sch.reorder(yo, xo, yi, xi)
        y = yo
    sch.parallel(sch.fuse(n, co, y) if plan.parallel_loops == 3 else sch.fuse(n, co))
    sch.vectorize(ci)
    sch.compute_at(conv, xo)
    sch.annotate(xo, "pragma_import_llvm", _DPBF16PS_LL)
    _tensorize_tail(
        sch,
        conv,
        xo,
        lanes_iter=4,
        first=(_CONV_RH, _CONV_RW) if plan.kernel_outer else (),
        unroll=(_CONV_RW,) if plan.unroll_kw else (),
    )
    return _schedule_others(sch, others, _LANES)


def rule_matmul_bf16(func: tirx.PrimFunc, target: tvm.target.Target):  # noqa: ANN201
    """A bf16 matmul plus its epilogue: up to 8 output blocks of 16 in registers, each
    reduction step one vdpbf16ps per block; rows and block groups in parallel."""
    return schedule_matmul_bf16(s_tir.Schedule(func), target)


def schedule_matmul_bf16(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: cpu.Decisions = cpu.DEFAULTS,
    plan: MatmulPlan = MATMUL_PLANS[0],
) -> s_tir.Schedule | None:
    """:func:`rule_matmul_bf16` on ``sch``: the output blocks in registers (a divisor of
    the blocks, up to _MAX_N_TILE; the row tile's rows with ``plan.rows``) from
    ``decisions``, the structure from ``plan`` (:class:`MatmulPlan`)."""
    if not has_avx512_bf16(target):
        return None
    mm = _anchor(sch, "matmul_bf16")
    if mm is None:
        return None
    others, loops = _open_register_tile(sch, mm, keep=[mm])
    if len(loops) != 2:
        return None
    m, n = loops
    height, blocks = _extent(sch, m), _extent(sch, n) // _LANES
    if (plan.rows or plan.n_outer) and height == 1:
        return None  # one row: no rows to tile or to put inside the blocks
    rows = 1
    if plan.rows:  # the smallest row tile from 2 to 4 (none: the plan declines)
        rows = next((r for r in range(2, _MAX_TILE_ROWS + 1) if height % r == 0), 1)
        if rows == 1:
            return None
    most = max(min(_MAX_N_TILE, _MAX_REG_N // rows), 1)
    tile = _largest_divisor(blocks, most)
    # Output blocks in registers: any divisor, one block too (unlike the fp32 rules' factors:
    # the tile is 16 lanes or more, so compute_at keeps the loop whatever is sampled).
    options = [d * _LANES for d in range(1, most + 1) if blocks % d == 0]
    tile = _choose(sch, decisions, options, tile * _LANES)
    no, nn = sch.split(n, [None, tile])
    if plan.rows:
        mo, mi = sch.split(m, [None, decisions.factor(sch, height, rows, _MAX_TILE_ROWS)])
        sch.reorder(mo, no, mi, nn)
        m = mo
    if plan.n_outer:
        sch.reorder(no, m)
    fused = sch.fuse(no, m) if plan.n_outer else sch.fuse(m, no)
    sch.parallel(fused)
    sch.annotate(fused, "pragma_import_llvm", _DPBF16PS_LL)
    _nj, ni = sch.split(nn, [None, _LANES])
    sch.vectorize(ni)
    sch.compute_at(mm, fused)
    (lp, _), *_ = [(lp, i) for lp, i in _loop_iters(sch, mm, fused) if i == 1]
    sch.split(lp, [None, _LANES])
    _tensorize_tail(sch, mm, fused, lanes_iter=1)  # iters: m, n, rk, rj
    return _schedule_others(sch, others, _LANES)


# The legalizations graphopt.targets._cpu layers over the fp32 ones.
WRAP_LEGALIZE = {"relax.nn.conv2d": legalize_conv2d, "relax.matmul": legalize_matmul}

# Ordered, first fit wins; before every fp32 rule (they would take bf16 kernels slowly).
RULES = [
    ("conv2d_nchwc_bf16", rule_conv2d_nchwc_bf16),
    ("matmul_bf16", rule_matmul_bf16),
]

# Their search spaces for ``graphopt tune`` (as ``_cpu_schedules.TUNABLE``): name ->
# (schedule(sch, target, decisions, plan), its plans, the default first).
TUNABLE = {
    "conv2d_nchwc_bf16": (schedule_conv2d_nchwc_bf16, CONV_PLANS),
    "matmul_bf16": (schedule_matmul_bf16, MATMUL_PLANS),
}
