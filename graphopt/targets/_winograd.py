"""Winograd 3x3 convs on CPUs (x86 AVX-512/AVX2, ARM NEON): fewer multiplies, not better tiles.

A dense packed conv (``NCHW[bi]c`` data, ``OIHW[bi]i[bo]o`` weights, from the packed-NCHWc
layout pass) with a 3x3 kernel, stride 1, no dilation, float32 and static shapes spends
9 multiply-adds per output and input channel. Winograd's F(m x m, 3 x 3) computes an
m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2 of them: 36 for 16
outputs at m = 4, 2.25 per output, four times fewer. The brief's physical limit says why
this matters: onnxruntime already runs ResNet-18 at 75-90% of the 2-core FMA peak, so
going below it takes fewer FLOPs (TVM's TOPI has Winograd for ARM and CUDA, oneDNN for
x86; TVM's x86 has none).

The legalization (:func:`legalize_conv2d`) turns such a conv into:

1. ``winograd_weight``: U = G g G^T per (output, input) channel pair, a Relax kernel of
   its own on the constant weight, so FoldConstant runs it once, at compile time; layout
   ``[e, n, oc chunk, ic chunk, ic lane, oc lane]`` (the oc lanes are one vector);
2. one kernel of these stages, the conv's bias/BN/ReLU/residual tail fused after it by
   FuseOps (its output is the conv's own ``NCHW[bo]c``), run in blocks of tile rows
   where they fit (below):

   - ``winograd_input_rows`` / ``winograd_input``: V = B^T d B for each input tile, the
     two one-dimensional halves written as sums of the nonzero terms of B (a constant
     matrix: each unrolled copy keeps only its own terms), vectorized over the channel
     lanes;
   - ``conv2d_winograd`` (the anchor, annotated so): (m+2)^2 independent
     products M[e, n] = U[e, n] . V[e, n] over the input channels, the packed pointwise
     conv's register tile (tiles x one or two output-channel vectors,
     :func:`products_tile`);
   - ``winograd_output_cols`` / ``winograd_output``: Y = A^T M A, the tail written from
     the registers.

Blocks of tile rows (:func:`_blocks_of_rows`, :func:`_schedule_blocked`): scheduled as
three stages over the whole map, the transformed input V and the products M of ResNet's
56x56 stage (64 channels) are 1.8 MB each, written by one stage and read by the next
from beyond a core's L2 (1-2 MiB). Where a tile row's V is at most ``_BLOCK_BYTES``, U
at most ``_BLOCK_WEIGHT_BYTES``, and a tile row's tiles take the products' two-block
register tile if the whole map's do (on AVX2 a row of 14 does not, see
:func:`_blocks_of_rows`), one parallel loop runs over (image, tile row, part of
the output channels), each iteration transforming its row's input (every input
channel), its products, its output transform: V and M per iteration 64-258 KB, in L2
each time the thread reuses them. Each row reads U again, so U must stay in a cache: on
VGG-11, whose 3x3 convs have 4.5-36 MiB of U, blocking them all ran 1.25x slower; with
the 2.5 MiB limit, 1.01x (neither the 14x14 nor the larger convs blocked). Measured on a
2-core Zen 4 (paired against ``GRAPHOPT_WINOGRAD_BLOCKS=0``, whole models, one process):
ResNet-50 0.987x the time (with its 4 MiB 14x14 convs blocked as well, 0.97x in one run,
1.00x in another, 1.016x slower in a third: left whole), ResNet-18 0.98x, at batch 8
0.90x; RepVGG-A0, DenseNet-121, GoogLeNet 1.00x. Two channel parts at least: ResNet-50's
28x28 convs in 7 blocks (one part) ran 1.6-1.8x their time alone inside the model, in 14 (two parts)
1.2-1.3x. More parts, so that a part's U stays in L2 (at most 600 or 320 KB: ResNet-50's
28x28 convs in 4 or 8), ran ResNet-50 1.008x and 1.022x slower (each part transforms its
row's input again); the parts outside the rows (each thread one part of every row),
1.047x slower. The parts are a tuning choice; ``GRAPHOPT_WINOGRAD_BLOCKS=0`` in the
environment keeps the whole-map stages (for comparisons).

Where it pays (:func:`tile_size`): a map of at least ``_MIN_TILES`` tiles and channels of
at least one vector. With few tiles, the transformed weights ((m+2)^2 / 9 times the
original: 4x at m = 4) are read for little work; a 6x6 map (9 tiles) stays direct.
Measured on Zen 4 (AVX-512), ResNet-18's blocks: 3.3 -> 0.8 ms (64 channels, 56x56), 2.4
-> 0.75 ms (128, 28x28).

Which tile: m of 2, 3 or 4 (``_TILES``), the one whose products take least time by a
roofline. Per (input, output) channel pair they are 2 x tiles x (m+2)^2 FLOPs and read
(m+2)^2 transformed weights, which inside a model come from memory (ResNet-50's weights
are 100 MB); the time is the larger, the bytes counted at ``_BALANCE_PER_LANE`` x FMA
lanes FLOPs each (AVX2 10: two cores at ~150 GFLOP/s against ~15 GB/s; AVX-512 20 at full
rate, NEON 5, by their vector widths, not measured; Zen 4, whose AVX-512 FMAs run at
AVX2's rate, 10: ``_simd.fma_lanes``). A larger m does fewer FLOPs per output and pads a
map it does not divide, but its weights serve fewer tiles: below about 2 x balance tiles
per image (x images) the products wait on memory. So 56x56 and 28x28 maps take 4x4 tiles,
and so do SqueezeNet's 55x55 and 27x27 (padded to 56 and 28); 14x14 and 13x13 maps take
3x3 on AVX2 and Zen 4 (25 tiles, 15x15 computed), 2x2 with full-rate AVX-512, 4x4 on NEON;
7x7 maps 2x2 (3x3 and 4x4 give fewer than 16 tiles), and so do 8x8 maps, which the former
rule left direct (4 tiles of 4x4); at batch 8 a 14x14 map takes 4x4. Measured on a 2-core
Zen 3 (AVX2), artifacts paired in one process against the former rule (4x4 where 4 divides
the map, else 2x2), with an A/A pair beside: ResNet's 256-channel 14x14 conv alone 0.76x
the time (4x4: 0.71x); SqueezeNet 1.1 0.895x (A/A 0.991), ResNet-18 0.951x and 0.933x
(1.003, 1.008), ResNet-50 0.969x, 0.972x and 0.958x (0.992, 1.005, 0.982); ResNet-50 with
its 14x14 convs in 4x4 tiles 0.951x and 0.969x, and in an earlier session 0.976x against
an A/A of 0.979 (U 9.4 MB a conv for 16 tiles' work, against 6.6 MB for 25 in 3x3 tiles
and 4.2 MB for 49 in 2x2). Older, on a Zen 4 with the one-block products: a 14x14 map in
4x4 tiles 1.8 ms against 1.0 in 2x2. On a 2-core Zen 4 (znver4), the 14x14 maps in 3x3
tiles (balance 10) against 2x2 (balance 20), paired the same way: ResNet-50 0.981x and
0.982x the time (A/A 0.994 both runs), ResNet-18 0.966x (0.998), SqueezeNet 1.002x (1.003;
its 13x13 maps), VGG-11 0.980x (1.001), DLA-34 0.976x (0.997), GoogLeNet 0.988x (1.002).
Checked again there after the stride-2 parts (ResNet-50, 11 rounds, A/A 1.006): its 14x14
convs in 4x4 tiles 1.006x the time, in 2x2 1.020x; 3x3 stays.

Stride 2 (:func:`strided_tile_size`, :func:`_legalize_strided`): a stride-2 3x3 conv
with padding 1 is four stride-1 convs on the input's phases, summed. Output row i reads
input rows 2i-1, 2i and 2i+1: the two outer taps are a 2-tap conv on the odd rows, the
centre tap a 1-tap one on the even rows; so too for columns. The 2x2, 2x1 and 1x2 parts
run as Winograd kernels of this module, F(m, 2) in a dimension of two taps (TOPI's
Cook-Toom) and the identity in a dimension of one (their transforms are not square:
U is ``[m+1 or m, m+1 or m, ...]``); the centre tap is a 1x1 stride-2 conv through the
packed rule; FuseOps puts the three adds and the conv's tail into the parts' epilogues.
Per output and channel pair that is (m+1)^2/m^2 + 2(m+1)/m + 1 multiplies against 9:
5.1 at m = 4, 6.25 at m = 2, with 4x and 1.8x the weights. The tile is the cheapest by
the stride-1 roofline, taken where it costs less than the direct conv. The split is the
strided-conv Winograd of the literature (e.g. Yepez and Ko, "Stride 2 1-D, 2-D, and 3-D
Winograd for convolutional neural networks", 2020), here built from this module's parts.
Measured on a 2-core Zen 4 (znver4), whole models paired in one process against the
direct strided convs (15 rounds, A/A beside): ResNet-50 0.972x the time (A/A 0.999),
ResNet-18 0.979x (1.016), DLA-34 0.961x (0.994). ResNet-50's 56->28 conv (128 channels,
4x4 tiles) ran 0.65 ms alone in its four kernels against 1.13 direct, its 28->14 (256,
3x3 tiles) 0.82 against 1.19. Other tiles, paired the same way: the 28->14 conv in 2x2
tiles 1.013x slower (a third fewer products for twice the tiles); the 14->7 one in 2x2
tiles (16 of them; the roofline keeps it direct) 0.999x, no gain.
``GRAPHOPT_WINOGRAD_STRIDED=0`` in the environment keeps stride-2 convs direct (for
comparisons).

Weight traffic: each transformed weight is used once per tile, each direct weight once
per output pixel, so ResNet's 7x7 stage at batch 1 (16 tiles of 2x2, 512 channels: 16.8
MB transformed against 9.4 MB) reads its weights from memory inside a model. With the
products on one channel block it ran 1.21 ms per conv in ResNet-18 against the direct
conv's 0.96 (2-core Xeon, AVX-512); with the two-block tile (:func:`products_tile`) it is
as fast as the direct conv there (whole models within 1% either way), so no rule keeps
such convs direct. Streaming the products' weights as the dense convs stream theirs
(input channel chunks in steps, every tile inside each step,
``_cpu_schedules._stream_reduction``) was tried and left out: on the same Xeon, paired
against the products without it, ResNet-18 1.02-1.035x faster but GoogLeNet 0.95x and
VGG-11 0.96-0.97x (its 49-tile convs ran slower even alone); limited to maps of two
register tiles or fewer (ResNet's 7x7 stage), every model within 1.5% either way.
Transforming the weights inside the conv's kernel, from the direct weights (9.4 MB
read instead of 16.8), was tried as well and left out (2-core Zen 4, the kernels alone,
fresh caches and warm): parallel over the products' output channel blocks, each
transforming its own U (G g, then (G g) G^T, per channel block or per row e of it)
before its products over every tile, the 7x7 512-channel conv ran 1.2-1.3 ms against
0.7-1.0 with U folded at compile time, 1.6-2.0 against 1.1-1.4 cold; the 14x14
256-channel one 0.54-0.65 against 0.48-0.54. Each U value costs 9 multiply-adds (or 3 and
the rows' share) and feeds only 16 (7x7) or 49 (14x14) tiles' products, and the part's U
goes through L2 once more. ``GRAPHOPT_WINOGRAD=0`` in the environment keeps every conv
direct (for comparisons; the artifact's speed, not its numbers beyond rounding, depends on it).

Prefetch (:func:`prefetch_products`): where the products run over the whole map and U is 1
MiB or more, each parallel iteration's first passes over the tiles prefetch into L2 the
weight lines the next iteration will read, one input channel chunk per step. Paired
against ``GRAPHOPT_PREFETCH=0`` (whole models, one process, 11 rounds, 2-core Zen 5):
ResNet-50 0.934x the time (0.930-0.975), ResNet-18 0.881x (0.850-0.905); ResNet-50's
7x7 convs went from 0.68 ms inside the model to 0.41, its 14x14 ones from 0.30 to 0.24.

Numbers: F(4x4, 3x3) in float32 agrees with the direct conv to about 1e-6 relative to the
output's range (the transforms' constants are exact in binary except G's thirds and
fifteenths); the verification against onnxruntime checks every artifact as for the
direct convs.

Hooked into the CPU pipeline by :mod:`graphopt.targets._cpu` (``WRAP_LEGALIZE``,
``RULES``, ``TUNABLE``: the products' register tile as a tuning choice).
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir.schedule import ScheduleError

from graphopt.targets import _cpu_schedules as cpu
from graphopt.targets import _prefetch
from graphopt.targets._amx import amx_enabled
from graphopt.targets._simd import fma_lanes

__all__ = [
    "AFTER_TRACE",
    "OWN_SPACE_ONLY",
    "RULE",
    "RULES",
    "TUNABLE",
    "WRAP_LEGALIZE",
    "keeps_fp32",
    "legalize_conv2d",
    "prefetch_products",
    "products_tile",
    "schedule_winograd",
    "tile_size",
    "winograd_te",
]

RULE = "conv2d_winograd"
_ANNOTATION = "graphopt.kernel"
# On a stride-2 part's products: the direct conv's taps it computes (graphopt's profile)
_TAPS_ANNOTATION = "graphopt.taps"
# Fewest output tiles (of the chosen size) per image for which Winograd pays: below it
# the transformed weights are read for too little work.
_MIN_TILES = 16
# The output tiles m :func:`tile_size` chooses from, and the FLOPs per byte of weights
# read from memory a machine runs, per float32 lane of its FMAs (``_simd.fma_lanes``):
# 2 cores of AVX2 (8 lanes) at ~150 GFLOP/s against ~15 GB/s is 10.
_TILES = (2, 3, 4)
_BALANCE_PER_LANE = 1.25
_ENV = "GRAPHOPT_WINOGRAD"
_BLOCKS_ENV = "GRAPHOPT_WINOGRAD_BLOCKS"
# The blocked schedule: at most this much transformed input per tile row (a block's V
# and products stay in a core's L2 beside the weights streaming through), and at least
# this many parallel iterations (tile rows x output channel parts) to share.
_BLOCK_BYTES = 512 << 10
_BLOCK_ITERATIONS = 12
# ... and at most this much transformed weight: each block of tile rows reads all of it
# again, which must come from a cache, not from memory
_BLOCK_WEIGHT_BYTES = 5 << 19


@cache
def _matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, G) of F(m, r) in one dimension, TOPI's Cook-Toom construction (its
    interpolation points; identities for one tap): Y = A^T [(G g G^T) * (B^T d B)] A."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    if r == 1:
        eye = np.eye(m)
        return eye, eye, np.ones((m, 1))
    return _cook_toom_convolution(_interpolation_points(m + r - 1), m, r)


def tile_size(out_h: int, out_w: int, lanes: int, images: int = 1) -> int | None:
    """The output tile m of a conv with ``images`` maps of ``out_h x out_w`` on FMA units
    of ``lanes`` float32 lanes (``_simd.fma_lanes``: 8 on Zen 4's AVX-512), or None
    where Winograd does not pay (fewer than ``_MIN_TILES`` tiles for every m).

    m is the one of _TILES whose products take the least time by a roofline: per
    (input, output) channel pair, the products are 2 x images x tiles x (m+2)^2 FLOPs
    and read (m+2)^2 transformed weights (4 bytes each), which inside a model come from
    memory; the time is the larger of the two, the bytes counted in FLOPs at
    ``_BALANCE_PER_LANE x lanes`` per byte. A larger m does fewer FLOPs per output but
    reads more weights for each, and pads maps it does not divide; the two meet at
    about 2 x balance tiles per channel pair. See the module docstring for the
    measurements."""
    balance = _BALANCE_PER_LANE * lanes
    best, best_cost = None, 0.0
    for m in _TILES:
        tiles = images * -(-out_h // m) * -(-out_w // m)
        if tiles < images * _MIN_TILES:
            continue
        cost = (m + 2) ** 2 * max(2 * tiles, 4 * balance)
        if best is None or cost < best_cost:
            best, best_cost = m, cost
    return best


# A stride-2 3x3 conv's parts (:func:`strided_tile_size`): the taps each takes in each
# dimension, (0, 2) the two outer ones on the odd input phase, (1,) the centre on the even.
_PHASE_TAPS = ((0, 2), (1,))
_STRIDED_ENV = "GRAPHOPT_WINOGRAD_STRIDED"


def strided_tile_size(out_h: int, out_w: int, lanes: int, images: int = 1) -> int | None:
    """The output tile m of a stride-2 3x3 conv (padding 1) of ``images`` maps of
    ``out_h x out_w`` out, taken as four stride-1 convs on the input's phases (even or
    odd rows by even or odd columns): the outer taps' 2x2, 2x1 and 1x2 parts through
    F(m, 2) x F(m, 2), F(m, 2) x F(m, 1) and F(m, 1) x F(m, 2), the centre tap a 1x1
    stride-2 conv. Or None, where that costs no less than the direct conv by
    :func:`tile_size`'s roofline (per channel pair, the parts' products against their
    transformed weights' bytes; the centre 2 FLOPs and the direct conv 18 per output).

    Per output the parts multiply (m+1)^2/m^2 + 2(m+1)/m + 1 times per channel pair
    against 9: 5.1 at m = 4 (ResNet's 28x28 outputs), 6.25 at m = 2 (14x14); their
    transformed weights are (m+1)^2 + 2m(m+1) + 1 per pair against 9 (4x at m = 4,
    1.8x at m = 2). A 7x7 output's 16 tiles (ResNet's last stage) read too many weights
    for their work and stay direct."""
    balance = _BALANCE_PER_LANE * lanes
    outputs = images * out_h * out_w
    best, best_cost = None, 18.0 * outputs
    for m in _TILES:
        tiles = images * -(-out_h // m) * -(-out_w // m)
        if tiles < images * _MIN_TILES:
            continue
        points = (m + 1) ** 2 + 2 * (m + 1) * m
        cost = points * max(2 * tiles, 4 * balance) + 2 * outputs
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _packed_3x3(call: relax.Call, target: tvm.target.Target | None) -> tuple | None:
    """(FMA lanes, data shape) of a packed float32 3x3 conv this module can take on
    ``target`` (None, outside a target's scope: :func:`cpu.legalize_lanes`' default for
    both widths; see the module docstring), stride and padding left to the caller; or
    None."""
    if target is None:
        lanes = fma = cpu.legalize_lanes()
    else:
        lanes, fma = cpu.vector_lanes(target), fma_lanes(target)
    a = call.attrs
    data, weight = cpu._shape(call.args[0]), cpu._shape(call.args[1])
    if (
        os.environ.get(_ENV, "1") == "0"
        or data is None
        or weight is None
        or not cpu._NCHWC.match(str(a.data_layout))
        or not cpu._NCHWC.match(str(a.out_layout))
        or not cpu._OIHWIO.match(str(a.kernel_layout))
        or int(a.groups) != 1
        or weight[2:4] != [3, 3]
        or [int(d) for d in a.dilation] != [1, 1]
        or str(call.args[0].ty.dtype) != "float32"
        or str(call.args[1].ty.dtype) != "float32"
        or str(a.out_dtype) not in ("", "void", "None", "float32")
        or data[1] * data[4] < lanes
        or weight[0] * weight[5] < lanes
    ):
        return None
    return fma, data


def _plan(call: relax.Call, target: tvm.target.Target | None) -> int | None:
    """The tile size for a stride-1 conv this module takes on ``target`` (see
    :func:`_packed_3x3`), or None."""
    found = _packed_3x3(call, target)
    if found is None or [int(s) for s in call.attrs.strides] != [1, 1]:
        return None
    fma, data = found
    top, left, bottom, right = (int(p) for p in call.attrs.padding)
    return tile_size(data[2] + top + bottom - 2, data[3] + left + right - 2, fma, data[0])


def _plan_strided(call: relax.Call, target: tvm.target.Target | None) -> int | None:
    """The tile size for a stride-2 conv with padding 1 this module takes in parts on
    ``target`` (:func:`strided_tile_size`), or None (``GRAPHOPT_WINOGRAD_STRIDED=0`` in
    the environment: none, for comparisons)."""
    found = _packed_3x3(call, target)
    if (
        found is None
        or os.environ.get(_STRIDED_ENV, "1") == "0"
        or [int(s) for s in call.attrs.strides] != [2, 2]
        or [int(p) for p in call.attrs.padding] != [1, 1, 1, 1]
    ):
        return None
    fma, data = found
    return strided_tile_size((data[2] - 1) // 2 + 1, (data[3] - 1) // 2 + 1, fma, data[0])


def _terms(coefficients, values) -> tirx.PrimExpr:  # noqa: ANN001
    """sum(c * v) over the nonzero coefficients, without multiplying by +-1."""
    out = None
    for c, v in zip(coefficients, values, strict=True):
        if c == 0:
            continue
        term = v if c == 1 else -v if c == -1 else tirx.const(float(c), "float32") * v
        out = term if out is None else out + term
    return out if out is not None else tirx.const(0.0, "float32")


def _pick(index, exprs: list) -> tirx.PrimExpr:  # noqa: ANN001
    """exprs[index] as an ``if_then_else`` chain: each unrolled copy (``index`` a constant)
    folds to its own expression; unrolled or not, only one branch is evaluated."""
    out = exprs[-1]
    for k in range(len(exprs) - 2, -1, -1):
        out = tirx.if_then_else(index == k, exprs[k], out)
    return out


def _weight_transform(
    weight: te.Tensor, taps: te.Tensor, rows: tuple = (0, 1, 2), cols: tuple = (0, 1, 2)
) -> te.Tensor:
    """OIHW[bi]i[bo]o -> U[e, n, oc chunk, ic chunk, ic lane, oc lane] = (G g G^T)[e, n],
    g the kernel's taps ``rows`` x ``cols`` (the whole 3x3, or a stride-2 part's: evenly
    spaced), ``taps[e, n, y, x] = G[e, y] G[n, x]`` (a constant): a multiply-add per tap
    and value, no branch (FoldConstant runs it unscheduled, once per weight)."""
    oco, ico, _, _, bi, bo = (int(d) for d in weight.shape)
    alpha_h, alpha_w = int(taps.shape[0]), int(taps.shape[1])
    ry = te.reduce_axis((0, len(rows)), "ry")
    rx = te.reduce_axis((0, len(cols)), "rx")

    def tap(values: tuple, r):  # noqa: ANN001, ANN202 - the kernel index of the part's tap r
        step = values[1] - values[0] if len(values) > 1 else 0  # a one-tap part: r is 0
        return values[0] + step * r

    return te.compute(
        (alpha_h, alpha_w, oco, ico, bi, bo),
        lambda e, n, co, ci, i, o: te.sum(
            taps[e, n, ry, rx] * weight[co, ci, tap(rows, ry), tap(cols, rx), i, o],
            axis=[ry, rx],
        ),
        name="winograd_weight",
    )


def _taps(m: int, taps: tuple[int, int] = (3, 3)) -> np.ndarray:
    """G[e, y] G[n, x] of F(m, taps[0]) x F(m, taps[1]) in float32: the weight
    transform's constant."""
    g_h, g_w = _matrices(m, taps[0])[2], _matrices(m, taps[1])[2]
    return np.einsum("ey,nx->enyx", g_h, g_w).astype("float32")


def _centre_tap(weight: te.Tensor) -> te.Tensor:
    """The centre tap of an OIHW[bi]i[bo]o 3x3 weight, as a 1x1 one."""
    oco, ico, _, _, bi, bo = (int(d) for d in weight.shape)
    return te.compute(
        (oco, ico, 1, 1, bi, bo),
        lambda co, ci, y, x, i, o: weight[co, ci, y + 1, x + 1, i, o],
        name="centre_tap",
    )


def winograd_te(
    data: te.Tensor, weight_u: te.Tensor, padding, m: int, stride: int = 1
) -> te.Tensor:  # noqa: ANN001
    """``NCHW[bi]c`` data conv the transformed weights ``weight_u`` (from
    :func:`_weight_transform`), ``NCHW[bo]c`` out (see the module docstring): a 3x3
    stride-1 conv with ``padding`` (top, left, bottom, right), or with ``stride`` 2 one
    part of a stride-2 3x3 conv (:func:`strided_tile_size`), its taps per dimension read
    from U's shape (m + 1 transformed values: the two outer taps on the odd input
    phase; m: the centre one on the even)."""
    n, ico, h, w, bi = (int(d) for d in data.shape)
    alpha_h, alpha_w, oco, _, _, bo = (int(d) for d in weight_u.shape)
    top, left, bottom, right = (int(p) for p in padding)
    taps_h, taps_w = alpha_h - m + 1, alpha_w - m + 1
    oh = (h + top + bottom - 3) // stride + 1
    ow = (w + left + right - 3) // stride + 1
    # a part's row q reads the input's row stride * q + first - top (stride 1: q - top)
    first_h, first_w = int(taps_h == 1), int(taps_w == 1)
    th, tw = -(-oh // m), -(-ow // m)
    tiles = th * tw
    a_h, b_h, _ = _matrices(m, taps_h)
    a_w, b_w, _ = _matrices(m, taps_w)

    def padded(b, c, y, x, i):  # noqa: ANN001, ANN202, PLR0913
        yy, xx = stride * y + first_h - top, stride * x + first_w - left
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        return tirx.if_then_else(inside, data[b, c, yy, xx, i], tirx.const(0.0, "float32"))

    shape = (n, ico, th * m + taps_h - 1, tw * m + taps_w - 1, bi)
    pad = te.compute(shape, padded, name="winograd_pad")

    def rows(b, c, p, e, s, i):  # noqa: ANN001, ANN202, PLR0913 - (B^T d)[e, s]
        y0, x0 = p // tw * m, p % tw * m
        column = [pad[b, c, y0 + r, x0 + s, i] for r in range(alpha_h)]
        return _pick(e, [_terms(b_h[:, k], column) for k in range(alpha_h)])

    t = te.compute((n, ico, tiles, alpha_h, alpha_w, bi), rows, name="winograd_input_rows")

    def transformed(e, nu, b, c, p, i):  # noqa: ANN001, ANN202, PLR0913 - (B^T d B)[e, nu]
        row = [t[b, c, p, e, s, i] for s in range(alpha_w)]
        return _pick(nu, [_terms(b_w[:, k], row) for k in range(alpha_w)])

    v = te.compute((alpha_h, alpha_w, n, ico, tiles, bi), transformed, name="winograd_input")
    rco = te.reduce_axis((0, ico), "rco")
    rci = te.reduce_axis((0, bi), "rci")
    attrs = {_ANNOTATION: RULE}
    if stride != 1:  # the profile counts a part's FLOPs by its taps (9 without)
        attrs[_TAPS_ANNOTATION] = taps_h * taps_w
    gemm = te.compute(
        (alpha_h, alpha_w, n, oco, tiles, bo),
        lambda e, nu, b, co, p, o: te.sum(
            v[e, nu, b, rco, p, rci] * weight_u[e, nu, co, rco, rci, o], axis=[rco, rci]
        ),
        name=RULE,  # a conv: the compile summary's fast-path flag looks for the name
        attrs=attrs,
    )

    def cols(b, co, p, e, x, o):  # noqa: ANN001, ANN202, PLR0913 - (M A)[e, x]
        row = [gemm[e, nu, b, co, p, o] for nu in range(alpha_w)]
        return _pick(x, [_terms(a_w[:, k], row) for k in range(m)])

    s_out = te.compute((n, oco, tiles, alpha_h, m, bo), cols, name="winograd_output_cols")

    def output(b, co, y, x, o):  # noqa: ANN001, ANN202, PLR0913 - (A^T M A)[y, x]
        p = y // m * tw + x // m
        column = [s_out[b, co, p, e, x % m, o] for e in range(alpha_h)]
        return _pick(y % m, [_terms(a_h[:, k], column) for k in range(m)])

    return te.compute((n, oco, oh, ow, bo), output, name="winograd_output")


def keeps_fp32(call: relax.Call, precision: str) -> bool:
    """True for a conv Winograd takes in 4x4 tiles (:func:`tile_size`), compiled in bf16
    for a CPU without AMX tiles: it stays float32 (and Winograd), since F(4x4) does 4x
    fewer multiplies than the direct conv and vdpbf16ps only twice the products of a
    float32 FMA. Convs in 2x2 tiles (full-rate AVX-512's 14x14 and 7x7 maps) or 3x3 stay
    bf16: 2.25x fewer multiplies (3.2x), but their fp32 transformed weights are 16/9 x 2
    the bytes, and ResNet-50's layer 3 and 4 convs,
    whose weights are read once per image, ran slower in the model that way (kernels
    alone 21.8 ms, the model 33.2 with them, 25.7 without). On a Zen 4 (AVX512-BF16),
    ResNet-50's bf16 build in one process with both: 4.6% faster than all-bf16 (paired
    rounds), 1.17x OpenVINO's bf16. With AMX, a 16x16x32 tile product is 16 times one
    vdpbf16ps, and the convs go to the tiles in bf16."""
    if precision != "bf16" or call.op.name != "relax.nn.conv2d":
        return False
    target = tvm.target.Target.current(allow_none=True)
    if target is None or amx_enabled(target):
        return False
    return _plan(call, target) == 4


def legalize_conv2d(fallback):  # noqa: ANN001, ANN201
    """A conv2d legalization: the packed 3x3 convs :func:`_plan` takes through Winograd
    (weights transformed by a kernel of their own, which FoldConstant runs at compile
    time), any other through ``fallback``."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        target = tvm.target.Target.current(allow_none=True)
        m = _plan(call, target)
        if m is None:
            m = _plan_strided(call, target)
            return fallback(bb, call) if m is None else _legalize_strided(bb, call, m, fallback)
        weight = _emit_transformed(bb, call.args[1], m, (0, 1, 2), (0, 1, 2))
        padding = [int(p) for p in call.attrs.padding]
        return bb.call_te(winograd_te, call.args[0], weight, padding, m, primfunc_name_hint=RULE)

    return legalize


def _emit_transformed(bb: relax.BlockBuilder, weight, m: int, rows: tuple, cols: tuple):  # noqa: ANN001, ANN202
    """U of ``weight``'s taps ``rows`` x ``cols`` in F(m, taps) tiles, a kernel of its own
    on the weight (FoldConstant runs it at compile time)."""
    taps = relax.const(_taps(m, (len(rows), len(cols))))
    return bb.emit_te(
        _weight_transform, weight, taps, rows, cols, primfunc_name_hint="winograd_weight"
    )


def _legalize_strided(bb: relax.BlockBuilder, call: relax.Call, m: int, fallback) -> relax.Expr:  # noqa: ANN001
    """A stride-2 3x3 conv as its parts (:func:`strided_tile_size`): three Winograd
    kernels, each with its weights transformed by a kernel that FoldConstant runs, and
    the centre tap's 1x1 stride-2 conv through ``fallback``; then their sum (FuseOps puts
    the adds and the conv's tail into the parts' epilogues)."""
    from tvm import topi

    data, weight = call.args
    parts = []
    for rows in _PHASE_TAPS:
        for cols in _PHASE_TAPS:
            if len(rows) == len(cols) == 1:
                continue
            u = _emit_transformed(bb, weight, m, rows, cols)
            parts.append(
                bb.emit_te(winograd_te, data, u, [1, 1, 1, 1], m, 2, primfunc_name_hint=RULE)
            )
    a = call.attrs
    centre = relax.op.nn.conv2d(
        data,
        bb.emit_te(_centre_tap, weight, primfunc_name_hint="centre_tap"),
        strides=[2, 2],
        data_layout=a.data_layout,
        kernel_layout=a.kernel_layout,
        out_layout=a.out_layout,
        out_dtype=a.out_dtype,
    )
    out = bb.emit(fallback(bb, bb.normalize(centre)))
    for part in parts[:-1]:
        out = bb.emit_te(topi.add, out, part)
    return bb.call_te(topi.add, out, parts[-1])


# --- the schedule rule ------------------------------------------------------------------------
def _block(sch: s_tir.Schedule, name: str):  # noqa: ANN202
    found = [b for b in cpu._root_blocks(sch) if sch.get(b).name_hint == name]
    return found[0] if len(found) == 1 else None


def rule_conv2d_winograd(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """The Winograd kernel and its fused tail.

    Why: each stage has the loop nest its arithmetic wants. The input transform walks the
    tiles in parallel, its (m+2) x (m+2) values per tile unrolled and vectorized over the
    channel lanes; the products are the packed pointwise conv (``reg_n`` tiles x one
    output-channel vector in registers over the input channels, the (e, n, oc chunk)
    loops parallel); the output transform walks the output tiles in parallel, unrolled,
    the tail (bias, BN, ReLU, residual) applied on the way out. Where a block of tile
    rows fits (:func:`_blocks_of_rows`), the three run one after another per block
    inside one parallel loop instead, so that V and M stay in the core's L2."""
    return schedule_winograd(s_tir.Schedule(func), target)


_STAGES = ("winograd_pad", "winograd_input_rows", "winograd_input", RULE,
           "winograd_output_cols", "winograd_output")  # fmt: skip


def schedule_winograd(
    sch: s_tir.Schedule,
    target: tvm.target.Target,
    decisions: cpu.Decisions = cpu.DEFAULTS,
    plan: cpu.Plan = cpu.DEFAULT_PLAN,
) -> s_tir.Schedule | None:
    """:func:`rule_conv2d_winograd` on ``sch`` (None: not a Winograd kernel); the products'
    register tile (tiles) and the blocks' output channel parts from ``decisions``. ``plan``
    is accepted for the tuning space's signature; this rule has one structure."""
    del plan
    blocks = [_block(sch, name) for name in _STAGES]
    if any(b is None for b in blocks) or cpu._annotation(sch, blocks[3]) != RULE:
        return None
    pad, rows, inp, gemm, cols, out = blocks
    # the tail's intermediates (HardSwish's x + 3, its clip) into their consumers first,
    # so the tail is one block that reverse-inlines into the output transform
    cpu._inline_spatial_intermediates(sch, keep=blocks)
    cpu._inline_tail(sch, out)
    others = cpu._other_root_blocks(sch, blocks)
    split = _blocks_of_rows(sch, inp, out, cpu.max_reg_n(target))
    if split is not None:
        _schedule_blocked(sch, blocks, split, decisions, cpu.max_reg_n(target))
        return cpu._schedule_others(sch, others, cpu.vector_lanes(target))
    _schedule_input(sch, (pad, rows, inp))
    _schedule_gemm(sch, gemm, decisions, cpu.max_reg_n(target))
    _schedule_output(sch, cols, out)
    done = cpu._schedule_others(sch, others, cpu.vector_lanes(target))
    if done is not None:
        prefetch_products(done)
    return done


def _blocks_of_rows(sch: s_tir.Schedule, inp, out, most: int) -> tuple[int, int] | None:  # noqa: ANN001
    """(tile rows per block, output channel parts) of the blocked schedule
    (:func:`_schedule_blocked`), or None for the three whole-map stages: a map whose
    height is not a whole number of tiles (its last tile row is cut), a map of one tile
    row, one whose tile row of transformed input is more than ``_BLOCK_BYTES``, or one
    whose tile row is a tile count that loses the two-channel-block register tile the
    whole map's count gets (``most``: one block's accumulators, :func:`products_tile`).
    Parts: the fewest, two at least, that give ``_BLOCK_ITERATIONS`` parallel iterations.
    ``GRAPHOPT_WINOGRAD_BLOCKS`` in the environment: ``0`` keeps the whole-map stages,
    ``rows,parts`` sets both (for comparisons).

    Why the register tile: on AVX2 (12 accumulators, two blocks of at most 5 tiles) a
    tile row of ResNet's 56x56 stage has 14 tiles, which only one block of 7 divides,
    while the whole map's 196 take two blocks of 4 (6 loads for 8 FMAs instead of 8 for
    7). On a 2-core Zen 3, ResNet-50's 56x56 convs (64 channels) ran 0.42 ms alone over
    the whole map against 0.52 blocked (0.44 in blocks of two tile rows, whose 28 tiles
    take two blocks of 4: each part transforms its rows' input again), and 0.84-0.88x
    their blocked time inside the model. With AVX-512 a tile row of 14 takes two blocks
    of 7, and blocking stays (it was measured there: see the module docstring)."""
    alpha_h, alpha_w, n, ico, tiles, bi = (int(d) for d in _shape_of(sch, inp))
    _, oco, oh, _, bo = (int(d) for d in _shape_of(sch, out))
    m = _tile_of(sch)
    th = oh // m
    setting = os.environ.get(_BLOCKS_ENV, "")
    if setting == "0" or oh % m or th < 2 or tiles // th < 2:
        return None
    if setting:
        rows_per, parts = (int(v) for v in setting.split(","))
        return (rows_per, parts) if th % rows_per == 0 and oco % parts == 0 else None
    row_bytes = alpha_h * alpha_w * ico * bi * (tiles // th) * 4  # a tile row's V
    weight_bytes = alpha_h * alpha_w * ico * bi * oco * bo * 4  # U
    if row_bytes > _BLOCK_BYTES or weight_bytes > _BLOCK_WEIGHT_BYTES:
        return None
    parts = next(
        (p for p in range(2, oco + 1) if oco % p == 0 and n * th * p >= _BLOCK_ITERATIONS), oco
    )
    chunks = oco // parts
    block, _ = products_tile(chunks, tiles // th, most)
    return (1, parts) if block >= products_tile(chunks, tiles, most)[0] else None


def _shape_of(sch: s_tir.Schedule, block) -> list:  # noqa: ANN001
    return list(sch.get(block).writes[0].source.shape)


def _tile_of(sch: s_tir.Schedule) -> int:
    """The output tile m of a Winograd kernel: its output transform's column count."""
    return int(_shape_of(sch, _block(sch, "winograd_output_cols"))[4])


def _loops_by_dim(sch: s_tir.Schedule, block, outer, extents: list[int]) -> list:  # noqa: ANN001
    """The loops compute_at made under ``outer`` for ``block``, one per dimension of its
    output (``extents``: the region's), None where the dimension is one value wide and
    compute_at left out its loop."""
    loops = cpu._loops_below(sch, block, outer)[: len(extents)]
    if len(loops) == len(extents):
        return loops
    wide = iter(loops)
    return [next(wide) if e > 1 else None for e in extents]


def _schedule_blocked(sch: s_tir.Schedule, blocks, split, decisions, most) -> None:  # noqa: ANN001
    """Per block of tile rows and part of the output channels, in parallel: the block's
    input transform, its products, its output transform (:func:`schedule_winograd`)."""
    pad, rows, inp, gemm, cols, out = blocks
    rows_per, parts = split
    alpha_h, alpha_w, _, ico, tiles, bi = (int(d) for d in _shape_of(sch, inp))
    m = _tile_of(sch)
    _, oco, oh, _, bo = (int(d) for d in _shape_of(sch, out))
    block_tiles = tiles // (oh // m) * rows_per
    # the output transform, in blocks: the parallel loop over (image, rows, part)
    b, co, y, x, o = sch.get_loops(out)
    yb, yr = sch.split(y, [None, rows_per * m])
    # sampled: parts that leave each at least two chunks, as the default does (one chunk
    # would drop a loop from the trace; SampledDecisions)
    most_parts = oco // 2 if oco // parts >= 2 else 1
    cs, ci = sch.split(co, [decisions.factor(sch, oco, parts, most_parts), None])
    chunks = cpu._extent(sch, ci)  # output channel chunks per part
    sch.reorder(b, yb, cs, ci, yr, x, o)
    blk = sch.fuse(b, yb, cs)
    sch.parallel(blk)
    yo, yi = sch.split(yr, [None, m])
    xo, xi = sch.split(x, [None, m])
    sch.reorder(ci, yo, xo, yi, xi, o)
    _output_tiles(sch, cols, xo, (yi, xi, o))
    # the block's products: the register tile of _schedule_gemm over its tiles
    sch.compute_at(gemm, blk)
    write = sch.cache_write(gemm, 0, "local")
    co2, p, o2 = _loops_by_dim(sch, write, blk, [alpha_h, alpha_w, 1, chunks, block_tiles, bo])[3:]
    _products_tiles(sch, gemm, (co2, p, o2), decisions, most)
    # the block's input transform (every input channel: each part needs all of them)
    sch.compute_at(inp, blk)
    e, nu, _, c, p, i = _loops_by_dim(sch, inp, blk, [alpha_h, alpha_w, 1, ico, block_tiles, bi])
    sch.reorder(*[lp for lp in (c, p, e, nu, i) if lp is not None])
    _input_tiles(sch, (pad, rows, inp), (e, nu, i))


def _schedule_input(sch: s_tir.Schedule, blocks: tuple) -> None:
    """Per tile (parallel over image, channel chunk, tile): the rows of B^T d, then B^T d B,
    each of the (m+2)^2 values unrolled, the channel lanes vectorized."""
    e, nu, b, c, p, i = sch.get_loops(blocks[2])
    sch.reorder(b, c, p, e, nu, i)
    sch.parallel(sch.fuse(b, c, p))
    _input_tiles(sch, blocks, (e, nu, i))


def _input_tiles(sch: s_tir.Schedule, blocks: tuple, loops: tuple) -> None:
    """One tile's input transform (``loops``: its (e, nu, lane) loops, innermost): the
    (m+2)^2 values unrolled, the rows of B^T d computed per e, the lanes vectorized, the
    padding read in place."""
    pad, rows, _ = blocks
    e, nu, i = loops
    sch.unroll(e)
    sch.unroll(nu)
    sch.vectorize(i)
    sch.compute_at(rows, e)
    rloops = sch.get_loops(rows)
    sch.unroll(rloops[-2])
    sch.vectorize(rloops[-1])
    sch.compute_inline(pad)


def products_tile(chunks: int, tiles: int, most: int) -> tuple[int, int]:
    """(output channel blocks, tiles) of the products' register tile, for ``chunks``
    output channel blocks, ``tiles`` input tiles and ``most`` one-block accumulators:
    the packed conv's choice (:func:`cpu._channel_blocks_tile`, a row of ``tiles``
    pixels), two blocks where they load less per FMA and the tile count has a divisor
    that keeps enough accumulators, else one block.

    Padded tiles are left out: on AVX2 (Zen 3, 2026-12-06) two blocks of 5 over ResNet's
    49 tiles (the last tile guarded) ran its 14x14 convs 2.0x slower alone, and two
    blocks of 7 (17 registers for 16: spilled) 1.5-1.6x."""
    blocks, _, padded = cpu._channel_blocks_tile(chunks, 1, tiles, most)
    blocks = 1 if padded is not None else blocks
    return blocks, cpu._pick_reg_n(tiles, cpu._block_pixels(most, blocks))


def _schedule_gemm(sch: s_tir.Schedule, gemm, decisions: cpu.Decisions, most: int) -> None:  # noqa: ANN001
    """The products' register tile (:func:`products_tile`): ``reg_n`` tiles x one or two
    output channel vectors, each step loading the blocks' weight vectors and
    broadcasting ``reg_n`` input values. Two blocks of 7 tiles (AVX-512; 49 tiles at
    28x28 in 4x4 tiles or 14x14 in 2x2) against one block of 7: ResNet-18 1.11x faster,
    DLA-34, VGG-11 and RepVGG-A0 1.12-1.13x, ResNet-18 at batch 8 1.15x, GoogLeNet 1.05x,
    DenseNet-121 1.04x, ResNet-50 1.03x (2-core Xeon, paired rounds); AVX2 code (the
    same machine, ``--cpu haswell``) 1.00-1.01x."""
    e, nu, b, co, p, o = sch.get_loops(sch.cache_write(gemm, 0, "local"))
    _products_tiles(sch, gemm, (co, p, o), decisions, most, parallel=(e, nu, b))


def _products_tiles(  # noqa: PLR0913
    sch: s_tir.Schedule,
    gemm,  # noqa: ANN001
    loops: tuple,
    decisions: cpu.Decisions,
    most: int,
    parallel: tuple = (),
) -> None:
    """The register tiles of the products under the write-back's innermost ``loops`` (oc
    chunk, tile, lane; the chunk loop None where it is one chunk); ``parallel``: the loops
    above them that make one parallel loop with the chunks outside the tile's."""
    co, p, o = loops
    tiles = cpu._extent(sch, p)
    chunks = 1 if co is None else cpu._extent(sch, co)
    blocks, reg_n = products_tile(chunks, tiles, most)
    reg_n = decisions.factor(sch, tiles, reg_n, cpu._block_pixels(most, blocks))
    po, pi = sch.split(p, [None, reg_n])
    if blocks > 1:
        co, coi = sch.split(co, [None, blocks])
        sch.reorder(co, po, coi, pi, o)
    if parallel:
        sch.parallel(sch.fuse(*parallel, co))
    sch.vectorize(o)
    sch.compute_at(gemm, po)
    if blocks > 1:
        sch.unroll(coi)
    sch.unroll(pi)
    cpu._split_reduction_into_tile(sch, gemm, po)


def _schedule_output(sch: s_tir.Schedule, cols, out) -> None:  # noqa: ANN001
    """Per output tile (parallel over image, channel chunk, tile row): M A, then A^T M A,
    unrolled, the channel lanes vectorized."""
    m = int(sch.get(cols).writes[0].source.shape[4])
    b, co, y, x, o = sch.get_loops(out)
    yo, yi = sch.split(y, [None, m])
    xo, xi = sch.split(x, [None, m])
    sch.reorder(b, co, yo, xo, yi, xi, o)
    sch.parallel(sch.fuse(b, co, yo))
    _output_tiles(sch, cols, xo, (yi, xi, o))


def _output_tiles(sch: s_tir.Schedule, cols, xo, loops: tuple) -> None:  # noqa: ANN001
    """One output tile under ``xo`` (``loops``: its row, column and lane loops): M A
    computed there, A^T M A unrolled, the lanes vectorized."""
    yi, xi, o = loops
    sch.unroll(yi)
    sch.unroll(xi)
    sch.vectorize(o)
    sch.compute_at(cols, xo)
    cloops = sch.get_loops(cols)
    sch.unroll(cloops[-3])
    sch.unroll(cloops[-2])
    sch.vectorize(cloops[-1])


# The legalization graphopt.targets._cpu layers over the previous one.
WRAP_LEGALIZE = {"relax.nn.conv2d": legalize_conv2d}

# Takes only kernels with a Winograd product stage.
RULES = [(RULE, rule_conv2d_winograd)]

# Its search space for ``graphopt tune`` (as ``_cpu_schedules.TUNABLE``): the products'
# register tile; one structure.
TUNABLE = {RULE: (schedule_winograd, (cpu.DEFAULT_PLAN,))}

# Kernels ``graphopt tune --space both`` searches in this space only, never in
# MetaSchedule's generic one (``tuning._space.phases_for``). The generic rules schedule
# the transforms and the products as unrelated stages; in the databases tuned for
# benchmarks/RESULTS.md that hold them their best was 1.76-9.95x the default. ResNet-50
# tuned 30 minutes on the Zen 4 spent 389 of its 1771 trials on its 10 Winograd kernels
# there, none within 1.76x, 14 of them builds cut off at the 60 s limit; ResNet-18's were
# 2.3-2.8x. That time now goes to the other kernels' searches.
OWN_SPACE_ONLY = frozenset({RULE})


def prefetch_products(sch: s_tir.Schedule) -> None:
    """Where the products run over the whole map in one parallel loop over (e, nu, image,
    output channel blocks) and the transformed weights are :data:`_prefetch.MIN_BYTES`
    or more, each step of the outer reduction loop (one input channel chunk), in the
    first passes over the tiles, prefetches the weight lines that the same step of the
    next parallel iteration will read: pass j < blocks those of its block j (the first
    pass all, with fewer passes than blocks). Applied to the default schedule and to a
    tuning record's (``tuning._apply``): the loops are found, not passed, and the
    addresses are the products' own indexing with the next iteration substituted
    (``_prefetch.next_read``); nothing is inserted where the next iteration reads the same
    lines (a record whose parallel loop is not over the channel blocks).

    Why: each parallel iteration reads its blocks' U once from memory (the first pass over
    the tiles) and again from cache (the others); the hardware prefetcher does not run
    ahead into the next iteration's, so each iteration started waiting on memory.
    ResNet-50's 7x7 convs (512 channels, 16.8 MB of U), alone after a 96 MB sweep, ran
    0.44-0.62 ms against 0.29-0.32 warm; with this, 0.32-0.36 cold and the same warm
    (2-core Zen 5). Every block's lines in the first pass instead: 0.45-0.50 cold; in
    steps of 4 or 8 chunks (64-128 lines at once): as slow cold as no prefetch."""
    found = _products_loops(sch)
    if found is None:
        return
    gemm, weight, outer, po, chunk, blocks = found
    loops = sch.get_loops(gemm)
    dt = _prefetch.dtype(_prefetch.loop_var(sch, outer))
    b, lane = tirx.Var("pf_block", dt), tirx.Var("pf_lane", dt)
    # where the next iteration's block b reads lane line ``lane`` at this chunk (its first
    # tile and vector lane)
    values = [(loops[3], lane), *[(lp, tirx.const(0, dt)) for lp in loops[-2:]]]
    if blocks > 1:
        values.append((loops[4], b))
    address = _prefetch.next_read(sch, gemm, weight, values)
    if address is None:
        return
    n_lanes = cpu._extent(sch, loops[3])
    lines = _prefetch.serial(lane, n_lanes, _prefetch.prefetch(weight, address))
    tile_pass = _prefetch.loop_var(sch, po)
    pdt = _prefetch.dtype(tile_pass)
    if cpu._extent(sch, po) >= blocks:
        one = _prefetch.serial(b, 1, lines, start=tirx.Cast(dt, tile_pass))
        fetch = tirx.IfThenElse(tile_pass < tirx.const(blocks, pdt), one, None)
    else:
        every = _prefetch.serial(b, blocks, lines)
        fetch = tirx.IfThenElse(tile_pass == tirx.const(0, pdt), every, None)
    _prefetch.insert_at_loop(sch, chunk, fetch)


def _products_loops(sch: s_tir.Schedule):  # noqa: ANN202
    """(products block, its weight, parallel loop, tile pass loop, chunk loop, channel
    blocks) of a whole-map products nest that streams U (parallel, pass, chunk, lane,
    [block,] tile, vector lane: :func:`_products_tiles`' shape), or None."""
    if not _prefetch.enabled():
        return None
    try:
        gemm = sch.get_sblock(RULE + "_update")
    except ScheduleError:  # not a Winograd kernel's products
        return None
    weight = _prefetch.param_read(sch, gemm, 6)
    if weight is None or cpu._bytes(weight) < _prefetch.MIN_BYTES:
        return None
    loops = sch.get_loops(gemm)
    kinds = [sch.get(lp).kind for lp in loops]
    if len(loops) not in (6, 7) or kinds[0] != tirx.ForKind.PARALLEL:
        return None
    if any(k != tirx.ForKind.SERIAL for k in kinds[1:4]):
        return None
    roles = cpu._loop_kinds(sch, gemm, loops[1:])
    if roles[:3] != ["S", "R", "R"] or any(r != "S" for r in roles[3:]):
        return None
    blocks = cpu._extent(sch, loops[4]) if len(loops) == 7 else 1
    return gemm, weight, loops[0], loops[1], loops[2], blocks


# What the default schedule puts into the nest outside its trace, for a replayed tuning
# record too (``_cpu.after_trace``).
AFTER_TRACE = (prefetch_products,)
