"""Winograd 3x3 convs (graphopt/targets/_winograd.py): which convs take it, that their
numbers match onnxruntime (the compile's verification) and the direct conv, that its
tuning space starts at the default, and the same on ARM under qemu (slow tier)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.prepare import prepare  # noqa: E402
from graphopt.targets import _prefetch, _winograd  # noqa: E402
from graphopt.targets._simd import fma_lanes  # noqa: E402
from tests._system import CROSS_GXX, QEMU  # noqa: E402
from tests.conftest import make_model  # noqa: E402
from tests.targets._cnn_blocks import conv_rules  # noqa: E402

WINOGRAD, DIRECT = _winograd.RULE, "conv2d_nchwc"


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _conv(x: str, w: str, b: str | None, y: str, **attrs) -> object:  # noqa: ANN003
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], **attrs)


def basic_block():  # noqa: ANN201
    """ResNet's basic block: conv+bias, ReLU, conv, residual add, ReLU; 16x16 map (F(4x4):
    16 tiles)."""
    rng = np.random.default_rng(0)
    nodes = [
        _conv("x", "w1", "b1", "a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", None, "c", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    inits = {"w1": _w(rng, 32, 32, 3, 3), "b1": rng.standard_normal(32).astype(np.float32)}
    inits["w2"] = _w(rng, 32, 32, 3, 3)
    return make_model(nodes, {"x": (1, 32, 16, 16)}, {"y": (1, 32, 16, 16)}, inits), {WINOGRAD: 2}


def odd_map():  # noqa: ANN201
    """A 15x15 map (F(3x3) with 8 or 16 lanes, F(4x4) on ARM's 4, the last tile row and
    column cropped), 16 -> 48 channels."""
    rng = np.random.default_rng(1)
    nodes = [_conv("x", "w", "b", "y", pads=[1, 1, 1, 1])]
    inits = {"w": _w(rng, 48, 16, 3, 3), "b": rng.standard_normal(48).astype(np.float32)}
    return make_model(nodes, {"x": (1, 16, 15, 15)}, {"y": (1, 48, 15, 15)}, inits), {WINOGRAD: 1}


def unpadded_rectangle():  # noqa: ANN201
    """No padding, a 18x26 input (16x24 out: F(4x4), 24 tiles), 32 -> 16 channels, Clip."""
    rng = np.random.default_rng(2)
    nodes = [
        _conv("x", "w", None, "c"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
    ]
    inits = {"w": _w(rng, 16, 32, 3, 3), "lo": np.float32(0), "hi": np.float32(6)}
    return make_model(nodes, {"x": (1, 32, 18, 26)}, {"y": (1, 16, 16, 24)}, inits), {WINOGRAD: 1}


def where_it_does_not_pay():  # noqa: ANN201
    """Convs Winograd does not take: stride 2, dilation 2, a 5x5 kernel, a 6x6 map (9
    tiles), the thin RGB stem (3 input channels)."""
    rng = np.random.default_rng(3)
    nodes = [
        _conv("x", "w0", None, "a", pads=[1, 1, 1, 1]),  # stem, 3 channels in
        _conv("a", "w1", None, "b", pads=[1, 1, 1, 1], strides=[2, 2]),  # 12 -> 6
        _conv("b", "w2", None, "c", pads=[2, 2, 2, 2], dilations=[2, 2]),
        _conv("c", "w3", None, "d", pads=[2, 2, 2, 2]),  # 5x5
        _conv("d", "w4", None, "y", pads=[1, 1, 1, 1]),  # 6x6 map: 9 tiles of 2x2
    ]
    inits = {"w0": _w(rng, 16, 3, 3, 3), "w1": _w(rng, 16, 16, 3, 3), "w2": _w(rng, 16, 16, 3, 3)}
    inits |= {"w3": _w(rng, 16, 16, 5, 5), "w4": _w(rng, 16, 16, 3, 3)}
    return make_model(nodes, {"x": (1, 3, 12, 12)}, {"y": (1, 16, 6, 6)}, inits), {DIRECT: 5}


def two_images():  # noqa: ANN201
    """Batch 2, a 24x24 map (F(4x4), 6 tile rows), 32 -> 128 channels: the blocked
    schedule's parallel loop runs over both images' tile rows and two channel parts."""
    rng = np.random.default_rng(4)
    nodes = [_conv("x", "w", "b", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    inits = {"w": _w(rng, 128, 32, 3, 3), "b": rng.standard_normal(128).astype(np.float32)}
    return make_model(nodes, {"x": (2, 32, 24, 24)}, {"y": (2, 128, 24, 24)}, inits), {WINOGRAD: 1}


def last_stage():  # noqa: ANN201
    """ResNet's 7x7 stage conv, 512 channels (16 MiB of transformed weights: prefetched)."""
    rng = np.random.default_rng(5)
    nodes = [_conv("x", "w", "b", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    inits = {"w": _w(rng, 512, 512, 3, 3), "b": rng.standard_normal(512).astype(np.float32)}
    return make_model(nodes, {"x": (1, 512, 7, 7)}, {"y": (1, 512, 7, 7)}, inits), {WINOGRAD: 1}


def downsample_block():  # noqa: ANN201
    """ResNet's downsampling basic block: a stride-2 3x3 conv+bias, ReLU, a 3x3 conv, the
    1x1 stride-2 shortcut added, ReLU; 32x32 in, 16x16 out. The strided conv runs as
    its three Winograd parts and its centre tap's 1x1 conv (whatever the host's lanes:
    4x4 or 2x2 tiles), the 3x3 one as one Winograd kernel."""
    rng = np.random.default_rng(6)
    nodes = [
        _conv("x", "w1", "b1", "a", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", None, "c", pads=[1, 1, 1, 1]),
        _conv("x", "wd", None, "d", strides=[2, 2]),
        helper.make_node("Add", ["c", "d"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    inits = {"w1": _w(rng, 32, 16, 3, 3), "b1": rng.standard_normal(32).astype(np.float32)}
    inits |= {"w2": _w(rng, 32, 32, 3, 3), "wd": _w(rng, 32, 16, 1, 1)}
    model = make_model(nodes, {"x": (1, 16, 32, 32)}, {"y": (1, 32, 16, 16)}, inits)
    return model, {WINOGRAD: 4, "pointwise_nchwc": 1}  # the two 1x1 convs: one kernel


def odd_downsample():  # noqa: ANN201
    """A stride-2 3x3 conv on a 33x33 map (17x17 out: the parts' last tile row and
    column cropped, the odd phases one row shorter than the even), 16 -> 48 channels."""
    rng = np.random.default_rng(9)
    nodes = [_conv("x", "w", "b", "y", pads=[1, 1, 1, 1], strides=[2, 2])]
    inits = {"w": _w(rng, 48, 16, 3, 3), "b": rng.standard_normal(48).astype(np.float32)}
    model = make_model(nodes, {"x": (1, 16, 33, 33)}, {"y": (1, 48, 17, 17)}, inits)
    return model, {WINOGRAD: 3, "pointwise_nchwc": 1}


MODELS = {
    "basic_block": basic_block,
    "downsample_block": downsample_block,
    "odd_downsample": odd_downsample,
    "two_images": two_images,
    "odd_map": odd_map,
    "unpadded_rectangle": unpadded_rectangle,
    "where_it_does_not_pay": where_it_does_not_pay,
}


def _direct_conv_flops(model) -> int:  # noqa: ANN001
    """2 x output elements x input channels x kernel taps of every conv (groups 1)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    }
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = weights[node.input[1]]
            total += 2 * int(np.prod(dims[node.output[0]])) * w[1] * w[2] * w[3]
    return total


@pytest.mark.parametrize("name", list(MODELS))
def test_3x3_convs_take_winograd_where_it_pays_and_match_onnxruntime(name: str, tmp_path) -> None:
    model, rules = MODELS[name]()
    a = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert a.manifest["verification"]["ok"]
    schedule = a.manifest["schedule"]
    assert conv_rules(schedule) == rules
    assert schedule["coverage"] == 100.0
    # the profile counts a Winograd conv's FLOPs as the direct conv's (GFLOP/s comparable)
    assert schedule["conv_matmul_flops"] == _direct_conv_flops(model)


@pytest.mark.parametrize(
    ("name", "direct_rules"),
    [
        ("basic_block", {DIRECT: 2}),
        ("odd_map", {DIRECT: 1}),
        ("downsample_block", {DIRECT: 2, "pointwise_nchwc": 1}),
        ("odd_downsample", {DIRECT: 1}),
    ],
)
def test_winograd_matches_the_direct_conv(
    name: str, direct_rules: dict, tmp_path, monkeypatch
) -> None:
    """The same block with ``GRAPHOPT_WINOGRAD=0`` (every conv direct): the outputs agree
    to float32 rounding of the transforms, far inside the verification's tolerance (the
    odd map: F(3x3) on x86 hosts, whose G has thirds; the strided parts' F(4, 2) too)."""
    model, _ = MODELS[name]()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    fast = graphopt.compile(model, "x86", tmp_path / "w.so")
    monkeypatch.setenv("GRAPHOPT_WINOGRAD", "0")
    direct = graphopt.compile(model, "x86", tmp_path / "d.so")
    assert conv_rules(direct.manifest["schedule"]) == direct_rules
    y_fast, y_direct = fast.run({"x": x})["y"], direct.run({"x": x})["y"]
    scale = float(np.abs(y_direct).max())
    assert np.abs(y_fast - y_direct).max() <= 1e-5 * scale
    assert not np.array_equal(y_fast, y_direct)  # two different algorithms ran


def test_strided_parts_can_be_switched_off(tmp_path, monkeypatch) -> None:
    """``GRAPHOPT_WINOGRAD_STRIDED=0``: the stride-2 conv direct, the stride-1 one still
    Winograd; the same numbers to rounding."""
    model, _ = downsample_block()
    x = np.random.default_rng(10).standard_normal((1, 16, 32, 32)).astype(np.float32)
    parts = graphopt.compile(model, "x86", tmp_path / "p.so")
    monkeypatch.setenv("GRAPHOPT_WINOGRAD_STRIDED", "0")
    direct = graphopt.compile(model, "x86", tmp_path / "d.so")
    assert conv_rules(direct.manifest["schedule"]) == {WINOGRAD: 1, DIRECT: 1, "pointwise_nchwc": 1}
    y_parts, y_direct = parts.run({"x": x})["y"], direct.run({"x": x})["y"]
    assert np.abs(y_parts - y_direct).max() <= 1e-5 * float(np.abs(y_direct).max())


@pytest.mark.parametrize(
    ("size", "lanes", "expected"),
    [
        (28, 8, 4),  # ResNet's first strided conv (56 -> 28) on AVX2 or Zen 4
        (28, 16, 4),
        (14, 8, 3),  # the second (28 -> 14)
        (14, 16, 2),
        (7, 8, None),  # the last (14 -> 7): 16 tiles read too many weights
        (7, 16, None),
        (6, 8, None),  # 9 tiles
        (112, 4, 4),
    ],
)
def test_strided_tile_size(size: int, lanes: int, expected: int | None) -> None:
    assert _winograd.strided_tile_size(size, size, lanes) == expected


def test_strided_parts_sum_to_the_strided_conv() -> None:
    """The parts' kernels on their own, in numpy: the 2x2, 2x1 and 1x2 parts plus the
    centre tap equal the stride-2 conv with padding 1, for each tile size (odd map)."""
    from tvm import te

    rng = np.random.default_rng(11)
    lanes, size = 4, 9  # one channel block in and out, 9x9 -> 5x5
    x = rng.standard_normal((1, 1, size, size, lanes)).astype(np.float32)
    w = rng.standard_normal((1, 1, 3, 3, lanes, lanes)).astype(np.float32)
    out = (size - 1) // 2 + 1
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((1, 1, out, out, lanes), np.float32)
    for ky in range(3):
        for kx in range(3):
            window = padded[:, :, ky : ky + 2 * out : 2, kx : kx + 2 * out : 2]
            want += np.einsum("bcyxi,io->bcyxo", window, w[0, 0, ky, kx])[:, :1]
    for m in (2, 3, 4):
        got = np.einsum("bcyxi,io->bcyxo", x[:, :, ::2, ::2], w[0, 0, 1, 1])
        for rows in _winograd._PHASE_TAPS:
            for cols in _winograd._PHASE_TAPS:
                if len(rows) == len(cols) == 1:
                    continue
                taps = _winograd._taps(m, (len(rows), len(cols)))
                wt = te.placeholder(w.shape, name="w")
                tt = te.placeholder(taps.shape, name="t")
                u = _winograd._weight_transform(wt, tt, rows, cols)
                d = te.placeholder(x.shape, name="d")
                ut = te.placeholder([int(v) for v in u.shape], name="u")
                y = _winograd.winograd_te(d, ut, (1, 1, 1, 1), m, 2)
                u_np = _run_te([wt, tt], u, [w, taps])
                got = got + _run_te([d, ut], y, [x, u_np])
        assert np.abs(got - want).max() <= 1e-4 * float(np.abs(want).max()), m


def _run_te(placeholders: list, out, values: list) -> np.ndarray:  # noqa: ANN001
    """``out`` (a TE tensor) built unscheduled for the host and run on ``values``."""
    from tvm import te

    func = tvm.compile(te.create_prim_func([*placeholders, out]), target="llvm")
    args = [tvm.runtime.tensor(v) for v in values]
    args.append(tvm.runtime.empty([int(v) for v in out.shape], "float32"))
    func(*args)
    return args[-1].numpy()


def test_blocked_schedule_matches_the_whole_map_stages(tmp_path, monkeypatch) -> None:
    """The same block with ``GRAPHOPT_WINOGRAD_BLOCKS=0`` (input transform, products and
    output transform each over the whole map): the same numbers, to float32 rounding."""
    model, _ = two_images()
    x = np.random.default_rng(8).standard_normal((2, 32, 24, 24)).astype(np.float32)
    blocked = graphopt.compile(model, "x86", tmp_path / "b.so")
    monkeypatch.setenv("GRAPHOPT_WINOGRAD_BLOCKS", "0")
    whole = graphopt.compile(model, "x86", tmp_path / "w.so")
    assert whole.manifest["verification"]["ok"]
    y_blocked, y_whole = blocked.run({"x": x})["y"], whole.run({"x": x})["y"]
    assert np.abs(y_blocked - y_whole).max() <= 1e-6 * float(np.abs(y_whole).max())


def _winograd_schedule(  # noqa: ANN202
    images: int, channels: int, size: int, cpu: str = "znver4", m: int | None = None
):
    """The default schedule of a ``channels`` -> ``channels`` Winograd conv (padding 1)
    on ``images`` maps of ``size`` x ``size``, for the x86 target with LLVM CPU ``cpu``
    (default an AVX-512 one, whatever the host: these tests check the schedule's
    structure, which follows the vector unit), in its channel blocks, in tiles of ``m``
    (default :func:`tile_size`'s)."""
    from tvm import s_tir, te

    from graphopt.targets import _cpu_schedules, resolve

    target = tvm.target.Target(resolve("x86", cpu=cpu).tvm)
    lanes = _cpu_schedules.vector_lanes(target)
    m = m or _winograd.tile_size(size, size, fma_lanes(target), images)
    data = te.placeholder((images, channels // lanes, size, size, lanes), name="data")
    alpha = m + 2
    u = te.placeholder((alpha, alpha, channels // lanes, channels // lanes, lanes, lanes), name="u")
    out = _winograd.winograd_te(data, u, (1, 1, 1, 1), m)
    func = te.create_prim_func([data, u, out])
    return _winograd.schedule_winograd(s_tir.Schedule(func), target)


def _parallel_extents(sch) -> list[int]:  # noqa: ANN001
    """The extents of the parallel loops of the scheduled kernel, in order."""
    return [int(n) for n in re.findall(r"T\.parallel\((\d+)\)", sch.mod.script())]


@pytest.mark.parametrize(
    ("images", "channels", "size", "m", "parallel"),
    [
        (1, 64, 56, 4, [28]),  # ResNet's 56x56 stage: 14 tile rows x 2 channel halves
        (1, 128, 28, 4, [14]),  # 7 tile rows x 2
        (2, 64, 16, 4, [16]),  # two images of 4 tile rows, 2 halves
        (1, 32, 16, 4, [8]),  # 4 tile rows x both channel chunks (fewer than 12 iterations)
        (1, 64, 112, 4, [56]),  # 28 tile rows x 2 (a tile row of V: 258 KiB)
        # the three whole-map stages (input transform, products, output transform):
        (1, 512, 7, 2, [512, 256, 128]),  # F(2x2) on 7x7: the last tile row is cut
        (1, 256, 14, 2, [784, 128, 112]),  # 4 MiB of transformed weights
        (1, 96, 224, 4, [18816, 108, 336]),  # a tile row of V is 756 KiB
    ],
)
def test_blocked_schedule_where_a_block_fits(images, channels, size, m, parallel) -> None:  # noqa: ANN001
    """One parallel loop over blocks (a tile row, part of the output channels: its
    transformed input and products in a core's L2), or the three whole-map stages."""
    assert _parallel_extents(_winograd_schedule(images, channels, size, m=m)) == parallel


@pytest.mark.parametrize(
    ("channels", "size", "parallel"),
    [
        # a tile row of 14 takes one channel block of 7 tiles, the whole map's 196 two
        # blocks of 4: the whole-map stages
        (64, 56, [1568, 144, 112]),
        # a tile row of 7 and the whole map's 49 take the same one-block tile: blocked
        (128, 28, [14]),
    ],
)
def test_avx2_blocks_only_where_a_block_keeps_the_register_tile(channels, size, parallel) -> None:  # noqa: ANN001
    assert _parallel_extents(_winograd_schedule(1, channels, size, cpu="znver3")) == parallel


def test_blocked_schedule_can_be_switched_off(monkeypatch) -> None:
    monkeypatch.setenv("GRAPHOPT_WINOGRAD_BLOCKS", "0")
    assert len(_parallel_extents(_winograd_schedule(1, 64, 56))) == 3


@pytest.mark.parametrize(
    ("size", "lanes", "images", "expected"),
    [
        (56, 8, 1, 4),  # 196 tiles of 4x4: the fewest FLOPs, and bound by them
        (28, 8, 1, 4),
        (28, 16, 1, 4),
        (16, 8, 1, 4),
        (14, 8, 1, 3),  # AVX2: 25 tiles of 3x3 (15x15 computed); 4x4 would wait on memory
        (14, 16, 1, 2),  # full-rate AVX-512 (twice the FLOPs per byte): 2x2, the fewest weights
        (14, 4, 1, 4),  # NEON: 4x4 (16x16 computed)
        (14, 16, 8, 4),  # batch 8: each weight serves 8 maps' tiles
        (13, 8, 1, 3),  # SqueezeNet's 13x13
        (27, 8, 1, 4),  # and 27x27, 55x55: 4x4, padded
        (55, 16, 1, 4),
        (7, 8, 1, 2),  # 16 tiles of 2x2; 3x3 and 4x4 give too few
        (7, 16, 1, 2),
        (6, 8, 1, None),  # 9 tiles at most: direct
    ],
)
def test_tile_size(size: int, lanes: int, images: int, expected: int | None) -> None:
    assert _winograd.tile_size(size, size, lanes, images) == expected


@pytest.mark.parametrize(
    ("cpu", "size", "expected"),
    [
        ("znver4", 14, 3),  # AVX-512 at AVX2's FMA rate: AVX2's balance, 3x3 tiles
        ("sapphirerapids", 14, 2),  # full-rate AVX-512: 2x2
        ("znver5", 14, 2),
        ("znver4", 28, 4),
        ("sapphirerapids", 7, 2),
    ],
)
def test_a_packed_conv_takes_the_tile_its_cpu_fmas_call_for(
    cpu: str, size: int, expected: int
) -> None:
    """:func:`_winograd._plan` on a 16-lane packed 256-channel conv: the balance follows
    the FMAs the CPU retires per cycle, not only its register width."""
    from tvm import relax

    x = relax.Var("x", relax.TensorType((1, 16, size, size, 16), "float32"))
    w = relax.Var("w", relax.TensorType((16, 16, 3, 3, 16, 16), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        conv = relax.op.nn.conv2d(
            x, w, padding=1, data_layout="NCHW16c", kernel_layout="OIHW16i16o", out_layout="NCHW16c"
        )
        call = bb.normalize(conv)
        bb.emit_func_output(call)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})
    assert _winograd._plan(call, target) == expected


@pytest.mark.parametrize(
    ("chunks", "tiles", "most", "expected"),
    [
        (8, 49, 28, (2, 7)),  # AVX-512, 28x28 in 4x4 tiles: 2 blocks x 7 (14 accumulators)
        (8, 196, 28, (2, 7)),  # 56x56: 2 x 7 loads less per FMA than 1 x 28
        (3, 49, 28, (1, 7)),  # an odd number of channel blocks: one
        (8, 49, 12, (1, 7)),  # AVX2: 2 x 5 has no divisor of 49 but 1
        (8, 196, 12, (2, 4)),  # AVX2, 56x56: 2 x 4 (8 accumulators, the FMA latency)
    ],
)
def test_products_tile(chunks: int, tiles: int, most: int, expected: tuple) -> None:
    assert _winograd.products_tile(chunks, tiles, most) == expected


@pytest.mark.parametrize("name", ["basic_block", "two_images", "last_stage", "downsample_block"])
def test_tuning_space_starts_at_the_default_and_its_points_compute_the_same(name: str) -> None:
    """two_images: the blocked schedule's channel parts (2 or 4 of 8 chunks) are sampled
    as well; last_stage: a default with its weights prefetched (not in the trace);
    downsample_block: the strided conv's parts, their transforms not square."""
    from tvm import s_tir

    from graphopt.lower import to_relax
    from graphopt.targets import resolve
    from graphopt.tuning._session import Targets
    from graphopt.tuning._space import default_trace, graphopt_design_spaces
    from graphopt.tuning._tasks import extract_tasks
    from tests.tuning._spaces import assert_points_match, random_args, run_kernel

    model, _ = (MODELS | {"last_stage": last_stage})[name]()
    _, graph, _ = prepare(model)
    targets = Targets.of(resolve("x86"), "nchwc")
    found = extract_tasks(to_relax(graph), targets.spec, targets.compile_target, None, "nchwc")
    tasks = [
        t
        for t in found
        if str(targets.default_scheduled(t)["main"].attrs["graphopt.schedule_rule"]) == WINOGRAD
    ]
    assert tasks
    rng = np.random.default_rng(0)
    for task in tasks:
        default = targets.default_scheduled(task)
        assert default_trace(task.mod, targets.tune_target, default) is not None
        args = random_args(task.mod, rng)
        expected = run_kernel(default, args)
        spaces = graphopt_design_spaces(s_tir.Schedule(task.mod), targets.tune_target)
        assert spaces
        assert_points_match(task.mod, spaces[0], expected, args, [1, 2, 3])


@pytest.mark.slow
@CROSS_GXX
@QEMU
@pytest.mark.parametrize("name", ["basic_block", "odd_map", "downsample_block"])
def test_winograd_on_arm_matches_onnxruntime(name: str, tmp_path) -> None:
    model, rules = MODELS[name]()
    # ARM's default layout is NHWC; the packed one gives Winograd its NCHW[4]c convs
    a = graphopt.compile(model, "arm", tmp_path / "m.so", layout="nchwc")
    assert a.manifest["verification"]["ok"]
    assert conv_rules(a.manifest["schedule"]) == rules


def test_blocked_products_keep_the_register_tile() -> None:
    """A block's products use the register tile :func:`products_tile` picks for its
    chunks and tiles with the target's accumulators (ResNet's 56x56 stage, a block of 14
    tiles and 2 chunks: 2 channel blocks x 7 tiles, unrolled), as the whole-map products
    do. bf77d86 passed the channel parts' sampling bound there instead, and the blocks
    ran a tile of 1 block x 2 tiles."""
    from graphopt.targets import _cpu_schedules as cpu
    from graphopt.targets import resolve

    most = cpu.max_reg_n(tvm.target.Target(resolve("x86", cpu="znver4").tvm))
    blocks, reg_n = _winograd.products_tile(2, 14, most)
    unrolled = re.findall(r"T\.unroll\((\d+)\)", _winograd_schedule(1, 64, 56).mod.script())
    assert (blocks, reg_n) == (2, 7)
    assert any(unrolled[i : i + 2] == ["2", "7"] for i in range(len(unrolled) - 1))


def _prefetches(sch) -> list:  # noqa: ANN001
    """(weight load, the loops above it) of each prefetch in a scheduled kernel."""
    from tvm import tirx

    found = []

    def walk(node, loops: list) -> None:  # noqa: ANN001
        if isinstance(node, tirx.Evaluate):
            call = node.value
            if getattr(call, "op", None) is not None and call.op.name == "tirx.call_llvm_intrin":
                found.append((call.args[1].args[0], loops))
            return
        if isinstance(node, tirx.For):
            loops = [*loops, node]
        for name in ("body", "then_case", "else_case", "block", "init"):
            child = getattr(node, name, None)
            if child is not None:
                walk(child, loops)
        for child in getattr(node, "seq", None) or []:
            walk(child, loops)

    walk(sch.mod["main"].body, [])
    return found


@pytest.mark.parametrize(("images", "channels", "size"), [(1, 512, 7), (1, 256, 14), (2, 256, 14)])
def test_products_prefetch_what_the_next_iteration_reads(images, channels, size) -> None:  # noqa: ANN001
    """Where the transformed weights stream from memory (1 MiB or more: ResNet's 7x7 and
    14x14 stages), pass j < blocks over the tiles prefetches, at each input channel
    chunk, the weight lines that the next parallel iteration's channel block j reads at
    that chunk (with two images, after the last blocks the next image's first); the
    last iteration its own again."""
    from tvm import tirx

    sch = _winograd_schedule(images, channels, size)
    (load, loops), *others = _prefetches(sch)
    assert not others
    outer, tile_pass, step, pf_block, pf_lane = loops
    assert outer.kind == tirx.ForKind.PARALLEL
    products = sch.get_sblock("conv2d_winograd_update")
    nest = [sch.get(lp) for lp in sch.get_loops(products)]
    reads = _prefetch.read_indices(sch, products, load.source)
    fetched = tirx.IndexMap(
        [lp.loop_var for lp in (outer, tile_pass, step, pf_block, pf_lane)],
        list(load.indices),
        None,
    )
    # the products' loops: parallel, tile pass, chunk, lane, block, tile, vector lane
    names = [str(lp.loop_var) for lp in nest]
    assert names[:3] == [str(outer.loop_var), str(tile_pass.loop_var), str(step.loop_var)]
    blocks, iterations = int(nest[4].extent), int(outer.extent)
    assert blocks == 2 and int(tile_pass.extent) >= blocks

    def ints(exprs) -> list[int]:  # noqa: ANN001
        return [int(x) for x in exprs]

    def c(v: int):  # noqa: ANN202
        return tirx.const(v, "int64")

    for i in range(iterations):
        for j in range(blocks):
            for chunk, lane in [(0, 0), (int(step.extent) - 1, 15)]:
                got = ints(fetched.map_indices([c(i), c(j), c(chunk), c(j), c(lane)]))
                nxt = min(i + 1, iterations - 1)
                assert got == reads([nxt, 0, chunk, lane, j, 0, 0]), (i, j, chunk, lane)


def test_small_or_switched_off_weights_are_not_prefetched(monkeypatch) -> None:
    """ResNet's 56x56 and 28x28 stages (blocked: their U stays in cache) and a 16x16 map
    of 32 channels: no prefetch; nor with GRAPHOPT_PREFETCH=0."""
    assert not _prefetches(_winograd_schedule(1, 64, 56))
    assert not _prefetches(_winograd_schedule(1, 32, 16))
    monkeypatch.setenv("GRAPHOPT_WINOGRAD_BLOCKS", "0")
    assert not _prefetches(_winograd_schedule(1, 64, 56))  # 590 KB of U, whole-map stages
    monkeypatch.setenv("GRAPHOPT_PREFETCH", "0")
    assert not _prefetches(_winograd_schedule(1, 512, 7))


def test_prefetching_conv_matches_onnxruntime_and_without(tmp_path, monkeypatch) -> None:
    """A 256-channel 14x14 conv (4 MiB of transformed weights, prefetched): verified
    against onnxruntime, and the same numbers bit for bit as with GRAPHOPT_PREFETCH=0."""
    rng = np.random.default_rng(9)
    nodes = [_conv("x", "w", "b", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    inits = {"w": _w(rng, 256, 256, 3, 3), "b": rng.standard_normal(256).astype(np.float32)}
    model = make_model(nodes, {"x": (1, 256, 14, 14)}, {"y": (1, 256, 14, 14)}, inits)
    x = rng.standard_normal((1, 256, 14, 14)).astype(np.float32)
    on = graphopt.compile(model, "x86", tmp_path / "on.so")
    assert on.manifest["verification"]["ok"]
    assert conv_rules(on.manifest["schedule"]) == {WINOGRAD: 1}
    monkeypatch.setenv("GRAPHOPT_PREFETCH", "0")
    off = graphopt.compile(model, "x86", tmp_path / "off.so")
    assert np.array_equal(on.run({"x": x})["y"], off.run({"x": x})["y"])
