"""ARM fp16 kernels on the hardware: FEAT_FHM ``FMLAL`` (fp16 products, float32 sums).

``fmlal vd.4s, vn.4h, vm.4h`` adds, for each of 4 float32 lanes ``i``, the product
``n[i] * m[i]`` of two fp16 values (exact in float32) to ``d[i]``: the same numbers as
converting both operands to float32 and using ``fmla``, in one instruction instead of
``fcvtl`` + ``fmla``, and with half the weight bytes loaded. LLVM does not select it
from ``fpext`` + ``fma`` (checked with the LLVM TVM 0.27 links: an fp16 NHWC conv built
for ``+fullfp16,+fp16fml`` had ``fcvtl`` and ``fmla`` and no ``fmlal``), so the kernels
here call the intrinsic ``llvm.aarch64.neon.fmlal`` explicitly.

``FMLAL_4_FP16`` is a tensor intrinsic: description, 4 float32 lanes ``C[i] +=
float(A[0]) * float(B[i])`` (one input channel broadcast times a 4-channel weight block);
body, one call of ``graphopt_fmlal4``, a 9-line LLVM IR function (``_FMLAL_LL``,
linked with the ``pragma_import_llvm`` annotation and inlined by LLVM) that widens the
weight block to ``<8 x half>`` and broadcasts the activation. The accumulator is a
``local`` buffer, as the register-tile rules keep it.

The NHWC dense conv (ARM's default layout, OHWI4o weights: 4 float32 lanes of NEON) in
fp16 (``precision="fp16"``, :mod:`graphopt.targets._precision`) keeps the fp32 rule's
register tile (:func:`graphopt.targets._cpu_nhwc.schedule_conv2d_nhwc`: ``reg_n``
pixels x 4 channels in registers over the whole reduction) and tensorizes its channel
lanes: each reduction step is one ``fmlal`` per pixel (rule ``conv2d_nhwc_fp16``).
Matmuls with a weight ``[..., M, K] x [K, N]`` (N a multiple of 4; the weight re-laid
out as ``[N/4, K, 4]`` at compile time) and ``expand-rnn``'s packed recurrent products
``[M, K] x [J, K, B]`` (B a multiple of 4) get a register tile of up to 4 rows x 6 blocks
of 4 columns, one ``fmlal`` per row and block each step (rule ``matmul_fp16``).

Both take only fp16 kernels on an aarch64 target with ``fp16fml`` (LLVM feature:
``+fp16fml`` in mattr, or a CPU with it such as neoverse-v1, neoverse-n2, cortex-a710;
cortex-a76/a78/x1 have ``fullfp16`` without it). Everything else in fp16 (depthwise and
grouped convs, a conv whose thin input's padding is inlined, a matmul whose N is not a
multiple of 4, any kernel on a target with ``fullfp16`` only) computes on fp16 operands
converted to float32 in the fp32 rules (``fcvtl`` + ``fmla``): the same numbers, more
instructions.

Hooked into the CPU pipeline by :mod:`graphopt.targets._cpu` (``KERNEL_MODULES``):
``WRAP_LEGALIZE`` wraps the matmul legalization (the conv needs none: the NHWC conv's TE
compute already reads fp16 operands and sums in float32); ``RULES`` go ahead of the fp32
rules in the schedule phase.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from graphopt.targets import _cpu_nhwc
from graphopt.targets import _cpu_schedules as cpu
from graphopt.targets._bf16 import static_shape

__all__ = [
    "FMLAL_4_FP16",
    "RULES",
    "WRAP_LEGALIZE",
    "has_fp16fml",
    "legalize_matmul",
    "matmul_fp16_te",
    "matmul_fp16_blocked_te",
    "rule_conv2d_nhwc_fp16",
    "rule_matmul_fp16",
    "schedule_conv2d_nhwc_fp16",
    "TUNABLE",
]

_ANNOTATION = "graphopt.kernel"
_LANES = 4  # float32 lanes of one NEON register: the NHWC weight block on ARM
_MAX_ROWS = 4  # matmul register tile: rows x blocks of 4 accumulators, at most 24
_MAX_BLOCKS = 6
# A matmul with fewer multiply-adds runs on one core: a recurrent step's GEMV (hidden 32:
# 4K) would spend more on waking the thread pool than on its arithmetic.
_PARALLEL_MIN_MACS = 1 << 16

_FMLAL_LL = """
define internal <4 x float> @graphopt_fmlal4(<4 x float> %c, half %a, <4 x half> %b)
    alwaysinline {
  %a1 = insertelement <8 x half> poison, half %a, i64 0
  %a8 = shufflevector <8 x half> %a1, <8 x half> poison, <8 x i32> zeroinitializer
  %b8 = shufflevector <4 x half> %b, <4 x half> poison,
                      <8 x i32> <i32 0, i32 1, i32 2, i32 3, i32 poison, i32 poison,
                                 i32 poison, i32 poison>
  %r = call <4 x float> @llvm.aarch64.neon.fmlal.v4f32.v8f16(<4 x float> %c,
                                                             <8 x half> %a8, <8 x half> %b8)
  ret <4 x float> %r
}
declare <4 x float> @llvm.aarch64.neon.fmlal.v4f32.v8f16(<4 x float>, <8 x half>, <8 x half>)
"""


# --- the tensor intrinsic -----------------------------------------------------------------
@T.prim_func(s_tir=True)
def _fmlal_4_desc(
    A: T.Buffer((1,), "float16", offset_factor=1),
    B: T.Buffer((4,), "float16", offset_factor=1),
    C: T.Buffer((4,), "float32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:1], B[0:4])
        T.writes(C[0:4])
        for i in T.vectorized(0, 4):  # the rules vectorize the 4 lanes before tensorizing
            with T.sblock("update"):
                vi = T.axis.remap("S", [i])
                C[vi] = C[vi] + T.cast(A[0], "float32") * T.cast(B[vi], "float32")


@T.prim_func(s_tir=True)
def _fmlal_4_impl(
    A: T.Buffer((1,), "float16", offset_factor=1),
    B: T.Buffer((4,), "float16", offset_factor=1),
    C: T.Buffer((4,), "float32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:1], B[0:4])
        T.writes(C[0:4])
        C[T.ramp(T.int32(0), 1, 4)] = T.call_pure_extern(
            "float32x4",
            "graphopt_fmlal4",
            C.vload([0], dtype="float32x4"),
            A[0],
            B.vload([0], dtype="float16x4"),
        )


FMLAL_4_FP16 = "graphopt_fmlal_4_fp16"
TensorIntrin.register(FMLAL_4_FP16, _fmlal_4_desc, _fmlal_4_impl, override=True)


def has_fp16fml(target: tvm.target.Target | None) -> bool:
    """Whether LLVM may emit FMLAL for ``target`` (aarch64 with fp16fml)."""
    if target is None or target.kind.name != "llvm":
        return False
    if not str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64")):
        return False
    from tvm.target import codegen

    return "fp16fml" in {str(f) for f in codegen.llvm_get_cpu_features(target)}


# --- the conv rule ------------------------------------------------------------------------
def _fp16_conv(sch: s_tir.Schedule):  # noqa: ANN202
    """The kernel's one dense NHWC conv block when it reads fp16 and sums float32."""
    found = [b for b in cpu._root_blocks(sch) if cpu._annotation(sch, b) == "conv2d_nhwc"]
    if len(found) != 1:
        return None
    block = sch.get(found[0])
    reads = {str(r.source.dtype) for r in block.reads}
    if reads != {"float16", "float32"} and reads != {"float16"}:
        return None
    if str(block.writes[0].source.dtype) != "float32":
        return None
    return found[0]


def rule_conv2d_nhwc_fp16(func: tirx.PrimFunc, target: tvm.target.Target):  # noqa: ANN201
    """An fp16 NHWC dense conv plus its fused epilogue: the fp32 rule's register tile,
    each reduction step one ``fmlal`` per output pixel (4 channels). Declines (None)
    when the kernel is not one, the weight block is not 4 channels, or the tile does not
    tensorize; the fp32 rules then take it."""
    try:
        return schedule_conv2d_nhwc_fp16(s_tir.Schedule(func), target)
    except (tvm.TVMError, s_tir.ScheduleError, ValueError):
        return None


def schedule_conv2d_nhwc_fp16(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: cpu.Decisions = cpu.DEFAULTS,
    plan: cpu.Plan = cpu.DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """:func:`rule_conv2d_nhwc_fp16` on ``sch`` with the NHWC rule's ``decisions`` and
    ``plan`` (:func:`graphopt.targets._cpu_nhwc.schedule_conv2d_nhwc`); every point keeps
    the fmlal tensorization."""
    if not has_fp16fml(target):
        return None
    conv = _fp16_conv(sch)  # a block RV: it stays valid while the schedule moves it
    if conv is None or _cpu_nhwc._channel_block(sch, conv) != _LANES:
        return None
    if _cpu_nhwc.schedule_conv2d_nhwc(sch, target, decisions, plan) is None:
        return None
    loops = sch.get_loops(conv)
    lanes = loops[-1]
    if int(sch.get(lanes).extent) != _LANES:
        return None
    sch.annotate(loops[0], "pragma_import_llvm", _FMLAL_LL)
    sch.tensorize(lanes, FMLAL_4_FP16)
    return sch


# --- matmul: weights in 4-column blocks ------------------------------------------------
def _block_matrix(w: te.Tensor) -> te.Tensor:
    """[K, N] -> [N/4, K, 4]: each block's 4 weights of one k contiguous (8 bytes)."""
    k, n = (int(d) for d in w.shape)
    return te.compute(
        (n // _LANES, k, _LANES),
        lambda no, kk, ni: w[kk, no * _LANES + ni],
        name="weight_blocks",
    )


def matmul_fp16_te(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """out[..., m, n] = sum x[..., m, k] * w[n/4, k, n%4], fp16 products, float32 sums
    (x's leading dims, if any, are batch dims sharing the weight)."""
    *lead, k = (int(d) for d in x.shape)
    n = int(w.shape[0]) * _LANES
    rk = te.reduce_axis((0, k), "rk")
    return te.compute(
        (*lead, n),
        lambda *idx: te.sum(
            x[(*idx[:-1], rk)].astype("float32")
            * w[idx[-1] // _LANES, rk, idx[-1] % _LANES].astype("float32"),
            axis=[rk],
        ),
        name="matmul_fp16",
        attrs={_ANNOTATION: "matmul_fp16"},
    )


def matmul_fp16_blocked_te(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """x [M, K] times column-blocked weights w [J, K, B] (``expand-rnn``'s packed
    recurrent weights): out[j, m, n] = sum x[m, k] * w[j, k, n], float32 sums."""
    m, k = (int(d) for d in x.shape)
    j, _, b = (int(d) for d in w.shape)
    rk = te.reduce_axis((0, k), "rk")
    return te.compute(
        (j, m, b),
        lambda jj, i, n: te.sum(
            x[i, rk].astype("float32") * w[jj, rk, n].astype("float32"), axis=[rk]
        ),
        name="matmul_fp16",
        attrs={_ANNOTATION: "matmul_fp16"},
    )


def legalize_matmul(fallback):  # noqa: ANN001, ANN201
    """A matmul legalization, fp16 x fp16 -> float32 on an aarch64 target with fp16fml:
    [..., M, K] x [K, N] with N a multiple of 4 through :func:`matmul_fp16_te` (the
    weight re-laid out in blocks, folded at compile time when it is a constant);
    [M, K] x [J, K, B] with B a
    multiple of 4 (a packed recurrent product) through :func:`matmul_fp16_blocked_te`;
    others through ``fallback``."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        x, w = call.args[0], call.args[1]
        xs, ws = static_shape(x), static_shape(w)
        ok = (
            xs is not None
            and ws is not None
            and (len(ws) == 2 and len(xs) >= 2 or len(ws) == 3 and len(xs) == 2)
            and str(x.ty.dtype) == str(w.ty.dtype) == "float16"
            and str(call.attrs.out_dtype) == "float32"
            and ws[-1] % _LANES == 0
            and has_fp16fml(tvm.target.Target.current(allow_none=True))
        )
        if not ok:
            return fallback(bb, call)
        if len(ws) == 3:
            return bb.call_te(matmul_fp16_blocked_te, x, w, primfunc_name_hint="matmul_fp16")
        blocks = bb.emit_te(_block_matrix, w, primfunc_name_hint="weight_blocks")
        return bb.call_te(matmul_fp16_te, x, blocks, primfunc_name_hint="matmul_fp16")

    return legalize


def _largest_divisor(n: int, limit: int) -> int:
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def rule_matmul_fp16(func: tirx.PrimFunc, target: tvm.target.Target):  # noqa: ANN201
    """An fp16 matmul plus its epilogue: a register tile of up to 4 rows x 6 blocks of 4
    columns accumulated over the whole reduction, each step one ``fmlal`` per row and
    block (the row's x[m, k] broadcast, the block's 4 weights one 8-byte load); row and
    column tiles (and a packed product's column blocks) in parallel when the matmul has
    ``_PARALLEL_MIN_MACS`` multiply-adds or more."""
    if not has_fp16fml(target):
        return None
    sch = s_tir.Schedule(func)
    found = [b for b in cpu._root_blocks(sch) if cpu._annotation(sch, b) == "matmul_fp16"]
    if len(found) != 1:
        return None
    mm = found[0]
    try:
        cpu._inline_spatial_intermediates(sch, keep=[mm])
        out = sch.cache_write(mm, 0, "local")
        cpu._inline_epilogue(sch, out)
        others = cpu._other_root_blocks(sch, [mm, out])
        *outer, m, n = sch.get_loops(out)  # (column block or batch dims,) rows, columns
        macs = int(sch.get(mm).iter_vars[-1].dom.extent)
        for lp in (*outer, m, n):
            macs *= cpu._extent(sch, lp)
        rows = _largest_divisor(cpu._extent(sch, m), _MAX_ROWS)
        blocks = _largest_divisor(cpu._extent(sch, n) // _LANES, _MAX_BLOCKS)
        mo, mi = sch.split(m, [None, rows])
        no, nn = sch.split(n, [None, blocks * _LANES])
        sch.reorder(*outer, mo, no, mi, nn)
        fused = sch.fuse(*outer, mo, no)
        if macs >= _PARALLEL_MIN_MACS:
            sch.parallel(fused)
        sch.annotate(fused, "pragma_import_llvm", _FMLAL_LL)
        nj, ni = sch.split(nn, [None, _LANES])
        sch.vectorize(ni)
        sch.compute_at(mm, fused)
        below = cpu._loops_below(sch, mm, fused)  # (rows,) columns, k: unit loops dropped
        kinds = cpu._loop_kinds(sch, mm, below)
        spatial = [lp for lp, k in zip(below, kinds, strict=True) if k == "S"]
        (rk,) = [lp for lp, k in zip(below, kinds, strict=True) if k == "R"]
        nj_c, ni_c = sch.split(spatial[-1], [None, _LANES])
        sch.reorder(rk, *spatial[:-1], nj_c, ni_c)
        sch.vectorize(ni_c)  # before the init is split off: then it is no reduction
        for lp in (*spatial[:-1], nj_c):
            sch.unroll(lp)
        init = sch.decompose_reduction(mm, rk)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(ni_c, FMLAL_4_FP16)
    except (tvm.TVMError, s_tir.ScheduleError, ValueError):
        return None
    return cpu._schedule_others(sch, others, _LANES)


# The legalization graphopt.targets._cpu layers over the fp32 ones.
WRAP_LEGALIZE = {"relax.matmul": legalize_matmul}

# Ordered, first fit wins; before every fp32 rule (they would take fp16 kernels too).
RULES = [("conv2d_nhwc_fp16", rule_conv2d_nhwc_fp16), ("matmul_fp16", rule_matmul_fp16)]

# For ``graphopt tune`` (graphopt/tuning/_space.py): the conv's register tile and plans as
# the fp32 NHWC rule offers them. The matmul rule has no choices to offer (yet): its
# default schedule is its only point.
TUNABLE = {"conv2d_nhwc_fp16": (schedule_conv2d_nhwc_fp16, cpu.CONV_PLANS)}
