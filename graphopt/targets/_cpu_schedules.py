"""Default CPU schedules: fast x86 kernels without tuning.

Three pieces, in the order the x86 pipeline uses them with its default layout ``nchwc``
(the layouts each target offers, and their passes, are tabled in
:mod:`graphopt.targets._layout`; the NHWC conv rule is :mod:`graphopt.targets._cpu_nhwc`):

1. ``ConvertToNCHWc`` (a Relax pass, before LegalizeOps): every conv moves to the packed
   layout ``NCHW[x]c`` with weights ``OIHW[x]i[y]o`` on its own, so the innermost axis of
   every activation and weight is a block of output channels (one SIMD register wide
   where the channel count allows). The packed layout is carried through elementwise
   ops, SE gates, pools, pads, channel concats and slices; a ``layout_transform`` goes
   only on an edge whose consumer cannot carry it (:mod:`graphopt.targets._nchwc`).
   Weight transforms act on constants, so the FoldConstant after LegalizeOps packs every
   weight once, at compile time.
2. ``LEGALIZE`` (LegalizeOps' customize map): TOPI cannot legalize a channel-blocked
   conv2d, so these TE computes do; their anchor blocks carry a ``graphopt.kernel``
   annotation that the rules below look for. float32 sigmoid/tanh/exp take TOPI's
   polynomial forms, which vectorize (libm's ``expf`` does not).
3. ``RULES`` (after FuseTIR): an ordered list of ``(name, rule)``. ``ApplyCPUSchedules``
   gives each unscheduled PrimFunc to the rules in order; the first one that returns a
   schedule wins (TVM's ``s_tir/dlight`` ApplyDefaultSchedule, with the same contract: a
   rule returns None to decline). A rule that raises also declines, so the next one gets a
   fresh schedule: a schedule can only be slow, never wrong, since every primitive used
   here is checked by TVM for legality. The winning rule's name is recorded in the
   PrimFunc's ``graphopt.schedule_rule`` attribute.

Rule names (the ``graphopt.schedule_rule`` attribute, what ``graphopt profile`` shows):
``conv2d_nchwc``, ``pointwise_nchwc`` (1x1), ``depthwise_nchwc``, ``grouped_nchwc`` (and
the NHWC layout's ``conv2d_nhwc``, ``depthwise_nhwc``, ``grouped_nhwc``), ``matmul``,
``reduction`` (pools, means: a pool over packed lanes one pixel's vector at a time,
:func:`_schedule_window`), ``injective``, ``fallback``. A kernel with a conv or matmul
also carries ``graphopt.fast_path``: False when a generic rule (``GENERIC_RULES``) took it.

The conv schedules follow the Relay-era ``topi/x86/conv2d_avx_common.py``: a register
tile of ``reg_n`` output pixels by one channel block, reduction loops outside it, the
channel block vectorized and the pixel loop unrolled, outer loops parallel.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.s_tir.schedule import ScheduleError

from graphopt.lower._fastmath import f32 as _f32
from graphopt.lower._fastmath import fast_erf_expr, fast_exp_expr, fast_tanh_expr
from graphopt.targets import _gemv, _prefetch
from graphopt.targets._nchwc import PackNCHWc
from graphopt.targets._phases import schedule_unscheduled
from graphopt.targets._simd import vector_lanes, vector_registers

__all__ = [
    "RULES",
    "LEGALIZE",
    "ApplyCPUSchedules",
    "ConvertToNCHWc",
    "vector_lanes",
    "legalize_lanes",
    "apply_rules",
    "TUNABLE",
    "Plan",
    "Decisions",
    "SampledDecisions",
    "DEFAULTS",
    "AFTER_TRACE",
    "prefetch_streamed",
]

# Vector registers a conv register tile leaves free for the weight vector and the
# broadcast: it holds at most registers - _SPARE_REGISTERS accumulators (28 of AVX-512's
# or NEON's 32; 12 of AVX2's 16).
_SPARE_REGISTERS = 4
# Accumulator units (of reduction_lanes() each) in a reduction's register tile (rows x
# units per row); a GEMV's widened row takes up to half as many.
_MAX_TILE_VECTORS = 16
# A matmul whose weight (K x N) is larger than this runs its column panels outermost, so
# each panel stays in the core's L2 while every row block passes over it; a smaller
# weight stays in L2 anyway and the rows go outermost (the activation is read once).
# 1 MiB: the L2 of a Zen 4 core (2 MiB on Sapphire/Emerald Rapids).
_MATMUL_WEIGHT_IN_CACHE = 1 << 20
# A concat of at least this many inputs is unrolled over its axis (if at most the max).
_MIN_CONCAT_INPUTS = 8
_MAX_UNROLLED_CONCAT = 128
# Below this many loop iterations a kernel runs serially: a parallel launch costs more.
_PARALLEL_MIN = 2048
# An injective loop nest whose innermost loop TVM cannot vectorize (a padded RGB row:
# 230 x 3 values) keeps that loop serial, left to LLVM, when the loops outside
# it give the threads at least this many iterations to share.
_SERIAL_INNER_MIN_ROWS = 64
_ANNOTATION = "graphopt.kernel"


# --- the tunable choices of a rule -------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The structural choices of a register-tile rule (each combination is one MetaSchedule
    design space; the default ``Plan()`` is today's schedule).

    ``parallel_loops``: how many of the outer output loops (n, channel chunk, row) are
    fused into the parallel loop (3: all; 2: each thread walks its rows serially, so its
    weights stay in cache); ``swap_outer``: with all three, the other order of row and
    channel chunk than the rule's (:func:`_rows_outer`; packed NCHWc convs); ``rows``:
    register tile of several output rows (a tile of rows x pixels, each weight vector
    feeding more FMAs); ``kernel_outer``: the kernel window loops outside the
    input-channel chunk loop; ``unroll_kw``: the kernel-width loop unrolled too (TOPI's
    ``unroll_kw``).
    """

    parallel_loops: int = 3
    swap_outer: bool = False
    rows: bool = False
    kernel_outer: bool = False
    unroll_kw: bool = False


DEFAULT_PLAN = Plan()
# The design spaces of the conv rules: the default first, then one change at a time.
CONV_PLANS = (
    DEFAULT_PLAN,
    Plan(parallel_loops=2),
    Plan(rows=True),
    Plan(kernel_outer=True),
    Plan(unroll_kw=True),
)
# The packed NCHWc convs' spaces: those, and the other order of their parallel loops.
NCHWC_CONV_PLANS = (*CONV_PLANS, Plan(swap_outer=True))
# A dense packed conv whose weights take at least this many bytes streams them
# (_stream_reduction), _STREAM_CHUNKS input channel chunks per step, if it has at least
# _STREAM_MIN_CHUNKS output channel chunks (of its register tile's blocks) to share out.
_STREAM_WEIGHT_BYTES = 1 << 20
_STREAM_CHUNKS = 4
_STREAM_MIN_CHUNKS = 8
# Accumulator rows of a multi-row conv tile, at most (rows x reg_n <= max_reg_n).
_MAX_TILE_ROWS = 4
# Independent accumulators a register tile keeps so that the FMA units do not wait on
# each other: FMA latency x FMA units, 4 x 2 on current x86 and big ARM cores.
_MIN_CHAINS = 8


class Decisions:
    """Where a rule's numeric choices come from. This base class gives the defaults as
    plain integers (no schedule instruction): the untuned schedules, unchanged."""

    sampling = False

    def factor(self, sch: s_tir.Schedule, extent: int, default: int, most: int) -> object:
        """The inner factor of a loop of ``extent`` split in two (``default`` unless
        sampled; sampled among the divisors from 2 to ``most``)."""
        return default


class SampledDecisions(Decisions):
    """Each choice a ``sample_categorical`` over the loop's divisors whose decision is the
    default, so the design space's first point is the default schedule.

    Why divisors >= 2 and not ``sample_perfect_tile``: a factor of 1 makes ``compute_at``
    drop that loop, so a trace replayed with it would see fewer loops than it recorded
    and fail; every divisor >= 2 keeps the loop structure of the default."""

    sampling = True

    def factor(self, sch: s_tir.Schedule, extent: int, default: int, most: int) -> object:
        options = sorted(
            {d for d in range(2, min(extent, most) + 1) if extent % d == 0} | {default}
        )
        if len(options) == 1 or default == 1:
            return default
        return sch.sample_categorical(
            options, [1.0 / len(options)] * len(options), decision=options.index(default)
        )


DEFAULTS = Decisions()


def max_reg_n(target: tvm.target.Target) -> int:
    """Accumulators of a one-vector-wide conv register tile (pixels x one channel block)."""
    return vector_registers(target) - _SPARE_REGISTERS


def reduction_lanes(target: tvm.target.Target) -> int:
    """The vector unit of the reduction (matmul) rule's tiles: 16 float32 on any x86 CPU
    (one AVX-512 register, two AVX2 ones), the SIMD width elsewhere.

    Why not the SIMD width on AVX2 too: a unit of two ymm registers gives each loaded
    row element two independent FMA chains, and on a Zen 3 (AVX2) the recurrent models'
    projection GEMMs ran faster so (same process, 16 interleaved rounds: CRNN 1.38x ->
    1.12x onnxruntime, LSTM classifier 1.15x -> 1.02x) than with 8-lane units."""
    lanes = vector_lanes(target)
    return max(lanes, 16) if vector_registers(target) == 16 and lanes >= 8 else lanes


# --- 1. layout: NCHW -> NCHW[x]c ---------------------------------------------------------
def legalize_lanes() -> int:
    """The float32 SIMD lanes of the target a legalization runs under (LegalizeOps inside
    the pipeline's target scope); 8 outside one."""
    target = tvm.target.Target.current(allow_none=True)
    return vector_lanes(target) if target is not None else 8


def _shape(expr) -> list[int] | None:  # noqa: ANN001
    shape = getattr(expr.ty, "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape.values]
    except (TypeError, AttributeError):
        return None


def ConvertToNCHWc(lanes: int) -> tvm.transform.Pass:  # noqa: N802 - a pass, named like TVM's
    """Pack every 2-D conv into NCHW[x]c on its own (x = ``lanes``, 8, 4 or 2 per tensor, by
    its channel count); layout transforms only on edges whose consumer cannot carry the
    packed layout. See :mod:`graphopt.targets._nchwc`. Put before LegalizeOps."""
    return PackNCHWc(lanes)


# --- 2. legalization of packed convs ---------------------------------------------------
_NCHWC = re.compile(r"^NCHW(\d+)c$")
_OIHWIO = re.compile(r"^OIHW(\d+)i(\d+)o$")


def _pad_nchwc(data: te.Tensor, padding) -> te.Tensor:  # noqa: ANN001
    top, left, bottom, right = (int(p) for p in padding)
    if top == left == bottom == right == 0:
        return data
    return topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], name="data_pad")


def _out_size(size: int, pad: int, k: int, stride: int, dil: int) -> int:
    return (size + pad - (k - 1) * dil - 1) // stride + 1


def _geometry(data, weight, strides, padding, dilation) -> tuple[int, ...]:  # noqa: ANN001
    """(kh, kw, sh, sw, dh, dw, oh, ow) of a packed conv: NCHW[x]c data, OIHW... weights."""
    ih, iw = int(data.shape[2]), int(data.shape[3])
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    oh = _out_size(ih, int(padding[0]) + int(padding[2]), kh, sh, dh)
    ow = _out_size(iw, int(padding[1]) + int(padding[3]), kw, sw, dw)
    return kh, kw, sh, sw, dh, dw, oh, ow


def conv2d_nchwc_te(data, weight, strides, padding, dilation, out_dtype: str):  # noqa: ANN001, ANN201
    """Dense packed conv, the padding as a separate ``data_pad`` stage:

    out[n, oc, y, x, oci] = sum data[n, ic, y*s+kh*d, x*s+kw*d, ici] * w[oc, ic, kh, kw, ici, oci]
    """
    n, ic_o, _, _, _ = (int(d) for d in data.shape)
    oc_o, _, _, _, _, oc_i = (int(d) for d in weight.shape)
    kh, kw, sh, sw, dh, dw, oh, ow = _geometry(data, weight, strides, padding, dilation)
    pad = _pad_nchwc(data, padding)
    ic_i = int(data.shape[4])
    rco = te.reduce_axis((0, ic_o), "rco")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rci = te.reduce_axis((0, ic_i), "rci")
    return te.compute(
        (n, oc_o, oh, ow, oc_i),
        lambda b, co, y, x, ci: te.sum(
            pad[b, rco, y * sh + rh * dh, x * sw + rw * dw, rci].astype(out_dtype)
            * weight[co, rco, rh, rw, rci, ci].astype(out_dtype),
            axis=[rco, rh, rw, rci],
        ),
        name="conv2d_nchwc",
        attrs={_ANNOTATION: "conv2d_nchwc"},
    )


def depthwise_conv2d_nchwc_te(data, weight, strides, padding, dilation, out_dtype: str):  # noqa: ANN001, ANN201
    """out[n, c, y, x, ci] = sum data[n, c, y*s+kh*d, x*s+kw*d, ci] * w[c, 0, kh, kw, 0, ci]."""
    n, c_o, _, _, c_i = (int(d) for d in data.shape)
    kh, kw, sh, sw, dh, dw, oh, ow = _geometry(data, weight, strides, padding, dilation)
    pad = _pad_nchwc(data, padding)
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    return te.compute(
        (n, c_o, oh, ow, c_i),
        lambda b, c, y, x, ci: te.sum(
            pad[b, c, y * sh + rh * dh, x * sw + rw * dw, ci].astype(out_dtype)
            * weight[c, 0, rh, rw, 0, ci].astype(out_dtype),
            axis=[rh, rw],
        ),
        name="depthwise_conv2d_nchwc",
        attrs={_ANNOTATION: "depthwise_conv2d_nchwc"},
    )


def grouped_conv2d_nchwc_te(data, weight, strides, padding, dilation, out_dtype: str, groups: int):  # noqa: ANN001, ANN201, PLR0913
    """Grouped packed conv, each channel block inside one group (the block divides the
    channels per group): a dense packed conv whose input blocks start at its group's.

    out[n, co, y, x, ci] = sum data[n, g(co) * ig + rco, y*s+kh*d, x*s+kw*d, rci]
                               * w[co, rco, kh, kw, rci, ci],  g(co) = co // og
    (ig, og: input/output channel blocks per group)
    """
    n, _, _, _, b = (int(d) for d in data.shape)
    oc_o, ig, _, _, _, _ = (int(d) for d in weight.shape)
    og = oc_o // groups
    kh, kw, sh, sw, dh, dw, oh, ow = _geometry(data, weight, strides, padding, dilation)
    pad = _pad_nchwc(data, padding)
    rco = te.reduce_axis((0, ig), "rco")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rci = te.reduce_axis((0, b), "rci")
    return te.compute(
        (n, oc_o, oh, ow, b),
        lambda bn, co, y, x, ci: te.sum(
            pad[bn, co // og * ig + rco, y * sh + rh * dh, x * sw + rw * dw, rci].astype(out_dtype)
            * weight[co, rco, rh, rw, rci, ci].astype(out_dtype),
            axis=[rco, rh, rw, rci],
        ),
        name="grouped_conv2d_nchwc",
        attrs={_ANNOTATION: "grouped_conv2d_nchwc"},
    )


def _legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    a = call.attrs
    data_m, out_m = _NCHWC.match(str(a.data_layout)), _NCHWC.match(str(a.out_layout))
    kern_m = _OIHWIO.match(str(a.kernel_layout))
    if not (data_m and out_m and kern_m):
        default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
        return default(bb, call)
    groups = int(a.groups)
    if groups == 1:
        return call_conv_te(bb, call, conv2d_nchwc_te, "conv2d_nchwc")
    data = [int(d) for d in call.args[0].ty.shape.values]
    if groups == data[1] * data[4]:
        return call_conv_te(bb, call, depthwise_conv2d_nchwc_te, "depthwise_conv2d_nchwc")

    def grouped(data, weight, strides, padding, dilation, out_dtype):  # noqa: ANN001, ANN202, PLR0913
        return grouped_conv2d_nchwc_te(data, weight, strides, padding, dilation, out_dtype, groups)

    return call_conv_te(bb, call, grouped, "grouped_conv2d_nchwc")


def call_conv_te(bb: relax.BlockBuilder, call: relax.Call, compute, name: str) -> relax.Expr:  # noqa: ANN001
    """Legalize a Relax conv2d ``call`` through a TE ``compute(data, weight, strides,
    padding, dilation, out_dtype)`` (the packed and NHWC conv computes share this)."""
    a = call.attrs
    out_dtype = str(a.out_dtype)
    if out_dtype in ("", "void", "None"):
        out_dtype = str(call.args[0].ty.dtype)
    return bb.call_te(
        compute,
        call.args[0],
        call.args[1],
        list(a.strides),
        list(a.padding),
        list(a.dilation),
        out_dtype,
        primfunc_name_hint=name,
    )


def _fast_sigmoid(x: te.Tensor) -> te.Tensor:
    """sigmoid(x) = 1 / (1 + exp(-x)), with TOPI's polynomial exp."""
    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: 1 / (1 + e(*i)), name="sigmoid")


def _fast_silu(x: te.Tensor) -> te.Tensor:
    """silu(x) = x / (1 + exp(-x)) = x/2 * (1 + tanh(x/2)), with the rational tanh, one
    block.

    Why tanh, not exp: the polynomial exp is about 20 vector instructions (clamps, a
    rounding, a shift, a degree-7 polynomial) before SiLU's own add and division; the
    rational tanh about 14 with its division. A conv's SiLU epilogue runs once per output,
    so on a thin conv it costs as much as the conv: EfficientNet-B0 spent about 20% of
    its time in SiLU on a Zen 3 (timed with SiLU computed as ReLU), and ran 0.96-0.97x the
    exp form's time with this one (two runs of 9 and 11 paired rounds). Accuracy: 1.6e-7 of
    float64's silu relative to max(|x|, 1), about an ulp (the exp form: 9e-8); the test
    ``test_fast_silu_matches_float64`` holds it to 4e-7."""

    def value(*i):  # noqa: ANN002, ANN202
        half = _f32(0.5) * x(*i)
        return half + half * fast_tanh_expr(half)

    return te.compute(x.shape, value, name="silu")


def _fast_gelu(x: te.Tensor) -> te.Tensor:
    """gelu(x) = x/2 * (1 + erf(x / sqrt 2)), rational erf, one block."""
    return te.compute(
        x.shape,
        lambda *i: 0.5 * x(*i) * (1 + fast_erf_expr(x(*i) * _f32(0.7071067811865476))),
        name="gelu",
    )


def _fast_gelu_tanh(x: te.Tensor) -> te.Tensor:
    """gelu(x) ~ x/2 * (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), with
    1 + tanh(u) = 2 - 2 / (1 + exp(2u)); one block."""

    def value(*i):  # noqa: ANN002, ANN202
        v = x(*i)
        u = _f32(0.7978845608028654) * (v + _f32(0.044715) * v * v * v)
        return 0.5 * v * (2 - 2 / (1 + fast_exp_expr(2 * u)))

    return te.compute(x.shape, value, name="gelu_tanh")


def _vector_math(op_name: str, fast) -> callable:  # noqa: ANN001
    """Legalize a float32 transcendental with a TOPI polynomial instead of libm.

    Why: LLVM has no vector ``exp``/``tanh`` without a vector math library, so the
    default legalization calls scalar ``expf`` once per lane (tanh twice). The TOPI
    approximations are plain arithmetic, so they vectorize; their error (about 1e-7
    relative) is far inside verification tolerances. Other dtypes keep the default.
    """

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if str(call.args[0].ty.dtype) != "float32":
            return tvm.ir.Op.get(op_name).get_attr("FLegalize")(bb, call)
        return bb.call_te(fast, call.args[0], primfunc_name_hint=op_name.split(".")[-1])

    return legalize


LEGALIZE = {
    "relax.nn.conv2d": _legalize_conv2d,
    "relax.sigmoid": _vector_math("relax.sigmoid", _fast_sigmoid),
    "relax.tanh": _vector_math("relax.tanh", topi.fast_tanh),
    "relax.exp": _vector_math("relax.exp", topi.fast_exp),
    "relax.nn.silu": _vector_math("relax.nn.silu", _fast_silu),
    "relax.nn.gelu": _vector_math("relax.nn.gelu", _fast_gelu),
    "relax.nn.gelu_tanh": _vector_math("relax.nn.gelu_tanh", _fast_gelu_tanh),
}


# --- 3. schedule rules ------------------------------------------------------------------
def _extent(sch: s_tir.Schedule, loop) -> int | None:  # noqa: ANN001
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _iter_kinds(sch: s_tir.Schedule, block) -> list[str]:  # noqa: ANN001
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return [kinds.get(iv.iter_type, "O") for iv in sch.get(block).iter_vars]


def _root_blocks(sch: s_tir.Schedule) -> list:
    """The blocks under the kernel's root block; none for a kernel without one (a
    hand-written loop nest such as the RNN sequence kernel, or an extern call): no
    rule's kernel."""
    try:
        root = sch.get_sblock("root")
    except ScheduleError:
        return []
    return list(sch.get_child_blocks(root))


def _annotation(sch: s_tir.Schedule, block) -> str | None:  # noqa: ANN001
    value = sch.get(block).annotations.get(_ANNOTATION)
    return str(value) if value is not None else None


def _buffer_shape(sch: s_tir.Schedule, block) -> list:  # noqa: ANN001
    writes = sch.get(block).writes
    return [str(d) for d in writes[0].source.shape] if len(writes) == 1 else []


def _inline_epilogue(sch: s_tir.Schedule, block) -> None:  # noqa: ANN001
    """Fold every elementwise consumer chain into ``block`` (which then writes the result)."""
    shape = _buffer_shape(sch, block)
    progress = True
    while progress:
        progress = False
        for consumer in sch.get_consumers(block):
            if _buffer_shape(sch, consumer) != shape:
                continue  # a broadcast (an SE gate times the feature map) stays a loop nest
            try:
                sch.reverse_compute_inline(consumer)
            except ScheduleError:
                continue
            progress = True
            break


def _inline_tail(sch: s_tir.Schedule, block) -> None:  # noqa: ANN001
    """Fold the unpack and every elementwise consumer chain into ``block`` (the register
    tile's write-back), whatever their shape: reverse_compute_inline refuses what it
    cannot express (a broadcast that reads one value for many outputs stays a loop nest;
    TVM 0.27 reports a squeeze-excitation gate broadcast over a map with an internal
    error, not a schedule error)."""
    progress = True
    while progress:
        progress = False
        for consumer in sch.get_consumers(block):
            try:
                sch.reverse_compute_inline(consumer)
            except (ScheduleError, tvm.error.InternalError):
                continue
            progress = True
            break


def _inline_spatial_intermediates(sch: s_tir.Schedule, keep: list) -> None:  # noqa: ANN001
    """compute_inline every spatial block except ``keep``, blocks that write outputs, and
    blocks whose inlining would copy a large expression (:func:`_duplicates_work`)."""
    keep_names = {sch.get(b).name_hint for b in keep}
    progress = True
    while progress:
        progress = False
        for block in _root_blocks(sch):
            if sch.get(block).name_hint in keep_names or "R" in _iter_kinds(sch, block):
                continue
            if _duplicates_work(sch, block):
                keep_names.add(sch.get(block).name_hint)
                continue
            try:
                sch.compute_inline(block)
            except ScheduleError:
                continue
            progress = True
            break


# A producer whose value prints longer than this is not copied into a consumer that reads
# it more than once.
_MAX_DUPLICATED_EXPR = 400


def _duplicates_work(sch: s_tir.Schedule, block) -> bool:  # noqa: ANN001
    """Whether inlining ``block`` copies a large expression into a consumer that reads it
    more than once.

    Why: TOPI's tanh reads its input several times, so x = sigmoid(x) * tanh(x) repeated
    n times grows exponentially when each x is inlined (3 times: 18 s, 4 times: 475 s of
    compile time), and the kernel recomputes every copy. Such a producer stays a loop
    nest of its own (one store and load per element).
    """
    writes = sch.get(block).writes
    if len(writes) != 1:
        return False
    size = len(str(sch.get(block).body))
    if size <= _MAX_DUPLICATED_EXPR:
        return False
    # TVM 0.27 exposes no Python TIR visitor; the printed body names each buffer load.
    name = writes[0].source.name + "["
    return any(str(sch.get(c).body).count(name) > 1 for c in sch.get_consumers(block))


def _product(values) -> int:  # noqa: ANN001
    out = 1
    for v in values:
        out *= v
    return out


def _schedule_spatial(sch: s_tir.Schedule, block, lanes: int) -> None:  # noqa: ANN001
    """Parallel + vectorized loop nest for one all-spatial (injective) root block.

    The innermost loop (joined with its neighbour when thinner than half a vector) is
    vectorized, so index arithmetic and bounds checks (pads) stay in the outer loops;
    everything outside it is fused into one parallel loop. An inner loop TVM cannot
    vectorize (not a multiple of the vector, longer than 4 of them: a padded RGB row's
    230 x 3 values) stays a serial loop over contiguous values, left to LLVM, unless the
    outer loops are too few to share (_SERIAL_INNER_MIN_ROWS). Fused into the parallel
    loop as well, each value paid its own index division: the padding took 0.23 ms on a
    Zen 3 for MobileNetV2's stem, as long as the conv itself.
    """
    loops = list(sch.get_loops(block))
    if not loops:
        return
    extents = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        return
    total = _product(extents)
    transpose = _thin_transpose(sch, block, loops, lanes)
    if transpose is not None:
        wide, thin = transpose
        rest = [lp for i, lp in enumerate(loops) if i not in transpose]
        sch.reorder(*rest, loops[wide], loops[thin])
        sch.unroll(loops[thin])
        _parallel_outer(sch, rest, total)
        return
    inner = loops.pop()
    if extents[-1] < lanes // 2 and loops:
        inner = sch.fuse(loops.pop(), inner)
    width = _extent(sch, inner)
    if width > 4 * lanes and width % lanes == 0:
        rest, inner = sch.split(inner, [None, lanes])
        loops.append(rest)
    if width % lanes == 0 or width <= 4 * lanes:
        sch.vectorize(inner)
    elif not loops or _product(_extent(sch, lp) for lp in loops) < _SERIAL_INNER_MIN_ROWS:
        loops.append(inner)
    _parallel_outer(sch, loops, total)


def _parallel_outer(sch: s_tir.Schedule, loops: list, total: int) -> None:
    """``loops`` fused into one parallel loop, where the nest has work enough to share."""
    if loops and total >= _PARALLEL_MIN:
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def _thin_transpose(sch: s_tir.Schedule, block, loops: list, lanes: int) -> tuple | None:  # noqa: ANN001
    """(wide, thin): positions in ``loops`` of a block that moves a thin axis (fewer than
    half a vector: an RGB image's channels) to the innermost place, or from it: one of
    the two loops alone indexes the write's last dimension, the other the read's; ``thin``
    is shorter than half a vector, ``wide`` a vector or longer. None for anything else.

    Such a block is left to LLVM as ``wide`` serial over ``thin`` unrolled: its loop
    vectorizer turns the unrolled copies into whole vectors and an interleaving store (or
    a de-interleaving load). Vectorized by TVM along either axis, every value was a
    gather or a scatter: a 224x224 RGB image's NCHW -> NCHW3c transform took 43-75 us on
    2 cores of a Xeon, 7.7 us this way (0.975x MobileNetV2's time, paired)."""
    node = sch.get(block)
    if len(node.reads) != 1 or len(node.writes) != 1:
        return None
    values = _block_iter_values(sch, block)

    def indexing(expr) -> list[int]:  # noqa: ANN001
        used = [iv.var for iv in node.iter_vars if _uses_var(expr, iv.var)]
        return [
            i
            for i, lp in enumerate(loops)
            if any(
                _uses_var(v, sch.get(lp).loop_var)
                for iv, v in zip(node.iter_vars, values, strict=True)
                if any(iv.var.same_as(u) for u in used)
            )
        ]

    (read,), (write,) = node.reads, node.writes
    if len(read.region) < 2 or len(write.region) < 2:
        return None
    ends = indexing(write.region[-1].min), indexing(read.region[-1].min)
    if any(len(e) != 1 for e in ends) or ends[0] == ends[1]:
        return None
    thin, wide = sorted((e[0] for e in ends), key=lambda i: _extent(sch, loops[i]))
    if _extent(sch, loops[thin]) >= lanes // 2 or _extent(sch, loops[wide]) < lanes:
        return None
    return wide, thin


def _select_chain(sch: s_tir.Schedule, block) -> int:  # noqa: ANN001
    """How many ``if_then_else`` the block's value takes (a concat of n inputs: n - 1)."""
    # TVM 0.27 exposes no Python TIR visitor; the printed body names each call.
    return str(sch.get(block).body).count("if_then_else")


def _schedule_concat(sch: s_tir.Schedule, block, lanes: int) -> bool:  # noqa: ANN001
    """A concat of many inputs along its outermost non-unit axis: that axis unrolled.

    Why: TOPI's concat picks its input with an ``if_then_else`` chain per element; in a
    vectorized loop every branch is evaluated (with an RNN's last step fused in, that is
    the whole step's math for every element). Unrolled over the concat axis, each copy's
    conditions are constants and simplify away, leaving one vectorized copy per input.
    """
    loops = list(sch.get_loops(block))
    extents = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        return False
    axis = next((i for i, e in enumerate(extents) if e > 1), None)
    if axis is None or axis == len(loops) - 1 or extents[axis] > _MAX_UNROLLED_CONCAT:
        return False
    inner = loops[axis + 1 :]
    inner = sch.fuse(*inner) if len(inner) > 1 else inner[0]
    width = _product(extents[axis + 1 :])
    if width % lanes == 0:
        _, vec = sch.split(inner, [None, lanes])
        sch.vectorize(vec)
    sch.unroll(loops[axis])
    return True


def _smallest_divisor(extent: int) -> int:
    """The smallest divisor of ``extent`` from 2 to _MAX_TILE_VECTORS, or 1."""
    return next((d for d in range(2, _MAX_TILE_VECTORS + 1) if extent % d == 0), 1)


def _pick_rows(height: int, vectors: int) -> int:
    """Output rows per reduction register tile: a divisor of ``height`` with
    ``rows * vectors`` accumulators, at most _MAX_TILE_VECTORS of them."""
    for n in range(min(height, _MAX_TILE_VECTORS // max(vectors, 1)), 0, -1):
        if height % n == 0:
            return n
    return 1


def _pick_reg_n(width: int, most: int) -> int:
    """Largest divisor of the output width that fits the register tile (``most`` pixels)."""
    for n in range(min(width, max(most, 1)), 0, -1):
        if width % n == 0:
            return n
    return 1


def _fullest_row_tile(extents: list, widths: list, lanes: int) -> int | None:
    """A matmul's row-tile width: among the whole-vector ``widths`` dividing N, the one
    whose register tile (rows x vectors) holds the most accumulators, the wider on a tie;
    None where none divides N or there are no rows (the reduction rule's own choice).

    Why: the widest width that divides N can leave no rows to tile (ConvNeXt's 7x7 stage:
    64 lanes x 1 row is 4 FMAs per broadcast; 32 lanes x 7 rows is 14), and a tile of a
    single row reloads every weight vector for one FMA."""
    axis = max((i for i, e in enumerate(extents[:-1]) if e > 1), default=None)
    fits = [v for v in widths if extents[-1] % v == 0 and v % lanes == 0]
    if axis is None or not fits:
        return None
    return max(fits, key=lambda v: (_pick_rows(extents[axis], v // lanes) * (v // lanes), v))


def _weight_bytes(sch: s_tir.Schedule, block, width: int) -> int:  # noqa: ANN001
    """K x N of a matmul block (its reduction extents times the output width), in bytes of
    its output type."""
    stmt = sch.get(block)
    reduce = tirx.IterVar.CommReduce
    k = _product(int(iv.dom.extent) for iv in stmt.iter_vars if iv.iter_type == reduce)
    return k * width * tvm.DataType(str(stmt.writes[0].source.dtype)).bits // 8


def _split_reduction_into_tile(
    sch: s_tir.Schedule,
    block,  # noqa: ANN001
    outer,  # noqa: ANN001
    plan: Plan = DEFAULT_PLAN,
    unroll_lanes: bool = False,
    init_at=None,  # noqa: ANN001
) -> None:
    """Under ``outer``: reductions first, then the spatial tile (unrolled, vectorized).

    ``plan.kernel_outer`` puts a conv's kernel window loops (rh, rw) outside its input
    channel chunk loop; ``plan.unroll_kw`` unrolls the kernel-width loop too;
    ``unroll_lanes`` the innermost reduction loop (a conv's input-channel lanes);
    ``init_at``: a reduction loop above ``outer`` the accumulators' initialization goes
    before (:func:`_stream_reduction`'s steps), instead of the first reduction under it."""
    loops = _loops_below(sch, block, outer)
    kinds = _loop_kinds(sch, block, loops)
    spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
    # a conv's kernel-width loop: rw of (rco, rh, rw, rci), or of a depthwise (rh, rw)
    kw = reduce[2] if len(reduce) == 4 else reduce[-1] if len(reduce) == 2 else None
    if plan.kernel_outer and len(reduce) == 4:  # (rco, rh, rw, rci) -> (rh, rw, rco, rci)
        reduce = [reduce[1], reduce[2], reduce[0], reduce[3]]
    sch.reorder(*reduce, *spatial)
    if spatial:
        sch.vectorize(spatial[-1])
        for lp in spatial[:-1]:
            if (_extent(sch, lp) or 0) > 1:
                sch.unroll(lp)
    if plan.unroll_kw and kw is not None:
        sch.unroll(kw)
    if unroll_lanes and reduce:
        sch.unroll(reduce[-1])
    if reduce:
        init = sch.decompose_reduction(block, reduce[0] if init_at is None else init_at)
        init_loops = _loops_below(sch, init, outer if init_at is None else None)
        if init_loops:
            sch.vectorize(init_loops[-1])


def _loops_below(sch: s_tir.Schedule, block, outer) -> list:  # noqa: ANN001
    """The loops around ``block`` nested inside ``outer`` (all of them if None)."""
    loops = list(sch.get_loops(block))
    if outer is None:
        return loops
    target = sch.get(outer)
    for i, lp in enumerate(loops):
        if sch.get(lp).same_as(target):
            return loops[i + 1 :]
    raise ValueError("outer loop does not enclose the block")


def _loop_kinds(sch: s_tir.Schedule, block, loops) -> list[str]:  # noqa: ANN001
    """'S' or 'R' per loop, by which block iter var its loop var feeds."""
    iter_kinds = _iter_kinds(sch, block)
    values = _block_iter_values(sch, block)
    out = []
    for lp in loops:
        var = sch.get(lp).loop_var
        kind = "S"
        for value, k in zip(values, iter_kinds, strict=True):
            if k == "R" and _uses_var(value, var):
                kind = "R"
        out.append(kind)
    return out


def _block_iter_values(sch: s_tir.Schedule, block) -> list:  # noqa: ANN001
    get_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")
    return list(get_realize(sch, block).iter_values)


def _uses_var(expr, var) -> bool:  # noqa: ANN001
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr, []))


def _other_root_blocks(sch: s_tir.Schedule, handled: list) -> list:
    names = {sch.get(b).name_hint for b in handled}
    return [b for b in _root_blocks(sch) if sch.get(b).name_hint not in names]


def _schedule_others(sch: s_tir.Schedule, blocks: list, lanes: int) -> s_tir.Schedule | None:
    """Parallel+vector for leftover spatial root blocks (pads); decline if any reduces."""
    for block in blocks:
        if "R" in _iter_kinds(sch, block):
            return None
        _schedule_spatial(sch, block, lanes)
    return sch


def _conv_family(sch: s_tir.Schedule, block) -> str | None:  # noqa: ANN001
    """The rule name for a packed conv anchor: its family (1x1 dense convs: pointwise)."""
    kind = _annotation(sch, block)
    if kind == "conv2d_nchwc":
        dom = [int(iv.dom.extent) for iv in sch.get(block).iter_vars]
        return "pointwise_nchwc" if dom[6] == dom[7] == 1 else "conv2d_nchwc"
    return {
        "depthwise_conv2d_nchwc": "depthwise_nchwc",
        "grouped_conv2d_nchwc": "grouped_nchwc",
    }.get(kind)


def _packed_conv_rule(family: str):  # noqa: ANN202
    """The packed-conv rule that takes only convs of ``family`` (its name in RULES)."""

    def rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        anchors = [b for b in _root_blocks(sch) if _annotation(sch, b) in _PACKED_CONVS]
        if len(anchors) != 1 or _conv_family(sch, anchors[0]) != family:
            return None
        return rule_conv2d_nchwc(func, target)

    rule.__name__ = f"rule_{family}"
    rule.__doc__ = f"{family} convs: :func:`rule_conv2d_nchwc`."
    return rule


_PACKED_CONVS = ("conv2d_nchwc", "depthwise_conv2d_nchwc", "grouped_conv2d_nchwc")


def rule_conv2d_nchwc(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Packed conv (dense, pointwise, depthwise or grouped) plus its fused epilogue.

    Why: conv is >90% of a CNN's time. The output tile [reg_n pixels x one channel block]
    stays in registers over the whole reduction (ic chunk, kh, kw, ic lane), each step one
    weight vector load, reg_n broadcasts and reg_n FMAs; bias/BN/ReLU/residual adds are
    applied on the way out of the registers; (n, oc chunk, row) loops run in parallel.
    """
    return schedule_conv2d_nchwc(s_tir.Schedule(func), target)


def schedule_conv2d_nchwc(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: Decisions = DEFAULTS,
    plan: Plan = DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """:func:`rule_conv2d_nchwc` on ``sch``, its choices from ``decisions`` and ``plan``
    (the register tile's pixels, and rows with ``plan.rows``; the channel block is the
    layout's, fixed before scheduling)."""
    anchors = [b for b in _root_blocks(sch) if _annotation(sch, b) in _PACKED_CONVS]
    if len(anchors) != 1:
        return None
    conv = anchors[0]
    lanes = vector_lanes(target)
    depthwise = _annotation(sch, conv) == "depthwise_conv2d_nchwc"
    # A dense conv reads each input pixel kh*kw*oc times: its padding stays a separate
    # parallel pass, since inlined it would put a bounds check in the innermost loop. A
    # depthwise conv is memory bound, so its padding is inlined (one pass less; the check
    # is per pixel, not per lane, so the loads still vectorize). A thin input's (an RGB
    # image, 3 channels innermost) too stays a pass of its own: inlined, ResNet-50's 7x7
    # stem ran at 65 GFLOP/s on a Zen 3, on its own pass and 2 blocks x 4 pixels at 139.
    pads = [b for b in sch.get_producers(conv) if "pad" in sch.get(b).name_hint]
    _inline_spatial_intermediates(sch, keep=[conv] if depthwise else [conv, *pads])
    flat = plan == DEFAULT_PLAN and _flatten_pixels(sch, conv, max_reg_n(target))
    out = sch.cache_write(conv, 0, "local")
    if flat:  # the epilogue writes the kernel's (rows, columns) output from flat pixels
        _inline_tail(sch, out)
    else:
        _inline_epilogue(sch, out)
    others = _other_root_blocks(sch, [conv, out])
    loops = sch.get_loops(out)
    if flat:  # one row of all the pixels: the nest below is the same as a 2-D map's
        n, co, pixels_loop, ci = loops
        loops = [n, co, *sch.split(pixels_loop, [1, None]), ci]
    if len(loops) != 5:
        return None
    n, co, y, x, ci = loops
    width = _extent(sch, x)
    most = max_reg_n(target)
    blocks, rows, pixels = 1, 1, None
    if not plan.rows and _annotation(sch, conv) == "conv2d_nchwc":
        extents = (_extent(sch, co), _extent(sch, y), width)
        window = _has_window(sch, conv)
        blocks, rows, pixels = _channel_blocks_tile(*extents, most, window=window)
    if blocks > 1:
        co, cob = sch.split(co, [None, blocks])
    factors = []
    tile = _register_tile(
        sch, (y, x), decisions, plan, _block_pixels(most, blocks), rows, pixels, factors
    )
    if tile is None:
        return None
    xo, xi, tile_loops = tile
    full = (_extent(sch, xi) or 1) * blocks > most
    if tile_loops is not None:
        yo, yi = tile_loops
        sch.reorder(yo, xo, yi, xi)
        y = yo
    if blocks > 1:  # (.., y, x chunk, channel block, [rows,] pixels, lanes)
        sch.reorder(y, xo, cob)
    stream = (
        plan == DEFAULT_PLAN
        and _annotation(sch, conv) == "conv2d_nchwc"
        and tile_loops is None
        and pixels is None
        and _streams_weights(sch, conv, _extent(sch, co), _extent(sch, y), width)
    )
    if stream or plan.parallel_loops != 3:
        outer = sch.fuse(n, co)
    elif _rows_outer(sch, conv, _extent(sch, co), _extent(sch, y)) != plan.swap_outer:
        sch.reorder(y, co)
        outer = sch.fuse(n, y, co)
    else:
        outer = sch.fuse(n, co, y)
    sch.parallel(outer)
    sch.vectorize(ci)
    sch.compute_at(conv, outer if stream else xo)
    if blocks > 1:
        sch.unroll(cob)
    if tile_loops is not None:
        sch.unroll(tile_loops[1])
    sch.unroll(xi)
    # A tile past the accumulator budget (a prime row's whole width, _tile_pixels) leaves
    # one spare register: LLVM's own unroll of the lane loop by 2 then spilled accumulators
    # to the stack (SqueezeNet's 13-wide 512->1000 classifier: 63-75 GFLOP/s; unrolled
    # here, 93-97). Tiles within the budget run as fast or faster without it (a 7-wide
    # row: 102 against 71).
    if stream:
        _stream_reduction(sch, conv, outer, factors[0], decisions, full)
    else:
        _split_reduction_into_tile(sch, conv, xo, plan, unroll_lanes=full)
    done = _schedule_others(sch, others, lanes)
    if done is not None and stream:
        prefetch_streamed(done)
    return done


def rule_depthwise_pointwise(
    func: tirx.PrimFunc, target: tvm.target.Target
) -> s_tir.Schedule | None:
    """A depthwise conv fused with the 1x1 conv that reads it
    (:mod:`graphopt.targets._fuse_dwpw`): :func:`schedule_depthwise_pointwise`."""
    return schedule_depthwise_pointwise(s_tir.Schedule(func), target)


def schedule_depthwise_pointwise(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: Decisions = DEFAULTS,
    plan: Plan = DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """The 1x1 conv's output rows in parallel; under each row, first the depthwise conv's
    row for all its channels (its epilogue applied on the way out of the registers, into a
    row buffer of a few KB), then the 1x1 conv's register tiles over that row, as
    :func:`schedule_conv2d_nchwc` tiles a pointwise conv.

    Why: apart, the depthwise conv writes a map six times the block's width and the 1x1
    conv reads it back, half of it from the other core's cache. MobileNetV2's blocks on a
    2-core Xeon, each kernel timed alone (so without that traffic): fused, 0.89-0.98x the
    two apart from 14 rows up. ``decisions`` choose both register tiles' pixels; ``plan``
    the 1x1 conv's reduction order (:func:`_split_reduction_into_tile`)."""
    convs = [b for b in _root_blocks(sch) if _annotation(sch, b) in _PACKED_CONVS]
    kinds = sorted(_annotation(sch, b) for b in convs)
    if kinds != ["conv2d_nchwc", "depthwise_conv2d_nchwc"]:
        return None
    dw, pw = sorted(convs, key=lambda b: _annotation(sch, b) != "depthwise_conv2d_nchwc")
    # the padding and the depthwise epilogue inlined up to the block the 1x1 conv reads
    # (a hardswish reads its input twice: a chain no longer), which goes to the row
    _inline_spatial_intermediates(sch, keep=[dw, pw, *sch.get_producers(pw)])
    row_out = sch.cache_write(dw, 0, "local")
    _inline_epilogue(sch, row_out)
    out = sch.cache_write(pw, 0, "local")
    _inline_epilogue(sch, out)
    if _other_root_blocks(sch, [dw, row_out, pw, out]):
        return None
    loops = sch.get_loops(out)
    if len(loops) != 5:
        return None
    n, co, y, x, ci = loops
    most = max_reg_n(target)
    blocks, _, pixels = _channel_blocks_tile(_extent(sch, co), 1, _extent(sch, x), most)
    if pixels is not None:  # a padded tile: one block instead
        blocks = 1
    if blocks > 1:
        co, cob = sch.split(co, [None, blocks])
    tile = _register_tile(sch, (y, x), decisions, DEFAULT_PLAN, _block_pixels(most, blocks))
    xo, xi, _ = tile
    sch.reorder(y, co, xo, *([cob] if blocks > 1 else []), xi)
    row = sch.fuse(n, y)
    sch.parallel(row)
    sch.vectorize(ci)
    sch.compute_at(pw, xo)
    if blocks > 1:
        sch.unroll(cob)
    sch.unroll(xi)
    full = (_extent(sch, xi) or 1) * blocks > most
    _split_reduction_into_tile(sch, pw, xo, plan, unroll_lanes=full)
    # the depthwise row: ([channel chunk,] pixel, lane) once compute_at dropped n and y
    sch.compute_at(row_out, row)
    pixel, lanes = [lp for lp in _loops_below(sch, row_out, row) if (_extent(sch, lp) or 0) > 1][
        -2:
    ]
    width = _extent(sch, pixel)
    factor = decisions.factor(sch, width, _tile_pixels(width, most), most)
    po, pi = sch.split(pixel, [None, factor])
    sch.compute_at(dw, po)
    sch.unroll(pi)
    sch.vectorize(lanes)
    _split_reduction_into_tile(sch, dw, po)
    return sch


def _has_window(sch: s_tir.Schedule, conv) -> bool:  # noqa: ANN001
    """Whether a packed conv's kernel has more than one tap (3x3 and the like, not 1x1):
    its weight is ``OIHW[bi]i[bo]o``, the window in dims 2 and 3."""
    return _product(int(d) for d in sch.get(conv).reads[1].source.shape[2:4]) > 1


def _flatten_pixels(sch: s_tir.Schedule, conv, most: int) -> bool:  # noqa: ANN001
    """Make a 1x1 stride-1 dense conv (and every block of its epilogue) iterate over its
    output's pixels as one loop, rows times columns long, where that loop takes a cheaper
    register tile than a row does (:func:`_channel_blocks_choice`); the intermediate
    buffers become flat too. Returns whether it did. Nothing else changes: the block and
    buffer transforms are bijective re-indexings, and the pixels of an NCHWc map are
    contiguous, so the input's address is the flat pixel's.

    Why: a row's tile must divide the row or pad it. A 7-wide row on AVX2 (12
    accumulators) takes two blocks by 4 pixels, 8 tiled for 7 (14% of the FMAs
    wasted); the 49 pixels of the whole 7x7 map take two blocks by 5, 50 tiled for 49
    (2%). ResNet-50's 7x7 stage on a Zen 3 (AVX2), its stride-1 1x1 convs alone:
    2048->512 and 512->2048 about 0.85x their time; ResNet-50 as an artifact 0.981x and
    0.970x over 31 and 41 paired rounds, against A/A pairs' 0.995 and 0.992. With
    AVX-512 (two blocks by 7 pixels) and on 14-, 28- and 56-wide rows the row's tile is
    as cheap, and nothing changes; a 13x13 map (SqueezeNet) is flattened. Strided and
    padded convs are not: their input's pixels are not the output's.

    Only a conv with an epilogue (bias, residual add, activation, a gate's multiply:
    the blocks that write the kernel's (row, column) output from the flat pixels), each
    of its blocks writing the output's shape over five spatial iterators, and channel
    chunks enough for the threads without rows (_STREAM_MIN_CHUNKS) is flattened; else
    the kernel keeps its rows. Only the default plan flattens; in the tuning space the
    other plans keep the rows. The trace holds ``transform_layout``, whose index map
    TVM 0.27 cannot write into a tuning record: the database writes it itself
    (``graphopt.tuning._database.record_json``)."""
    if _annotation(sch, conv) != "conv2d_nchwc":
        return False
    st = sch.get(conv)
    data = st.reads[0].source
    _, blocks, height, width, _ = (int(d) for d in st.writes[0].source.shape)
    if _has_window(sch, conv) or [int(d) for d in data.shape[2:4]] != [height, width]:
        return False
    if height == 1 or blocks // 2 < _STREAM_MIN_CHUNKS:
        return False  # one row already, or too few channel chunks to share without rows
    _, by_rows = _channel_blocks_choice(blocks, height, width, most)
    _, flat = _channel_blocks_choice(blocks, 1, height * width, most)
    if flat >= by_rows:
        return False
    allocated = sch.get(sch.get_sblock("root")).alloc_buffers

    def writes_intermediate(block) -> bool:  # noqa: ANN001 - else the kernel's output
        return any(sch.get(block).writes[0].source.same_as(a) for a in allocated)

    if not writes_intermediate(conv):
        return False  # the conv writes the kernel's output: no epilogue to write its rows
    epilogue = [b for b in _root_blocks(sch) if not sch.get(b).same_as(st)]
    if any(
        _iter_kinds(sch, b) != ["S"] * 5 or _buffer_shape(sch, b) != _buffer_shape(sch, conv)
        for b in epilogue
    ):
        return False

    def pixels(n, c, y, x, i):  # noqa: ANN001, ANN202
        return (n, c, y * width + x, i)

    sch.transform_block_layout(
        conv,
        tirx.IndexMap.from_func(
            lambda n, c, y, x, i, *reduce: (*pixels(n, c, y, x, i), *reduce),
            ndim=len(st.iter_vars),
        ),
    )
    sch.transform_layout(conv, ("write", 0), pixels)
    for block in epilogue:
        sch.transform_block_layout(block, pixels)
        if writes_intermediate(block):
            sch.transform_layout(block, ("write", 0), pixels)
    return True


def _streams_weights(sch: s_tir.Schedule, conv, chunks: int, rows: int, width: int) -> bool:  # noqa: ANN001
    """Whether a dense packed conv streams its weights (:func:`_stream_reduction`): they
    are at least _STREAM_WEIGHT_BYTES (so inside a model they come from memory, not from
    a cache the previous call left them in), the rule walks the channel chunks outside
    the rows (:func:`_rows_outer`), the map has more than one row and column, and there
    are chunks enough for the threads to share without the rows (_STREAM_MIN_CHUNKS).

    Tried and left out (2-core Zen 3, AVX2, 2026-12-06): strided convs not streaming. A
    30-minute search kept records for two of ResNet-50's strided convs in plans that do
    not stream (its 1024 -> 2048 downsample 0.88x its default inside the model, a 3x3
    0.96x); with every strided conv unstreamed, ResNet-50 as an artifact ran 0.999x the
    time (0.994-1.004) over 21 paired rounds, against an A/A of 0.998."""
    weight = sch.get(conv).reads[1].source
    return (
        _bytes(weight) >= _STREAM_WEIGHT_BYTES
        and chunks >= _STREAM_MIN_CHUNKS
        and rows > 1
        and width > 1
        and not _rows_outer(sch, conv, chunks, rows)
    )


def _stream_reduction(
    sch: s_tir.Schedule,
    conv,  # noqa: ANN001
    outer,  # noqa: ANN001
    factor,  # noqa: ANN001
    decisions: Decisions,
    unroll_lanes: bool,
) -> None:
    """A conv computed for a whole channel chunk under ``outer``: its input channel chunks
    in steps of _STREAM_CHUNKS outermost, the register tiles of every row inside each step.

    Why: the default nest computes one register tile over all the input channels, then
    the next, so the chunk's weights come from memory while its first tile runs and from
    the cache for the others: inside a model (the weights not cached from the previous
    call) that first tile waits on memory and the rest on nothing. Taking the input
    channels in steps for all tiles at once reads the weights from memory in small parts
    spread over the whole chunk, each part reused from L1 by every tile, so the loads
    overlap the FMAs; the accumulators go to the chunk's output buffer (a few KB, in L1)
    between steps. Data and output traffic do not change.

    ``factor``: the pixel split's factor as the output's split took it (an int or a
    sampled choice); the step is a choice of ``decisions``, _STREAM_CHUNKS by
    default. Measured on a 2-core Xeon (AVX-512), paired against the default nest:
    ResNet-50 1.041x faster (its 1024->256 1x1 convs at 14x14, 1.93 -> 1.53 ms in the
    model), DenseNet-121 and EfficientNet-B0 1.012x, ResNet-18 1.009x, the others within
    0.5% (MobileNetV2, MobileNetV3-large, VGG-11, GoogLeNet, ResNet-18 at batch 8,
    0.997-1.005x). On ResNet-50 steps of 4 and 8
    chunks did as well, 16 1.031x, 32 1.014x; streaming weights from 128 KiB up instead
    of 1 MiB made ResNet-18, ResNet-50, MobileNetV2 and EfficientNet-B0 1-3% slower.
    Checked again on a 2-core Zen 4 (ResNet-50, 11 paired rounds, A/A 1.012): no conv
    streaming 1.019x the time, steps of 8 chunks 1.002x. Tried and left out there: the
    14x14 1x1 convs unstreamed, one output channel pair per parallel iteration, each
    tile's reduction steps prefetching the next pair's weights (1-2 lines a step). Alone
    they ran 7-10% faster, and inside the model (``graphopt profile``) 6-11%, but
    ResNet-50 as an artifact ran 1.014x and 1.003x the time (15 paired rounds, A/A
    1.005); with the 7x7 and 3x3 convs unstreamed too, 1.025x (A/A 1.012)."""
    loops = _loops_below(sch, conv, outer)
    kinds = _loop_kinds(sch, conv, loops)
    # compute_at leaves no loop of extent 1: (channel block,) row, pixel, lane
    spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S" and _extent(sch, lp) > 1]
    rco = next(lp for lp, k in zip(loops, kinds, strict=True) if k == "R")
    *cob, y, x, lanes = spatial
    xo, xi = sch.split(x, [None, factor])
    chunks = _extent(sch, rco)
    step = max(d for d in range(1, min(_STREAM_CHUNKS, chunks) + 1) if chunks % d == 0)
    ro, _ = sch.split(rco, [None, decisions.factor(sch, chunks, step, 4 * step)])
    sch.reorder(ro, y, xo, *cob, xi, lanes)  # the rest of the reduction stays below xo
    _split_reduction_into_tile(sch, conv, xo, unroll_lanes=unroll_lanes, init_at=ro)


def _rows_outer(sch: s_tir.Schedule, conv, chunks: int, rows: int) -> bool:  # noqa: ANN001
    """Whether a packed conv's parallel loop takes its output rows outside its output
    channel chunks (n, row, chunk), rather than inside them (n, chunk, row).

    Why: with the chunks outside, each chunk's weights stay in cache over all the rows,
    but the whole input is read once per chunk; with the rows outside, one row of the
    input (all its channels) stays in cache over all the chunks, but all the weights are
    read once per row. The order that reads fewer bytes again is taken. MobileNetV2's
    56x56 144->24 projection: the input (1.8 MB) read 3 times, or its 14 KB of weights
    56 times; ResNet-50's 7x7 2048->512: its 4 MB of weights 7 times, or its 400 KB input
    once per each of 32 chunks (of two blocks). Whole models on a Zen 3, paired against
    chunks outside everywhere: MobileNetV2 0.89, EfficientNet-B0 0.96. A depthwise conv
    reads each input channel for its own output channel only, so nothing is read again
    either way; it keeps the chunks outside, each thread streaming through its own
    channel planes (rows outside ran EfficientNet-B0's depthwise convs up to 1.5x slower).

    Seen on a Zen 3 (2026-12-06) and left to the tuning space (``Plan(swap_outer=True)``):
    ResNet-50's strided 3x3 convs ran 0.79-0.93x their time alone with the rows outside,
    against this rule's bytes; inside the model the 14x14 -> 7x7 one ran 1.21-1.24x
    slower so, its 9.4 MB of weights read from memory once per output row.
    """
    if _annotation(sch, conv) == "depthwise_conv2d_nchwc":
        return False
    data, weight = (region.source for region in sch.get(conv).reads[:2])
    return rows * _bytes(weight) < chunks * _bytes(data)


def _bytes(buffer) -> int:  # noqa: ANN001
    return _product(int(d) for d in buffer.shape) * tvm.DataType(buffer.dtype).bits // 8


def _register_tile(  # noqa: ANN202
    sch: s_tir.Schedule,
    rows_pixels: tuple,
    decisions: Decisions,
    plan: Plan,
    most: int,
    rows: int = 1,
    pixels: int | None = None,
    factors: list | None = None,
):
    """Split the output's pixel loop (and its row loop with ``plan.rows``, or into
    ``rows`` rows) into the register tile of at most ``most`` accumulators: returns (pixel
    chunk, pixels, (row chunk, rows) or None), or None to decline (a row tile where the
    rows have no divisor from 2 to _MAX_TILE_ROWS). ``pixels``: the tile's pixels where
    they need not divide the row (:func:`_channel_blocks_tile`'s padded tile); else the
    largest divisor that fits. ``factors``: a list the pixel split's factor (an int or a
    sampled choice) is appended to, for a second split that must follow it."""
    y, x = rows_pixels
    width = _extent(sch, x)
    tile_loops = None
    if plan.rows or rows > 1:
        height = _extent(sch, y)
        if plan.rows:
            rows = max((r for r in range(2, _MAX_TILE_ROWS + 1) if height % r == 0), default=1)
        if rows == 1:
            return None
        tile_loops = sch.split(y, [None, decisions.factor(sch, height, rows, _MAX_TILE_ROWS)])
    if pixels is not None:
        reg_n = pixels
    elif rows == 1:
        reg_n = _tile_pixels(width, most // rows)
    else:
        reg_n = _pick_reg_n(width, most // rows)
    factor = decisions.factor(sch, width, reg_n, most // rows)
    if factors is not None:
        factors.append(factor)
    xo, xi = sch.split(x, [None, factor])
    return xo, xi, tile_loops


def _tile_pixels(width: int, most: int) -> int:
    """Pixels of a one-row register tile of at most ``most`` accumulators per vector."""
    reg_n = _pick_reg_n(width, most)
    if 2 * reg_n <= most < width <= most + _SPARE_REGISTERS // 2:
        # A prime width just past the limit (SqueezeNet's 13 on AVX2's 12): the whole row,
        # its weight vector and broadcast still fit the registers; a divisor would be 1.
        return width
    return reg_n


def _block_pixels(most: int, blocks: int) -> int:
    """Pixels per channel block of a register tile of ``blocks`` output channel blocks,
    ``most`` being one block's accumulator budget: each further block holds one more
    weight vector, so its accumulators give up that register. Without it AVX-512's pair
    of 14-pixel tiles (28 accumulators, 2 weight vectors, a broadcast: 31 of 32 zmm)
    spilled, and ResNet-50 ran at 1.13x onnxruntime on a Zen 4 instead of 0.87x."""
    return (most - (blocks - 1)) // blocks


def _channel_blocks_tile(
    blocks: int, height: int, width: int, most: int, window: bool = False
) -> tuple[int, int, int | None]:
    """(output channel blocks, rows, padded pixels) of a dense conv's register tile; (1, 1,
    None) is one block by :func:`_tile_pixels` pixels of one row.

    Why: each reduction step of a tile of b blocks x p pixels loads b weight vectors and
    broadcasts p input values for b * p FMAs. One block (b = 1) is a load per FMA; with
    AVX2's 12 accumulators, two blocks by 4 pixels (6 loads for 8 FMAs) ran the ResNet-50
    bottleneck's 1x1 convs at 127-142 GFLOP/s instead of 94-104 on a Zen 3. Two blocks
    are taken when they load less per FMA and still keep _MIN_CHAINS accumulators (the
    FMA units' latency x count: fewer, and the FMAs wait on each other: 2 x 2 pixels of a
    14-wide row ran at 87 against one block's 112); rows (2 to _MAX_TILE_ROWS) where the
    width alone leaves too few pixels.

    Where no divisor of the row gives two blocks enough pixels (a 7-wide row on AVX2: 7
    is prime, 2 x 7 accumulators do not fit), the pixels need not divide the row
    (third element, not None): the last tile of the row is partly outside it, its extra
    pixels skipped, and the cost counts the pixels tiled, not those written. ResNet-50's
    7x7 stage on a Zen 3: 2 blocks x 4 pixels (8 tiled for 7) ran its 1x1 convs at
    135-151 GFLOP/s against one block x 7 pixels' 111-120, its strided 1x1 at 120-142
    against 89.

    A conv with a kernel window (``window``: 3x3 and the like) takes no row tiles: a
    14-wide map's 2 rows x 2 pixels ran its 3x3 convs slower than 2 blocks x 5 pixels
    padded (15 tiled for 14, as cheap by the cost), while 1x1 convs run faster in the
    rows. On a Zen 3 (AVX2), single convs as artifacts, paired in one process: 256->256
    stride 2 from 28x28 0.87x and 0.97x the time, 128->256 stride 2 0.79x and 0.88x,
    256->256 stride 1 (Winograd off) 0.84x; a 1024->256 1x1 at 14x14 1.05x. ResNet-18 and
    -50, one such conv each, within their A/A pairs' noise (0.988 and 1.022 over 31
    rounds, A/A 0.999 and 1.011).

    Tried and left out on AVX2 (Zen 3, 2026-12-06): four blocks by 3 pixels, padded
    (12 accumulators, the weights as the FMAs' memory operands, 7 loads for 12 FMAs as
    MLAS's NCHWc kernel does). ResNet-50's convs alone: 28- and 7-wide rows 0.83-0.96x
    their time, 56- and 14-wide rows (19 and 5 tiles of 3) 2.0-2.1x; no row gained enough
    to pay a rule for it. Nor on AVX-512 (Zen 4, 2026-12-07): four blocks by up to 6
    pixels (0.42-0.48 loads per FMA by the cost, against two blocks' 0.63), ResNet-50 as
    an artifact paired in one process 1.27x its time with padded tiles (6 pixels), 1.11x
    with 4 pixels where 4 divides the row (A/A 1.007, 0.998)."""
    return _channel_blocks_choice(blocks, height, width, most, window)[0]


def _channel_blocks_choice(
    blocks: int, height: int, width: int, most: int, window: bool = False
) -> tuple[tuple[int, int, int | None], float]:
    """:func:`_channel_blocks_tile`'s tile and its cost: loads per FMA, times the pixels
    tiled per pixel written."""
    one = _tile_pixels(width, most)
    best, best_cost = (1, 1, None), (1 + one) / one
    if blocks % 2:
        return best, best_cost
    pair = _block_pixels(most, 2)
    tile_rows = [] if window else [r for r in range(2, _MAX_TILE_ROWS + 1) if height % r == 0]
    for rows in [1, *tile_rows]:
        pixels = rows * _pick_reg_n(width, pair // rows)
        cost = (2 + pixels) / (2 * pixels)
        if 2 * pixels >= _MIN_CHAINS and cost < best_cost:
            best, best_cost = (2, rows, None), cost
    if best[0] == 1:
        for pixels in range(-(-_MIN_CHAINS // 2), pair + 1):
            tiled = -(-width // pixels) * pixels
            cost = (2 + pixels) / (2 * pixels) * tiled / width
            if pixels < width and cost < best_cost:
                best, best_cost = (2, 1, pixels), cost
    return best, best_cost


def rule_reduction(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """One reduction (matmul/dense, pooling, mean) plus elementwise prologue/epilogue.

    Why: the innermost output axis (Gemm's N, a packed channel block) is contiguous in
    both the output and the operand it comes from, so it is vectorized *inside* the
    reduction loops with the accumulators in registers; outer output loops run parallel.
    When that axis is too short to vectorize (NCHW mean), only the parallel part applies.
    """
    return schedule_reduction(s_tir.Schedule(func), target)


# The design spaces of the reduction rule: the default, then a row tile where it has none.
REDUCTION_PLANS = (DEFAULT_PLAN, Plan(rows=True))


def schedule_reduction(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: Decisions = DEFAULTS,
    plan: Plan = DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """:func:`rule_reduction` on ``sch``: the vector tile of the innermost output axis and
    the register tile's rows come from ``decisions``; ``plan.rows`` tiles rows where the
    default does not (else it declines: that space is the default's). A pool over packed
    lanes (:func:`_reads_its_lanes`) takes :func:`_schedule_window` instead, with no
    choices (``plan.rows`` declines it)."""
    reductions = [b for b in _root_blocks(sch) if "R" in _iter_kinds(sch, b)]
    if len(reductions) != 1:
        return None
    red = reductions[0]
    lanes = reduction_lanes(target)
    _inline_spatial_intermediates(sch, keep=[red])
    window = not _is_matmul(sch, red) and _reads_its_lanes(sch, red)
    if window and plan.rows:
        return None  # a window reduction has no row tile: the default is its one plan
    out = sch.cache_write(red, 0, "local")
    _inline_epilogue(sch, out)
    others = _other_root_blocks(sch, [red, out])
    loops = list(sch.get_loops(out))
    if not loops:
        return None
    extents = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        return None
    if window and len(loops) >= 2:
        return _schedule_window(sch, red, out, loops, extents, others, lanes)
    last = extents[-1]
    tile = None
    # A GEMV (one output row) has no rows to tile over: widen the row instead, so one pass
    # over the weight (contiguous rows) feeds up to _MAX_TILE_VECTORS // 2 accumulator chains.
    widths = [lanes * 4, lanes * 2, lanes, 8, 4]
    if _product(extents[:-1]) == 1:
        widths = [lanes * v for v in range(_MAX_TILE_VECTORS // 2, 4, -1)] + widths
    for vec in widths:
        if last % vec == 0:
            tile = vec
            break
    is_matmul = _is_matmul(sch, red)
    if is_matmul:
        tile = _fullest_row_tile(extents, widths, lanes) or tile
    if tile is None and 2 <= last <= lanes * 4:
        tile = last
    if tile is not None:
        widest = lanes * 4
        lo, li = sch.split(loops[-1], [None, decisions.factor(sch, last, tile, widest)])
        outer_loops = [*loops[:-1], lo]
        # Rows of the register tile: the innermost other output axis longer than 1 (a
        # matmul's M; for a batched GEMV such as [blocks, 1, N] the blocks).
        axis = max((i for i, e in enumerate(extents[:-1]) if e > 1), default=None)
        rows = 1 if axis is None else _pick_rows(extents[axis], -(-tile // lanes))
        if plan.rows:
            # the default has no row tile: try the smallest (a row tile of 1 is no tile)
            rows = 1 if axis is None or rows > 1 else _smallest_divisor(extents[axis])
            if rows == 1:
                return None  # no rows to tile, or the default tiles them: its own space
        if rows > 1:  # a register tile of `rows` x `tile`: each loaded B vector feeds `rows` FMAs
            factor = decisions.factor(sch, extents[axis], rows, _MAX_TILE_VECTORS)
            ro, ri = sch.split(loops[axis], [None, factor])
            outer_loops = [*loops[:axis], ro, *loops[axis + 1 : -1], lo]
            if is_matmul and _weight_bytes(sch, red, last) > _MATMUL_WEIGHT_IN_CACHE:
                outer_loops = [lo, *outer_loops[:-1]]
            sch.reorder(*outer_loops, ri, li)
    elif plan.rows:
        return None
    else:
        outer_loops = loops
    outer = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
    if _product(extents) >= _PARALLEL_MIN // 4 and (_extent(sch, outer) or 1) > 1:
        sch.parallel(outer)
    sch.compute_at(red, outer)
    if tile is not None:
        sch.vectorize(sch.get_loops(out)[-1])
        _split_reduction_into_tile(sch, red, outer)
    else:
        inner = _loops_below(sch, red, outer)
        kinds = _loop_kinds(sch, red, inner)
        red_loops = [lp for lp, k in zip(inner, kinds, strict=True) if k == "R"]
        if red_loops:
            sch.decompose_reduction(red, red_loops[0])
    return _schedule_others(sch, others, lanes)


# A window reduction of at most this many taps per output (a pool's window) takes each
# pixel's lanes as one vector; a longer one (a global mean) keeps the register tile, whose
# several accumulators hide the add latency of its long chain.
_WINDOW_TAPS = 16


def _reads_its_lanes(sch: s_tir.Schedule, block) -> bool:  # noqa: ANN001
    """Whether ``block`` is a short window reduction over packed channel lanes (a pool
    over NCHWc or NHWC): it reads one buffer besides its own output, of the output's
    rank, whose last axis it indexes by the output's own last axis (the lanes, contiguous
    in both), that axis at least 2 long, and at most ``_WINDOW_TAPS`` taps per output."""
    stmt = sch.get(block)
    target = stmt.writes[0].source if len(stmt.writes) == 1 else None
    reads = [r for r in stmt.reads if target is None or not r.source.same_as(target)]
    if target is None or len(reads) != 1 or len(reads[0].region) != len(target.shape):
        return False
    lane = stmt.writes[0].region[-1]
    spatial = {iv.var: iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar}
    var = next((v for v in spatial if v.same_as(lane.min)), None)
    index = reads[0].region[-1]
    extent = spatial[var].dom.extent if var is not None else None
    taps = [iv.dom.extent for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if not all(isinstance(t, tirx.IntImm) for t in taps):
        return False
    if _product(int(t) for t in taps) > _WINDOW_TAPS:
        return False
    return (
        isinstance(extent, tirx.IntImm)
        and int(extent) >= 2
        and index.min.same_as(var)
        and all(isinstance(r.extent, tirx.IntImm) and int(r.extent) == 1 for r in (lane, index))
    )


def _schedule_window(  # noqa: PLR0913
    sch: s_tir.Schedule,
    red,  # noqa: ANN001
    out,  # noqa: ANN001
    loops: list,
    extents: list[int],
    others: list,
    lanes: int,
) -> s_tir.Schedule | None:
    """A window reduction over packed lanes (:func:`_reads_its_lanes`): the outer output
    axes parallel, the pixels of a row in turn, each one pixel's lanes as a vector that
    takes the whole window (the window loops outside the lanes).

    Why not the register tile of :func:`schedule_reduction`: a pool has no weight for a
    tile to reuse, and each input vector feeds at most a few outputs; 14 pixels x 16
    lanes unrolled over a 3x3 window with the padding's guard ran ResNet-50's max pool
    (64 channels, 112x112 -> 56x56) in 38-58 us alone, one pixel at a time 20-24 us, as
    MetaSchedule's generic space found it (2-core Zen 5). Inside the models (``graphopt
    profile``, the same machine): GoogLeNet's ten max pools 0.68 -> 0.22 ms a run,
    VGG-11's five 0.74 -> 0.27, DenseNet-121's max pool and three average pools 0.23 ->
    0.14."""
    *outer_loops, row, lane = loops if len(loops) >= 3 else [loops[0], None, loops[1]]
    outer = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
    if _product(extents) >= _PARALLEL_MIN // 4 and (_extent(sch, outer) or 1) > 1:
        sch.parallel(outer)
    at = row if row is not None else outer
    sch.compute_at(red, at)
    _split_reduction_into_tile(sch, red, at)  # under ``at`` only the lanes are spatial
    sch.vectorize(lane)
    return _schedule_others(sch, others, lanes)


def rule_injective(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Elementwise/injective kernels (activations, adds, pads, layout transforms).

    Why: memory bound; one pass over the output with all loops fused, split into a
    vector-wide inner loop and a parallel outer loop. Intermediates are inlined first so
    a fused chain is one pass.
    """
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    if not blocks or any("R" in _iter_kinds(sch, b) for b in blocks):
        return None
    _inline_spatial_intermediates(sch, keep=[])
    lanes = vector_lanes(target)
    for block in _root_blocks(sch):
        if _select_chain(sch, block) >= _MIN_CONCAT_INPUTS and _schedule_concat(sch, block, lanes):
            continue
        _schedule_spatial(sch, block, lanes)
    return sch


def rule_fallback(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Anything else (softmax: several reductions): each root block on its own.

    Why: correct for every loop nest; spatial blocks get parallel+vector, reductions get
    their spatial outer loops fused and parallel with the reduction serial inside.
    """
    sch = s_tir.Schedule(func)
    lanes = vector_lanes(target)
    for block in _root_blocks(sch):
        kinds = _loop_kinds(sch, block, sch.get_loops(block))
        if "R" not in kinds:
            _schedule_spatial(sch, block, lanes)
            continue
        loops = list(sch.get_loops(block))
        lead = []
        for lp, k in zip(loops, kinds, strict=True):
            if k != "S":
                break
            lead.append(lp)
        extents = [_extent(sch, lp) or 1 for lp in loops]
        if lead and _product(extents) >= _PARALLEL_MIN:
            fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
            sch.parallel(fused)
    return sch


def _is_matmul(sch: s_tir.Schedule, block) -> bool:  # noqa: ANN001
    name = sch.get(block).name_hint
    return "matmul" in name or "dense" in name


def rule_matmul(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Gemm/MatMul (and batched): :func:`rule_reduction`'s register tile, for kernels whose
    one reduction is a matmul (so the profile names them, and a conv never lands here)."""
    sch = s_tir.Schedule(func)
    reductions = [b for b in _root_blocks(sch) if "R" in _iter_kinds(sch, b)]
    if len(reductions) != 1 or not _is_matmul(sch, reductions[0]):
        return None
    return rule_reduction(func, target)


def schedule_matmul(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: Decisions = DEFAULTS,
    plan: Plan = DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """:func:`rule_matmul` on ``sch`` (:func:`schedule_reduction`'s choices)."""
    reductions = [b for b in _root_blocks(sch) if "R" in _iter_kinds(sch, b)]
    if len(reductions) != 1 or not _is_matmul(sch, reductions[0]):
        return None
    return schedule_reduction(sch, target, decisions, plan)


def _packed_conv_space(family: str):  # noqa: ANN202
    """:func:`schedule_conv2d_nchwc` for the kernels ``_packed_conv_rule(family)`` takes."""

    def schedule(sch, target, decisions=DEFAULTS, plan=DEFAULT_PLAN):  # noqa: ANN001, ANN202
        anchors = [b for b in _root_blocks(sch) if _annotation(sch, b) in _PACKED_CONVS]
        if len(anchors) != 1 or _conv_family(sch, anchors[0]) != family:
            return None
        return schedule_conv2d_nchwc(sch, target, decisions, plan)

    return schedule


# The rules whose choices are a tuning search space (graphopt/tuning/_space.py):
# name -> (schedule(sch, target, decisions, plan), its plans, the default first). A rule
# not listed here is offered to the search as its default schedule only.
TUNABLE = {
    "depthwise_pointwise_nchwc": (schedule_depthwise_pointwise, (DEFAULT_PLAN,)),
    "conv2d_nchwc": (_packed_conv_space("conv2d_nchwc"), NCHWC_CONV_PLANS),
    "pointwise_nchwc": (_packed_conv_space("pointwise_nchwc"), NCHWC_CONV_PLANS),
    "depthwise_nchwc": (_packed_conv_space("depthwise_nchwc"), NCHWC_CONV_PLANS),
    "grouped_nchwc": (_packed_conv_space("grouped_nchwc"), NCHWC_CONV_PLANS),
    "matmul": (schedule_matmul, REDUCTION_PLANS),
    "reduction": (schedule_reduction, REDUCTION_PLANS),
}

# Ordered: the first rule that returns a schedule wins.
RULES = [
    (_gemv.SEQUENCE_KIND, _gemv.rule_rnn_sequence),  # only graphopt::RNNSequence kernels
    (_gemv.KIND, _gemv.rule_rnn_step),  # only graphopt::RNNStep kernels (expand-rnn fuse_steps)
    ("depthwise_pointwise_nchwc", rule_depthwise_pointwise),  # _fuse_dwpw's kernels
    ("conv2d_nchwc", _packed_conv_rule("conv2d_nchwc")),
    ("pointwise_nchwc", _packed_conv_rule("pointwise_nchwc")),
    ("depthwise_nchwc", _packed_conv_rule("depthwise_nchwc")),
    ("grouped_nchwc", _packed_conv_rule("grouped_nchwc")),
    ("matmul", rule_matmul),
    ("reduction", rule_reduction),
    ("injective", rule_injective),
    ("fallback", rule_fallback),
]


_log = logging.getLogger("graphopt.schedule")
# "1": a schedule rule with a Python-level bug (:data:`RULE_BUGS`) stops the compile (the
# test suite sets it) instead of being logged and passed over for the next rule.
STRICT_RULES_ENV = "GRAPHOPT_STRICT_RULES"
# Exceptions that are bugs in a rule's own code, not TVM refusing a schedule primitive
# (ScheduleError, TVM's checks: how many rules find out they do not fit a kernel).
RULE_BUGS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError)


def _rule_bug(exc: BaseException) -> bool:
    """Whether ``exc`` is a :data:`RULE_BUGS` error raised by Python code (TVM's C++
    checks raise some of those types too: their innermost frame is C++ source)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return isinstance(exc, RULE_BUGS) and bool(frames) and frames[-1].filename.endswith(".py")


def apply_rules(
    func: tirx.PrimFunc, target: tvm.target.Target, rules=None, kernel: str = "a kernel"
) -> tuple[str, tirx.PrimFunc] | None:  # noqa: ANN001
    """Return ``(rule name, scheduled PrimFunc)`` for the first rule that fits, or None.

    A rule declines by returning None, or by a schedule primitive TVM refuses (logged at
    debug level on the ``graphopt.schedule`` logger). A Python error in the rule's own
    code (:data:`RULE_BUGS`: a TypeError from a changed signature once sent convs to the
    fallback rule unseen) is a bug: with ``GRAPHOPT_STRICT_RULES=1`` it propagates;
    otherwise a warning names the rule, ``kernel`` and the error, and the next rule is
    tried (a slower kernel, not a failed compile).

    A kernel with a conv or matmul in it also gets ``graphopt.fast_path``: True when a
    rule made for it scheduled it, False when it fell to a generic rule (``reduction``,
    ``fallback``, or none), which the compile summary reports as a warning.
    """
    heavy = _heavy_kernel(func)
    for name, rule in RULES if rules is None else rules:
        try:
            sch = rule(func, target)
        except Exception as exc:
            bug = _rule_bug(exc)
            if bug and os.environ.get(STRICT_RULES_ENV, "").strip() == "1":
                raise
            why = (str(exc).strip().splitlines() or [""])[-1][:200]
            _log.log(
                logging.WARNING if bug else logging.DEBUG,
                "schedule rule %s failed on %s (%s: %s); trying the next rule",
                name,
                kernel,
                type(exc).__name__,
                why,
            )
            sch = None
        if sch is not None:
            new = sch.mod["main"]
            if heavy:
                new = new.with_attr("graphopt.fast_path", name not in GENERIC_RULES)
            return name, new
    return None


# Rules that take any loop nest: a conv or matmul scheduled by one of them is slow.
GENERIC_RULES = ("reduction", "injective", "fallback")


def _heavy_kernel(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` computes a conv or a matmul (by its blocks' names)."""
    try:
        sch = s_tir.Schedule(func)
        names = [sch.get(b).name_hint for b in _root_blocks(sch)]
    except Exception:  # noqa: BLE001 - not a single-root kernel: not one we classify
        return False
    return any(k in n for n in names for k in ("conv", "matmul", "dense"))


def ApplyCPUSchedules(rules=None) -> tvm.transform.Pass:  # noqa: ANN001, N802
    """Schedule every PrimFunc not yet scheduled. Put after FuseTIR, before CallTIRRewrite."""

    def schedule_one(gvar, func):  # noqa: ANN001, ANN202
        target = tvm.target.Target.current(allow_none=False)
        return apply_rules(func, target, rules, kernel=gvar.name_hint)

    return schedule_unscheduled("graphopt.ApplyCPUSchedules", schedule_one)


def prefetch_streamed(sch: s_tir.Schedule) -> None:
    """Where a dense packed conv streams its weights (:func:`_stream_reduction`: 1 MiB or
    more) in one parallel loop over output channel chunks, each step of its reduction
    above the input channel lanes (an input channel chunk, and a kernel tap) prefetches
    the weight lines that the same step of the next parallel iteration reads, spread over
    the iteration's (row, pixel chunk) tiles: tile s takes lines s*k to s*k + k - 1 of
    the step's (channel block, lane) lines. Applied to the default schedule and to a
    tuning record's (``_cpu.after_trace``): the loops are found, and the addresses are the
    conv's own indexing with the next iteration substituted.

    Why: each iteration's first row of tiles reads the step's weights from memory, the
    others from L1; the hardware prefetcher follows each block's run of addresses, a few
    lines ahead, but not into the next iteration's blocks. ResNet-50's 7x7 512->2048 conv
    alone after a 96 MB sweep: 0.289 ms without, 0.255 with; its stride-2 3x3 512->512:
    0.631 and 0.536 (2-core Zen 5; warm, the same either way). Inside ResNet-50
    (``graphopt profile``) its last stage's dense convs ran 0.73-0.88x their time without;
    as compiled artifacts paired in both build orders, ResNet-50 0.98x the time without,
    ResNeXt-50 0.97x, DLA-34 0.98x, ResNet-18 and VGG-11 within 2% either way; against
    onnxruntime ResNet-50 went from 0.85-0.88x to 0.81-0.82x (benchmarks/RESULTS.md). A
    step's 128 lines at once at its start instead (1 to 8 steps ahead) ran ResNet-50
    1.010-1.020x slower (:mod:`._prefetch`): spread a few lines to a tile, the prefetches
    overlap the FMAs."""
    found = _streamed_loops(sch)
    if found is None:
        return
    conv, weight, outer, slots, at, lane, block, tile = found
    dt = _prefetch.dtype(_prefetch.loop_var(sch, outer))

    def const(v: int) -> tirx.PrimExpr:
        return tirx.const(v, dt)

    # lines of one step per channel block: the lanes, several to a line if narrow
    per_line = max(1, 64 * 8 // (int(weight.shape[5]) * tvm.DataType(weight.dtype).bits))
    lines = -(-_extent(sch, lane) // per_line)
    blocks = _extent(sch, block) if block is not None else 1
    total = blocks * lines
    per = -(-total // _product(_extent(sch, lp) for lp in slots))
    slot = const(0)
    for lp in slots:
        slot = slot * const(_extent(sch, lp)) + _prefetch.loop_var(sch, lp)
    j = tirx.Var("pf_line", dt)
    line = slot * const(per) + j
    # the register tile's pixels and vector lanes at its first
    values = [(lane, tirx.floormod(line, const(lines)) * const(per_line))]
    values += [(lp, const(0)) for lp in tile[-2:]]
    if block is not None:
        values.append((block, tirx.floordiv(line, const(lines))))
    index = _prefetch.next_read(sch, conv, weight, values)
    if index is None:
        return
    fetch = tirx.IfThenElse(line < const(total), _prefetch.prefetch(weight, index), None)
    _prefetch.insert_at_loop(sch, at, _prefetch.serial(j, per, fetch))


def _streamed_loops(sch: s_tir.Schedule):  # noqa: ANN202
    """(conv block, its weight, parallel loop, tile loops, loop to prefetch at, lane loop,
    channel block loop or None, the register tile's loops) of a streamed dense conv's
    nest: parallel, step, (row, pixel chunk), reductions (chunk in step, [kernel row,
    kernel column,] input lane), ([channel block,] pixels, vector lane); its loops of
    compile-time extents, its weights 1 MiB or more; or None (:func:`_prefetch.next_read`
    declines a nest whose first two parallel iterations read the same lines)."""
    if not _prefetch.enabled():
        return None
    try:
        conv = sch.get_sblock("conv2d_nchwc_update")
    except ScheduleError:  # not a packed conv
        return None
    weight = _prefetch.param_read(sch, conv, 6)
    if weight is None or _bytes(weight) < _prefetch.MIN_BYTES:
        return None
    loops = list(sch.get_loops(conv))
    if sch.get(loops[0]).kind != tirx.ForKind.PARALLEL or any(
        _extent(sch, lp) is None for lp in loops
    ):
        return None
    roles = "".join(_loop_kinds(sch, conv, loops[1:]))
    shape = re.fullmatch(r"R(S+)(RR+)(S{2,3})", roles)
    if shape is None:
        return None
    tiles, reductions, spatial = (len(g) for g in shape.groups())
    slots = loops[2 : 2 + tiles]
    lane_at = 1 + tiles + reductions  # the innermost reduction: the input lanes
    if any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops[1 : lane_at + 1]):
        return None
    at, lane = loops[lane_at - 1], loops[lane_at]
    block = loops[-3] if spatial == 3 else None
    reads = _prefetch.read_indices(sch, conv, weight)
    if reads is None:
        return None
    # the lane loop walks the weight's input lanes, a step of one
    first = reads([0] * len(loops))
    at_lane = reads([int(k == lane_at) for k in range(len(loops))])
    if [b - a for a, b in zip(first, at_lane, strict=True)] != [0, 0, 0, 0, 1, 0]:
        return None
    return conv, weight, loops[0], slots, at, lane, block, loops[lane_at + 1 :]


# What the default schedule puts into the nest outside its trace, for a replayed tuning
# record too (``_cpu.after_trace``).
AFTER_TRACE = (prefetch_streamed,)
