"""Default x86 schedules: every kernel scheduled, numerics match onnxruntime, and a rule
that must not fire does not (each zoo model's whole compile against onnxruntime is
tests/test_zoo.py's).

"Unscheduled" here means a PrimFunc that no rule claimed, or one with more than
``BIG_KERNEL`` loop iterations and not a single parallel or vectorized loop (that is what
LegalizeOps' naive loops look like).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.lower import to_relax  # noqa: E402
from graphopt.prepare import prepare  # noqa: E402
from graphopt.targets import _cpu_schedules as cpu  # noqa: E402
from graphopt.targets import resolve  # noqa: E402
from graphopt.zoo import ZOO, build  # noqa: E402
from tests.conftest import zoo_model  # noqa: E402

BIG_KERNEL = 4096
_UP_TO_SCHEDULE = ("library_dispatch", "layout", "legalize", "schedule")


def _scheduled_module(
    model: onnx.ModelProto, target_name: str = "x86", layout: str | None = None, **options
) -> tvm.IRModule:
    """A CPU pipeline up to and including its schedule phase (no LLVM codegen), in the
    target's default layout or ``layout``."""
    spec = resolve(target_name, **options)
    _, graph, _ = prepare(model)
    mod = to_relax(graph)
    target = tvm.target.Target(spec.tvm)
    phases = spec.target.phases(target, layout)
    with target:
        for name in _UP_TO_SCHEDULE:
            mod = tvm.transform.Sequential(phases[name])(mod)
    return mod


@functools.cache
def _zoo_scheduled(name: str, target_name: str = "x86", layout: str | None = None) -> tvm.IRModule:
    """A zoo model's :func:`_scheduled_module`, built once for the tests that read it."""
    return _scheduled_module(zoo_model(name), target_name, layout)


def _children(stmt) -> list:  # noqa: ANN001
    if isinstance(stmt, tvm.tirx.SeqStmt):
        return list(stmt.seq)
    out = []
    for attr in ("body", "block", "init", "then_case", "else_case"):
        child = getattr(stmt, attr, None)
        if isinstance(child, tvm.tirx.Stmt):
            out.append(child)
    return out


def _walk(stmt) -> tuple[int, set]:  # noqa: ANN001
    """(innermost statement executions, loop kinds seen) for a TIR statement tree."""
    kinds: set = set()
    work = 0
    for child in _children(stmt):
        w, k = _walk(child)
        work += w
        kinds |= k
    if isinstance(stmt, tvm.tirx.For):
        kinds.add(stmt.kind)
        work *= int(stmt.extent) if hasattr(stmt.extent, "value") else 1
    return max(work, 1), kinds


def unscheduled_kernels(mod: tvm.IRModule) -> list[str]:
    bad = []
    fast = {tvm.tirx.ForKind.PARALLEL, tvm.tirx.ForKind.VECTORIZED}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs is None or "graphopt.schedule_rule" not in func.attrs:
            bad.append(f"{gvar.name_hint}: no rule applied")
            continue
        work, kinds = _walk(func.body)
        if work > BIG_KERNEL and not kinds & fast:
            bad.append(f"{gvar.name_hint}: {work} iterations, no parallel/vector loop")
    return bad


def _rules_used(mod: tvm.IRModule) -> dict[str, str]:
    return {
        gvar.name_hint: str(func.attrs["graphopt.schedule_rule"])
        for gvar, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
        and func.attrs
        and "graphopt.schedule_rule" in func.attrs
    }


@pytest.mark.parametrize("name", list(ZOO))
def test_every_kernel_is_scheduled(name: str) -> None:
    assert unscheduled_kernels(_zoo_scheduled(name)) == []


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "small_cnn"])
def test_every_conv_uses_the_packed_conv_rule(name: str) -> None:
    # A rule that raises declines quietly; this catches the conv rule breaking.
    rules = _rules_used(_zoo_scheduled(name))
    convs = {k: v for k, v in rules.items() if "conv2d" in k}
    assert len(convs) >= 4
    packed = {"conv2d_nchwc", "pointwise_nchwc", "depthwise_nchwc", "grouped_nchwc"}
    packed.add("conv2d_winograd")  # the 3x3 stride-1 convs (targets/_winograd.py)
    packed.add("depthwise_pointwise_nchwc")  # a depthwise conv with its 1x1 (_fuse_dwpw.py)
    assert set(convs.values()) <= packed and "conv2d_nchwc" in convs.values()


def _thin_input_conv_model(k: int, size: int) -> onnx.ModelProto:
    """An RGB image's first conv: 3 -> 16 channels, k x k, stride 2, same padding, ReLU."""
    rng = np.random.default_rng(k + size)
    w = numpy_helper.from_array(rng.standard_normal((16, 3, k, k)).astype("float32"), "w")
    conv = helper.make_node(
        "Conv", ["x", "w"], ["c"], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[2, 2]
    )
    out = -(-size // 2)
    relu = helper.make_node("Relu", ["c"], ["y"])
    return _model([conv, relu], {"x": [1, 3, size, size]}, ("y", [1, 16, out, out]), [w])


@pytest.mark.parametrize("k,size", [(7, 225), (3, 65)])
def test_a_thin_input_pads_in_a_pass_of_its_own_by_rows(k: int, size: int) -> None:
    """An RGB input's padding is a pass of its own, parallel over its padded rows with
    each row's (width x 3 channels) values a serial loop left to LLVM, not one
    parallel loop over every value; the conv then reads without bounds checks and takes
    two channel blocks (on AVX2, 16 channels). Built for ``znver3``, with an odd row (113
    and 33 wide: the tile reaches past it), it computes what onnxruntime does."""
    model = _thin_input_conv_model(k, size)
    mod = _scheduled_module(model, cpu="znver3")
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    script = func.script()
    padded = size + 2 * (k // 2)
    parallel = [int(n) for n in re.findall(r"T\.parallel\((?:T\.int64\()?(\d+)", script)]
    assert "data_pad" in script and parallel[0] == padded, parallel
    assert 2 in _unrolled(script)  # two channel blocks in the register tile
    art = graphopt.compile(model, "x86", target_options={"cpu": "znver3"})
    assert art.manifest["verification"]["ok"]


def test_an_rgb_image_goes_to_its_packed_layout_as_rows_of_unrolled_channels() -> None:
    """The NCHW -> NCHW3c transform of an RGB input runs its rows in parallel and, in
    each row, its pixels as a serial loop over the 3 channels unrolled (for LLVM to
    vectorize the pixels with an interleaving store), not as a TVM vector loop whose
    every value is a scatter; the model still computes what onnxruntime does."""
    model = _thin_input_conv_model(3, 64)
    mod = _scheduled_module(model)
    image = "(T.int64(1), T.int64(3), T.int64(64)"
    (script,) = [
        f.script()
        for g, f in mod.functions_items()
        if "layout_transform" in g.name_hint and image in f.script()
    ]
    assert "T.vectorized" not in script and _unrolled(script) == {3}, script
    assert re.search(r"T\.parallel\(T\.int64\(64\)\)", script), script
    art = graphopt.compile(model, "x86")
    assert art.manifest["verification"]["ok"]


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("channels", [3, 4])
def test_a_thin_transpose_computes_the_same_either_way(channels: int, inverse: bool) -> None:
    """A thin channel axis moved innermost (NCHW -> NCHWc) or back out of it, scheduled by
    the injective rule's thin-transpose path (checked: the channel loop is unrolled), built
    and run: the same values as numpy's transpose."""
    from tvm import te

    size = 40
    planar, packed = (1, channels, size, size), (1, 1, size, size, channels)
    if inverse:
        a = te.placeholder(packed, name="a")
        b = te.compute(planar, lambda n, c, y, x: a[n, 0, y, x, c], name="b")
    else:
        a = te.placeholder(planar, name="a")
        b = te.compute(packed, lambda n, o, y, x, c: a[n, c, y, x], name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (block,) = cpu._root_blocks(sch)
    cpu._schedule_spatial(sch, block, 16)
    assert channels in _unrolled(sch.mod.script())
    lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))
    rng = np.random.default_rng(channels)
    data = rng.standard_normal(packed if inverse else planar).astype("float32")
    out = tvm.runtime.tensor(np.zeros(planar if inverse else packed, "float32"))
    lib.mod["main"](tvm.runtime.tensor(data), out)
    if inverse:
        expected = data[:, 0].transpose(0, 3, 1, 2)
    else:
        expected = data.transpose(0, 2, 3, 1)[:, None]
    np.testing.assert_array_equal(out.numpy(), expected)


def test_weights_are_packed_at_compile_time() -> None:
    """The 6-D packed weights (OIHW[x]i[y]o) arrive in main as constants: FoldConstant
    ran the weight layout transforms at compile time, so no kernel repacks per run."""
    mod = _zoo_scheduled("small_cnn")
    packed = []
    const_type = type(tvm.relax.const(np.zeros(1, np.float32)))

    def visit(expr) -> None:  # noqa: ANN001
        shape = getattr(expr.ty, "shape", None) if isinstance(expr, const_type) else None
        if shape is not None and len(shape.values) == 6:
            packed.append(tuple(int(d) for d in shape.values))

    tvm.relax.analysis.post_order_visit(mod["main"].body, visit)
    assert len(packed) == 4  # one per conv


def _grouped_conv_model() -> onnx.ModelProto:
    """A grouped conv (groups=2 of 4 channels, not depthwise)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=2, pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "grouped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 8, 20, 20))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 8, 20, 20))],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_grouped_conv_takes_the_grouped_rule_not_the_dense_one() -> None:
    """A grouped conv packs with a block inside one group (4 channels here) and takes the
    grouped rule, not the dense conv's; the result still matches onnxruntime."""
    model = _grouped_conv_model()
    rules = _rules_used(_scheduled_module(model))
    conv = [v for k, v in rules.items() if "conv2d" in k]
    assert conv == ["grouped_nchwc"]
    graphopt.compile(model, "x86")


def test_conv_rule_declines_a_plain_matmul() -> None:
    spec = resolve("x86")
    target = tvm.target.Target(spec.tvm)
    a = tvm.te.placeholder((16, 32), name="a")
    b = tvm.te.placeholder((32, 64), name="b")
    func = tvm.te.create_prim_func([a, b, tvm.topi.matmul(a, b)])
    with target:
        assert cpu.rule_conv2d_nchwc(func, target) is None
        name, new = cpu.apply_rules(func, target)
    assert name == "matmul" and bool(new.attrs["graphopt.fast_path"])


# --- vector math, register tiles, concat --------------------------------------------------
def _model(nodes, inputs: dict, output: tuple, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
        list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _asm(func: tvm.tirx.PrimFunc) -> str:
    target = tvm.target.Target(resolve("x86").tvm)
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target).mod.inspect_source("asm")


def test_sigmoid_and_tanh_vectorize_without_libm() -> None:
    """float32 Sigmoid/Tanh legalize to TOPI's polynomials: the kernel calls no scalar
    ``expf`` (the default calls it once per lane), and still matches onnxruntime."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Tanh", ["s"], ["y"])]
    model = _model(nodes, {"x": (4, 256)}, ("y", (4, 256)))
    mod = _scheduled_module(model)
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert "expf" not in _asm(func)
    graphopt.compile(model, "x86")  # verifies against onnxruntime


@pytest.mark.parametrize(
    ("act", "opset"),
    [
        (
            [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["h", "s"], ["y"])],
            17,
        ),  # fmt: skip
        ([helper.make_node("Gelu", ["h"], ["y"])], 20),
        ([helper.make_node("Gelu", ["h"], ["y"], approximate="tanh")], 20),
    ],
    ids=["silu", "gelu", "gelu_tanh"],
)
def test_silu_and_gelu_epilogues_stay_in_the_kernel_without_libm(act, opset) -> None:  # noqa: ANN001
    """SiLU (EfficientNet, RexNet) and GELU (ConvNeXt) after a conv or matmul: one kernel
    taken by the fast rule, no scalar ``expf``/``erff`` per lane (a libm call per output
    element made EfficientNet-B0's 1x1 convs run at 5 GFLOP/s), numbers as onnxruntime's."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), *act]
    model = _model(nodes, {"x": (1, 49, 32)}, ("y", (1, 49, 64)), [w], opset)
    mod = _scheduled_module(model)
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # 49 rows x a constant weight: the packed-weight GEMM (targets/_gemm.py)
    assert len(funcs) == 1 and str(funcs[0].attrs["graphopt.schedule_rule"]) == "matmul_packed"
    asm = _asm(funcs[0])
    assert "expf" not in asm and "erff" not in asm
    artifact = graphopt.compile(model, "x86")  # verifies against onnxruntime
    assert artifact.manifest["schedule"]["coverage"] == pytest.approx(100.0)


def test_fast_exp_erf_tanh_expressions_match_libm_and_topi() -> None:
    """The one-element polynomial exp, rational erf and tanh that SiLU/GELU and the
    recurrent sequence kernel compute with (lower/_fastmath.py); tanh also equals TOPI's
    tensor-level fast_tanh, which the unrolled expansion's Tanh legalizes to."""
    import math

    from graphopt.lower._fastmath import fast_tanh_expr

    x = tvm.te.placeholder((2048,), "float32", "x")
    y = tvm.te.compute(x.shape, lambda i: cpu.fast_exp_expr(x[i]))
    z = tvm.te.compute(x.shape, lambda i: cpu.fast_erf_expr(x[i]))
    t = tvm.te.compute(x.shape, lambda i: fast_tanh_expr(x[i]))
    ref = tvm.topi.fast_tanh(x)
    mod = tvm.compile(tvm.te.create_prim_func([x, y, z, t, ref]), target="llvm")
    v = np.linspace(-20, 20, 2048).astype(np.float32)
    out = [tvm.runtime.tensor(np.zeros(2048, np.float32)) for _ in range(4)]
    mod(tvm.runtime.tensor(v), *out)
    np.testing.assert_allclose(out[0].numpy(), np.exp(v.astype(np.float64)), rtol=2e-6)
    erf = np.array([math.erf(t) for t in v.astype(np.float64)])
    np.testing.assert_allclose(out[1].numpy(), erf, rtol=0, atol=2e-6)
    np.testing.assert_allclose(out[2].numpy(), np.tanh(v.astype(np.float64)), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(out[2].numpy(), out[3].numpy())


def test_fast_silu_matches_float64() -> None:
    """SiLU's float32 legalization (x/2 (1 + tanh(x/2)), the rational tanh) against
    float64's x / (1 + exp(-x)): within 4e-7 relative to max(|x|, 1) from -100 to 100,
    densely around 0, and exactly 0 at 0; very negative inputs give (nearly) 0, not NaN."""
    x = tvm.te.placeholder((4096,), "float32", "x")
    mod = tvm.compile(tvm.te.create_prim_func([x, cpu._fast_silu(x)]), target="llvm")
    v = np.concatenate([np.linspace(-100, 100, 2048), np.linspace(-3, 3, 2047), [0.0]])
    v = v.astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(4096, np.float32))
    mod(tvm.runtime.tensor(v), out)
    d = v.astype(np.float64)
    got = out.numpy()
    err = np.abs(got - d / (1 + np.exp(-d))) / np.maximum(np.abs(d), 1)
    assert np.all(np.isfinite(got)) and got[-1] == 0.0
    assert err.max() < 4e-7, (err.max(), v[err.argmax()])


def test_sigmoid_keeps_libm_for_float64() -> None:
    """Negative: only float32 takes the polynomial path."""
    bb = tvm.relax.BlockBuilder()
    x = tvm.relax.Var("x", tvm.relax.TensorType([8], "float64"))
    with bb.function("main", [x]):
        out = bb.emit(tvm.relax.op.sigmoid(x))
        bb.emit_func_output(out)
    mod = tvm.relax.transform.LegalizeOps(cpu.LEGALIZE)(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert "fast_exp" not in func.script() and "T.sigmoid" in func.script()


def _loops(func: tvm.tirx.PrimFunc) -> list:
    out = []

    def walk(stmt) -> None:  # noqa: ANN001
        if isinstance(stmt, tvm.tirx.For):
            out.append((stmt.kind, int(stmt.extent)))
        for child in _children(stmt):
            walk(child)

    walk(func.body)
    return out


def test_matmul_register_tile_covers_several_rows() -> None:
    """A [32, K] x [K, 1024] matmul: each loaded weight vector feeds several unrolled
    rows; a single-row GEMV instead widens its row (more accumulators). Widths are in
    the rule's vector unit (16 floats on x86: one AVX-512 register, two AVX2 ones)."""
    target = tvm.target.Target(resolve("x86").tvm)
    lanes = cpu.reduction_lanes(target)
    for m, unrolled in ((32, True), (1, False)):
        a = tvm.te.placeholder((m, 256), name="a")
        b = tvm.te.placeholder((256, 1024), name="b")
        func = tvm.te.create_prim_func([a, b, tvm.topi.matmul(a, b)])
        with target:
            name, new = cpu.apply_rules(func, target)
        loops = _loops(new)
        assert name == "matmul"
        has_unrolled = any(k == tvm.tirx.ForKind.UNROLLED and e > 1 for k, e in loops)
        assert has_unrolled == unrolled
        widest = max(e for k, e in loops if k == tvm.tirx.ForKind.VECTORIZED)
        assert widest == (4 * lanes if m > 1 else 8 * lanes)


def _packed_pool(size: int, kernel: int, stride: int, pad: int, kind: str):  # noqa: ANN202
    """A pool over a packed map (1, 4, size, size, 16), as NCHWc pools are legalized."""
    data = tvm.te.placeholder((1, 4, size, size, 16), name="data")
    out = tvm.topi.nn.pool2d(
        data, [kernel] * 2, [stride] * 2, [1, 1], [pad] * 4, kind, layout="NCHW16c"
    )
    return tvm.te.create_prim_func([data, out])


def _reference_pool(x: np.ndarray, kernel: int, stride: int, pad: int, kind: str) -> np.ndarray:
    fill = -np.inf if kind == "max" else 0.0
    padded = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)], constant_values=fill)
    size = (padded.shape[2] - kernel) // stride + 1
    out = np.empty((*x.shape[:2], size, size, x.shape[4]), np.float32)
    for i in range(size):
        for j in range(size):
            win = padded[:, :, i * stride : i * stride + kernel, j * stride : j * stride + kernel]
            out[:, :, i, j] = win.max(axis=(2, 3)) if kind == "max" else win.mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("kernel,stride,pad,kind", [(3, 2, 1, "max"), (2, 2, 0, "avg")])
def test_a_pool_takes_one_pixel_at_a_time_over_its_lanes(kernel, stride, pad, kind) -> None:  # noqa: ANN001
    """A pool over packed lanes (ResNet's 3x3/2 max pool, DenseNet's 2x2 average pool)
    has no weight for a register tile to reuse: each pixel's lanes are one vector that
    takes the whole window in turn, no pixels unrolled; a global mean's long window keeps
    the register tile (several accumulators in flight). Numbers match numpy."""
    target = tvm.target.Target(resolve("x86").tvm)
    with target:
        name, new = cpu.apply_rules(_packed_pool(28, kernel, stride, pad, kind), target)
    assert name == "reduction"
    loops = _loops(new)
    assert not any(k == tvm.tirx.ForKind.UNROLLED and e > 1 for k, e in loops)
    assert (tvm.tirx.ForKind.VECTORIZED, 16) in loops
    assert any(k == tvm.tirx.ForKind.PARALLEL for k, _ in loops)
    x = np.random.default_rng(0).standard_normal((1, 4, 28, 28, 16)).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"main": new}), target=target)
    want = _reference_pool(x, kernel, stride, pad, kind)
    out = tvm.runtime.tensor(np.zeros(want.shape, np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)
    with target:
        _, mean = cpu.apply_rules(_packed_pool(7, 7, 1, 0, "avg"), target)
    assert any(k == tvm.tirx.ForKind.UNROLLED and e > 1 for k, e in _loops(mean))


def _matmul_nhwc(rows: int, k: int, n: int):  # noqa: ANN202
    a = tvm.te.placeholder((1, rows, rows, k), name="a")
    b = tvm.te.placeholder((k, n), name="b")
    r = tvm.te.reduce_axis((0, k), name="r")
    c = tvm.te.compute(
        (1, rows, rows, n),
        lambda i, h, w, j: tvm.te.sum(a[i, h, w, r] * b[r, j], axis=r),
        name="matmul",
    )
    return tvm.te.create_prim_func([a, b, c])


@pytest.mark.parametrize("k,n,panels_outer", [(768, 3072, True), (96, 384, False)])
def test_convnext_matmul_tiles_rows_and_keeps_big_weights_in_cache(k, n, panels_outer) -> None:  # noqa: ANN001
    """ConvNeXt's Linear on a 7x7 map: 7 rows (a divisor of the row axis) x 2 vectors,
    not 1 row x 4 vectors (one FMA per loaded weight vector); a weight bigger than L2
    runs its column panels outermost (the output column comes from ``fused // rows``),
    a small one its rows. Numbers match numpy."""
    target = tvm.target.Target(resolve("x86").tvm)
    lanes = cpu.reduction_lanes(target)
    with target:
        name, new = cpu.apply_rules(_matmul_nhwc(7, k, n), target)
    assert name == "matmul"
    loops = _loops(new)
    assert (tvm.tirx.ForKind.UNROLLED, 7) in loops
    assert max(e for kind, e in loops if kind == tvm.tirx.ForKind.VECTORIZED) == 2 * lanes
    sch = tvm.s_tir.Schedule(new)
    update = sch.get_sblock("matmul_update")
    column = cpu._block_iter_values(sch, update)[3]
    assert ("floordiv" in str(column) or " // " in str(column)) == panels_outer
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 7, 7, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"main": new}), target=target)
    out = tvm.runtime.tensor(np.zeros((1, 7, 7, n), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_allclose(out.numpy(), x @ w, rtol=1e-4, atol=1e-3)


def test_many_input_concat_is_unrolled_over_its_axis() -> None:
    """A 16-input Concat (an RNN's outputs): the concat axis is unrolled so each copy's
    input choice is a constant; a 2-input concat keeps the flat parallel+vector loop."""
    for n, unrolled in ((16, True), (2, False)):
        names = [f"x{i}" for i in range(n)]
        nodes = [helper.make_node("Concat", names, ["y"], axis=0)]
        model = _model(nodes, {k: (1, 256) for k in names}, ("y", (n, 256)))
        mod = _scheduled_module(model)
        (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        kinds = {k for k, _ in _loops(func)}
        assert (tvm.tirx.ForKind.UNROLLED in kinds) == unrolled
        assert tvm.tirx.ForKind.VECTORIZED in kinds
        graphopt.compile(model, "x86")  # verifies against onnxruntime


def _conv_layouts(model: onnx.ModelProto) -> list[str]:
    """data_layout of every conv2d after the x86 layout phase."""
    spec = resolve("x86")
    _, graph, _ = prepare(model)
    target = tvm.target.Target(spec.tvm)
    with target:
        mod = tvm.transform.Sequential(spec.target.phases(target, None)["layout"])(to_relax(graph))
    found = []

    def visit(expr) -> None:  # noqa: ANN001
        if isinstance(expr, tvm.relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d":
            found.append(str(expr.attrs.data_layout))

    tvm.relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _lanes() -> int:
    return cpu.vector_lanes(tvm.target.Target(resolve("x86").tvm))


def test_channel_blocks_follow_each_tensors_channel_count() -> None:
    """MobileNetV2: its 24-channel tensors take 8-wide blocks, the rest full vectors."""
    if _lanes() == 8:
        pytest.skip("this CPU's vectors are 8 floats wide: one block size for everything")
    layouts = _conv_layouts(build("mobilenetv2"))
    assert len(layouts) == 52 and set(layouts) == {"NCHW3c", "NCHW8c", f"NCHW{_lanes()}c"}
    assert layouts.count(f"NCHW{_lanes()}c") > 40


def _concat_model(c1: int, c2: int) -> onnx.ModelProto:
    """Two convs of c1 and c2 channels, concatenated, then a 3x3 conv."""
    rng = np.random.default_rng(1)

    def w(name: str, shape: tuple) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("Conv", ["x", "w2"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Conv", ["c", "w3"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "concat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 16, 12, 12))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 16, 12, 12))],
        [w("w1", (c1, 16, 1, 1)), w("w2", (c2, 16, 1, 1)), w("w3", (16, c1 + c2, 3, 3))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_concat_of_differently_blocked_tensors_still_packs_and_verifies() -> None:
    """A concat of a 16c and an 8c tensor (40 channels): each conv keeps its own block,
    the concat takes one that divides every part (8)."""
    model = _concat_model(16, 24)
    layouts = _conv_layouts(model)
    lanes = _lanes()
    assert layouts == [f"NCHW{lanes}c", f"NCHW{lanes}c", "NCHW8c"]
    assert graphopt.compile(model, "x86").manifest["verification"]["ok"]


@pytest.mark.parametrize(
    "blocks,height,width,most,expected",
    [
        ((8, 56, 56, 12, (2, 1, None))),  # AVX2, 56 wide: 2 blocks x 4 pixels (6 loads, 8 FMAs)
        ((8, 28, 28, 12, (2, 1, None))),
        ((8, 14, 14, 12, (2, 2, None))),  # 2 pixels alone are too few chains: 2 rows x 2
        ((8, 7, 7, 12, (2, 1, 4))),  # 7 is prime: 2 blocks x 4 pixels, 8 tiled for 7
        ((8, 13, 13, 12, (2, 1, 5))),  # SqueezeNet's 13: 2 blocks x 5 pixels, 15 for 13
        ((7, 7, 7, 12, (1, 1, None))),  # an odd block count cannot pair: one block x 7
        ((7, 56, 56, 12, (1, 1, None))),
        ((8, 56, 56, 28, (2, 1, None))),  # AVX-512's 28 accumulators: 2 blocks x 8 pixels
        ((8, 7, 7, 28, (2, 1, None))),  # 2 blocks x 7 pixels
    ],
)
def test_dense_conv_tile_pairs_channel_blocks_where_it_loads_less(
    blocks, height, width, most, expected
) -> None:  # noqa: ANN001
    assert cpu._channel_blocks_tile(blocks, height, width, most) == expected


@pytest.mark.parametrize(
    "blocks,height,width,most,expected",
    [
        ((8, 14, 14, 12, (2, 1, 5))),  # not 2 rows x 2: 2 blocks x 5 pixels, 15 for 14
        ((8, 6, 6, 12, (2, 1, 4))),  # not 2 rows x 3: 2 x 4, 8 for 6
        ((8, 28, 28, 12, (2, 1, None))),  # rows were not taken anyway
        ((8, 7, 7, 12, (2, 1, 4))),
        ((8, 14, 14, 28, (2, 1, None))),  # AVX-512: 2 blocks x 7
    ],
)
def test_a_conv_with_a_kernel_window_takes_no_row_tiles(
    blocks, height, width, most, expected
) -> None:  # noqa: ANN001
    assert cpu._channel_blocks_tile(blocks, height, width, most, window=True) == expected


def test_paired_channel_block_tile_keeps_its_accumulators_in_registers() -> None:
    """On AVX-512 (cross-compiled for a Zen 4) a 1x1 conv of two channel blocks over a
    56-wide row takes the paired tile, and its accumulators, two weight vectors and a
    broadcast fit the 32 zmm registers: none is stored to the stack. A pair of 14-pixel
    tiles did spill (ResNet-50 1.13x onnxruntime on a Zen 4, against 0.87x without)."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((32, 32, 1, 1)).astype("float32"), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1])
    relu = helper.make_node("Relu", ["c"], ["y"])
    model = _model([conv, relu], {"x": [1, 32, 56, 56]}, ("y", [1, 32, 56, 56]), [w])
    mod = _scheduled_module(model, cpu="znver4")
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    assert str(func.attrs["graphopt.schedule_rule"]) == "pointwise_nchwc"
    target = tvm.target.Target(resolve("x86", cpu="znver4").tvm)
    main = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    asm = tvm.compile(main, target=target).mod.inspect_source("asm")
    assert len(re.findall(r"vfmadd\w+\s+.*%zmm", asm)) >= 16, "a tile of zmm FMAs"
    spills = re.findall(r"vmov\w+\s+%zmm\d+, -?\w*\(%rsp\)", asm)
    assert not spills, spills[:4]


def _dense_conv_model(
    k: int, stride: int, size: int, seed: int, residual: bool = False
) -> onnx.ModelProto:
    """A 16->32 channel k x k conv (same padding, ``stride``) with bias, and ReLU; with
    ``residual``, an input ``r`` added before the ReLU."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((32, 16, k, k)).astype("float32"), "w")
    b = numpy_helper.from_array(rng.standard_normal(32).astype("float32"), "b")
    out = -(-size // stride)
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["c"],
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
            strides=[stride] * 2,
        )
    ]
    inputs = {"x": [1, 16, size, size]}
    if residual:
        nodes.append(helper.make_node("Add", ["c", "r"], ["s"]))
        inputs["r"] = [1, 32, out, out]
    nodes.append(helper.make_node("Relu", ["s" if residual else "c"], ["y"]))
    return _model(nodes, inputs, ("y", [1, 32, out, out]), [w, b])


@pytest.mark.parametrize("k,stride,size", [(1, 1, 14), (1, 2, 28), (3, 2, 28), (1, 1, 56)])
def test_paired_channel_block_tiles_match_onnxruntime(
    k: int, stride: int, size: int, monkeypatch
) -> None:
    """Pointwise and strided dense convs (the tiles of two channel blocks, with rows at 14
    wide on AVX2) take their packed rules and compute what onnxruntime does (the strided
    3x3 conv direct: its Winograd parts switched off)."""
    monkeypatch.setenv("GRAPHOPT_WINOGRAD_STRIDED", "0")
    model = _dense_conv_model(k, stride, size, seed=k + stride)
    rules = _rules_used(_scheduled_module(model))
    assert set(rules.values()) & {"pointwise_nchwc", "conv2d_nchwc"}, rules
    art = graphopt.compile(model, "x86")  # verifies against onnxruntime
    assert art.manifest["verification"]["ok"]


@pytest.mark.parametrize("k,stride,size", [(1, 1, 7), (1, 2, 14), (3, 2, 14), (1, 1, 13)])
def test_tiles_past_the_row_end_match_onnxruntime(
    k: int, stride: int, size: int, monkeypatch
) -> None:
    """Built for an AVX2 CPU (``znver3``, which every AVX2 x86 host runs), the 7- and
    13-wide outputs take the two-block tiles whose last tile reaches past the row; the
    pixels past it are neither computed into nor written: the outputs match
    onnxruntime's (the strided 3x3 conv direct)."""
    monkeypatch.setenv("GRAPHOPT_WINOGRAD_STRIDED", "0")
    model = _dense_conv_model(k, stride, size, seed=k + stride + size, residual=True)
    mod = _scheduled_module(model, cpu="znver3")
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    assert "T.where" in func.script()  # the tile past the row's end
    art = graphopt.compile(model, "x86", target_options={"cpu": "znver3"})
    assert art.manifest["verification"]["ok"]


@pytest.mark.parametrize(
    "ic,oc,size,cpu_name,rows_outer",
    [(144, 24, 56, "znver3", True), (512, 256, 7, "znver4", False)],
)
def test_a_convs_parallel_loop_reads_the_fewer_bytes_again(
    ic: int, oc: int, size: int, cpu_name: str, rows_outer: bool
) -> None:
    """MobileNetV2's 56x56 144->24 projection, on AVX2: with its 3 channel chunks outside
    the rows, the 1.8 MB input is read 3 times; with the rows outside, its 14 KB of
    weights 56 times: the rows go outside (the parallel loop's row is its quotient). A
    7x7 512->256 conv on AVX-512 (on AVX2 its pixels are one row, see
    :func:`test_a_pointwise_conv_tiles_its_pixels_as_one_row_where_that_loads_less`):
    its 512 KB of weights 7 times, or its 100 KB input once per each of 16 chunks: the
    chunks stay outside. Built for ``cpu_name``; compiled for the host, both compute what
    onnxruntime does."""
    model = _pointwise_conv_model(ic, oc, size, seed=ic + oc)
    mod = _scheduled_module(model, cpu=cpu_name)
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    script = func.script()
    assert str(func.attrs["graphopt.schedule_rule"]) == "pointwise_nchwc"
    row = re.search(rf"v_y = T\.axis\.spatial\(T\.int64\({size}\), \w+_fused (//|%)", script)
    assert row is not None and (row.group(1) == "//") == rows_outer, row
    art = graphopt.compile(model, "x86")
    assert art.manifest["verification"]["ok"]


def _wide_conv_model(ic: int, oc: int, k: int, stride: int, size: int) -> onnx.ModelProto:
    """An ic -> oc k x k conv (same padding, ``stride``) with bias, a residual input added
    and ReLU: weights of ic * oc * k * k floats."""
    rng = np.random.default_rng(ic + oc + k)
    scale = 1 / np.sqrt(ic * k * k)
    w = numpy_helper.from_array((rng.standard_normal((oc, ic, k, k)) * scale).astype("f4"), "w")
    b = numpy_helper.from_array(rng.standard_normal(oc).astype("float32"), "b")
    out = -(-size // stride)
    nodes = [
        helper.make_node(
            "Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4, strides=[stride, stride]
        ),
        helper.make_node("Add", ["c", "r"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    inputs = {"x": [1, ic, size, size], "r": [1, oc, out, out]}
    return _model(nodes, inputs, ("y", [1, oc, out, out]), [w, b])


@pytest.mark.parametrize(
    "ic,oc,k,stride,size", [(1024, 512, 1, 1, 7), (256, 512, 3, 2, 14), (1024, 256, 1, 1, 14)]
)
def test_a_conv_whose_weights_outgrow_the_cache_streams_them(
    ic: int, oc: int, k: int, stride: int, size: int
) -> None:
    """ResNet-50's 7x7 1024->512 (2 MB of weights), its strided 3x3 256->512 (4.5 MB) and
    its 14x14 1024->256 (1 MiB) on AVX-512: each thread takes whole output channel chunks
    (the parallel loop holds no row) and the input channel chunks go outermost in steps
    of _STREAM_CHUNKS, every row's register tiles inside each step; the bias, residual
    and ReLU fused after it, the outputs match onnxruntime's. An eighth of the input
    channels (of the weights) keeps the default nest, its rows in the parallel loop.
    (On AVX2 these rows take multi-row or padded tiles, which keep the default nest.)"""
    model = _wide_conv_model(ic, oc, k, stride, size)
    mod = _scheduled_module(model, cpu="znver4")  # the structure, whatever the host
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    script = func.script()
    update = script.split('T.sblock("conv2d_nchwc_update")')
    assert len(update) == 2, script
    step = re.search(r"v_rco = T\.axis\.reduce\(T\.int64\(\d+\), (\w+) \* T\.int64\(4\)", update[1])
    assert step is not None, script
    # the step loop is outside the row loop, and the row is no part of the parallel loop
    grid = re.search(rf"for {step.group(1)}, (\w+)", update[0])
    row = re.search(r"v_y = T\.axis\.spatial\(T\.int64\(\d+\), (\w+)\)", update[1])
    assert grid is not None and row is not None and grid.group(1) == row.group(1), script
    art = graphopt.compile(model, "x86")  # verifies against onnxruntime
    assert art.manifest["verification"]["ok"]
    smaller = _scheduled_module(_wide_conv_model(ic // 8, oc, k, stride, size), cpu="znver4")
    (func,) = [f for g, f in smaller.functions_items() if "conv2d" in g.name_hint]
    assert re.search(r"v_y = T\.axis\.spatial\(T\.int64\(\d+\), \w+_fused", func.script())


def _prefetch_sites(func) -> list:  # noqa: ANN001
    """(weight load, its guard or None, the loops above it) of each prefetch in ``func``."""
    found = []

    def walk(node, loops: list, guard) -> None:  # noqa: ANN001
        if isinstance(node, tvm.tirx.Evaluate):
            call = node.value
            if getattr(call, "op", None) is not None and call.op.name == "tirx.call_llvm_intrin":
                found.append((call.args[1].args[0], guard, loops))
            return
        if isinstance(node, tvm.tirx.For):
            loops = [*loops, node]
        if isinstance(node, tvm.tirx.IfThenElse):
            guard = node.condition
        for name in ("body", "then_case", "else_case", "block", "init"):
            child = getattr(node, name, None)
            if child is not None:
                walk(child, loops, guard)
        for child in getattr(node, "seq", None) or []:
            walk(child, loops, guard)

    walk(func.body, [], None)
    return found


def _streamed_conv(ic: int, oc: int, k: int, stride: int, size: int):  # noqa: ANN202
    """The scheduled x86 PrimFunc of :func:`_wide_conv_model`'s conv, for an AVX-512 CPU
    whatever the host (on AVX2 these rows take tiles that keep the default nest)."""
    mod = _scheduled_module(_wide_conv_model(ic, oc, k, stride, size), cpu="znver4")
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    return func


@pytest.mark.parametrize(
    "ic,oc,k,stride,size", [(1024, 512, 1, 1, 7), (256, 512, 3, 2, 14), (1024, 256, 1, 1, 14)]
)
def test_a_streamed_conv_prefetches_what_its_next_iteration_reads(
    ic: int, oc: int, k: int, stride: int, size: int
) -> None:
    """At each step above the input lanes (an input channel chunk and kernel tap), the
    (row, pixel chunk) tiles of a streamed conv's parallel iteration prefetch, between
    them, every weight line the next iteration reads at that step (each of its channel
    blocks' input lanes) and nothing else; the last iteration its own again."""
    from tvm import s_tir, tirx

    from graphopt.targets import _prefetch

    func = _streamed_conv(ic, oc, k, stride, size)
    ((load, guard, loops),) = _prefetch_sites(func)
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("conv2d_nchwc_update")
    nest = [sch.get(lp) for lp in sch.get_loops(conv)]
    reads = _prefetch.read_indices(sch, conv, load.source)
    *above, line = loops  # parallel, step, row, pixel chunk, reductions above the lanes
    assert above[0].kind == tirx.ForKind.PARALLEL
    assert [str(lp.loop_var) for lp in above] == [str(lp.loop_var) for lp in nest[: len(above)]]
    lanes, blocks = nest[len(above)], nest[len(above) + 1]
    assert int(lanes.extent) == 16 and int(blocks.extent) == 2
    variables = [lp.loop_var for lp in loops]
    fetched = tirx.IndexMap(variables, list(load.indices), None)
    kept = tirx.IndexMap(variables, [guard], None)
    iterations = int(above[0].extent)
    tiles = [(y, x) for y in range(int(above[2].extent)) for x in range(int(above[3].extent))]
    for i in sorted({0, 1, iterations - 1}):
        for at in (0, -1):  # the first and the last of each loop between the tiles and lanes
            step = [0 if at == 0 else int(lp.extent) - 1 for lp in above[4:]]
            rest = [0 if at == 0 else int(above[1].extent) - 1, *step]
            got = set()
            for y, x in tiles:
                for j in range(int(line.extent)):
                    values = [i, rest[0], y, x, *rest[1:], j]
                    point = [tirx.const(v, "int64") for v in values]
                    if int(kept.map_indices(point)[0]):
                        got.add(tuple(int(v) for v in fetched.map_indices(point)))
            nxt = min(i + 1, iterations - 1)
            want = {
                tuple(reads([nxt, rest[0], 0, 0, *rest[1:], lane, block, 0, 0]))
                for lane in range(16)
                for block in range(2)
            }
            assert got == want, (i, at)


def test_small_or_switched_off_streamed_weights_are_not_prefetched(monkeypatch) -> None:
    """An eighth of the input channels (weights under 1 MiB, kept in cache: not streamed)
    has no prefetch, nor a streamed conv with GRAPHOPT_PREFETCH=0."""
    assert not _prefetch_sites(_streamed_conv(128, 512, 1, 1, 7))
    monkeypatch.setenv("GRAPHOPT_PREFETCH", "0")
    assert not _prefetch_sites(_streamed_conv(1024, 512, 1, 1, 7))


def test_a_prefetching_streamed_conv_matches_onnxruntime_and_without(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """ResNet-50's strided 3x3 256->512 (4.5 MB of weights, prefetched): verified
    against onnxruntime, the same numbers bit for bit as with GRAPHOPT_PREFETCH=0."""
    model = _wide_conv_model(256, 512, 3, 2, 14)
    rng = np.random.default_rng(3)
    feeds = {
        "x": rng.standard_normal((1, 256, 14, 14)).astype(np.float32),
        "r": rng.standard_normal((1, 512, 7, 7)).astype(np.float32),
    }
    on = graphopt.compile(model, "x86", tmp_path / "on.so")
    assert on.manifest["verification"]["ok"]
    monkeypatch.setenv("GRAPHOPT_PREFETCH", "0")
    off = graphopt.compile(model, "x86", tmp_path / "off.so")
    assert np.array_equal(on.run(feeds)["y"], off.run(feeds)["y"])


def _pointwise_conv_model(ic: int, oc: int, size: int, seed: int) -> onnx.ModelProto:
    """An ic -> oc 1x1 conv on a size x size map, no bias."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((oc, ic, 1, 1)).astype("float32"), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])
    return _model([conv], {"x": [1, ic, size, size]}, ("y", [1, oc, size, size]), [w])


def _pointwise_conv_script(width: int, cpu_name: str, out: int = 16) -> str:
    model = _pointwise_conv_model(16, out, width, seed=width)
    mod = _scheduled_module(model, cpu=cpu_name)
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    return func.script()


def _unrolled(script: str) -> set[int]:
    return {int(n) for n in re.findall(r"T\.unroll\((?:T\.int64\()?(\d+)", script)}


def test_a_tile_past_the_register_budget_unrolls_its_lane_loop() -> None:
    """A 13-wide row of an odd number of channel blocks (3 of 8 lanes) on AVX2 (12
    accumulators) takes the whole row, and its 8-lane reduction loop is unrolled in TIR
    (LLVM's unroll by 2 spilled); a 14-wide row's tile fits the budget and keeps its lane
    loop."""
    assert {13, 8} <= _unrolled(_pointwise_conv_script(13, "znver3", out=24))
    assert 8 not in _unrolled(_pointwise_conv_script(14, "znver3"))


@pytest.mark.parametrize("width,pixels", [(7, 4), (13, 5)])
def test_a_prime_row_takes_two_blocks_past_its_end(width: int, pixels: int) -> None:
    """On AVX2 a 7- or 13-wide row of two channel blocks has no divisor that fits two
    blocks, so its tile is 2 blocks x ``pixels``, its last tile reaching past the row
    (the block's ``T.where`` skips those pixels); the lane loop stays a loop. (ResNet-50's
    7x7 stage on a Zen 3: 1x1 convs 111-120 -> 135-151 GFLOP/s.)"""
    script = _pointwise_conv_script(width, "znver3")
    loops = _unrolled(script)
    assert {2, pixels} <= loops and width not in loops and 8 not in loops, loops
    assert "T.where" in script


@pytest.mark.parametrize("k,pixels,rows", [(3, 5, False), (1, 2, True)])
def test_a_14_wide_row_takes_row_tiles_only_without_a_kernel_window(
    k: int, pixels: int, rows: bool, monkeypatch
) -> None:
    """On AVX2 a stride-2 3x3 conv to a 14x14 map takes 2 blocks x 5 pixels of one row
    (15 for 14, the last tile cut by a ``T.where``), a 1x1 conv 2 blocks x (2 rows x 2
    pixels). Compiled for the host, the 3x3 one matches onnxruntime. (The direct conv's
    tile: its Winograd parts, test_winograd.py, switched off.)"""
    monkeypatch.setenv("GRAPHOPT_WINOGRAD_STRIDED", "0")
    model = _wide_conv_model(64, 64, k, 2, 28)
    mod = _scheduled_module(model, cpu="znver3")
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    script = func.script()
    assert pixels in _unrolled(script)
    assert ("T.where" in script) != rows
    if k == 3:
        assert graphopt.compile(model, "x86").manifest["verification"]["ok"]


@pytest.mark.parametrize(
    "cpu_name,stride,size,flat",
    [
        ("znver3", 1, 7, True),  # AVX2: 2 blocks x 5 of 49 pixels, not x 4 of a row of 7
        ("znver3", 1, 13, True),  # SqueezeNet's 13x13: 5 of 169, not 5 of a row of 13
        ("znver3", 1, 14, False),  # 2 blocks x (2 rows x 2 pixels) load as little
        ("znver3", 2, 14, False),  # strided: the input's pixels are not the output's
        ("znver4", 1, 7, False),  # AVX-512: 2 blocks x the whole row of 7
    ],
)
def test_a_pointwise_conv_tiles_its_pixels_as_one_row_where_that_loads_less(
    cpu_name: str, stride: int, size: int, flat: bool
) -> None:
    """A 1x1 stride-1 conv (128 -> 128, bias, residual add, ReLU: the ResNet bottleneck's
    last) whose row tiles badly iterates over its map's pixels as one loop, the epilogue
    writing the (row, column) output from it; elsewhere the kernel keeps its rows. Built
    for ``cpu_name``, whatever the host; compiled for the host it matches onnxruntime."""
    model = _wide_conv_model(128, 128, 1, stride, size)
    mod = _scheduled_module(model, cpu=cpu_name)
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    script = func.script()
    out = -(-size // stride)
    assert (f"T.axis.spatial(T.int64({out * out})" in script) == flat
    if flat:
        assert 5 in _unrolled(script) and "T.where" in script  # 2 x 5 past the map's end
        assert f"// T.int64({out}), v2 % T.int64({out})" in script  # the 2-D output
    art = graphopt.compile(model, "x86")  # verifies against onnxruntime
    assert art.manifest["verification"]["ok"]


def test_a_pointwise_conv_that_writes_the_output_itself_keeps_its_rows() -> None:
    """A 7x7 1x1 conv with no epilogue (no bias, no activation) writes the kernel's output
    itself: nothing would write its (row, column) layout from flat pixels, so it keeps
    its rows on AVX2 too, and computes what onnxruntime does."""
    model = _pointwise_conv_model(128, 128, 7, seed=7)
    mod = _scheduled_module(model, cpu="znver3")
    (func,) = [f for g, f in mod.functions_items() if "conv2d" in g.name_hint]
    assert "T.axis.spatial(T.int64(49)" not in func.script()
    assert graphopt.compile(model, "x86").manifest["verification"]["ok"]


# --- a rule that raises -------------------------------------------------------------------
def _broken_rule(func, target):  # noqa: ANN001, ANN202
    raise TypeError("a bug in the rule")


def _refused_rule(func, target):  # noqa: ANN001, ANN202
    return tvm.s_tir.Schedule(func).get_sblock("no such block")  # TVM refuses: ScheduleError


def _add_kernel():  # noqa: ANN202
    from tvm import te

    x = te.placeholder((64,), "float32", name="x")
    return te.create_prim_func([x, te.compute((64,), lambda i: x[i] + 1, name="add")])


def test_a_rule_with_a_bug_is_a_warning_or_stops_in_strict_mode(monkeypatch, caplog):
    """A Python error in a rule's code is a bug: logged with the rule's and the kernel's
    names and the next rule tried, or (GRAPHOPT_STRICT_RULES=1) raised."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
    rules = [("broken", _broken_rule), *cpu.RULES]
    monkeypatch.setenv("GRAPHOPT_STRICT_RULES", "0")
    with caplog.at_level("WARNING", logger="graphopt.schedule"):
        name, _ = cpu.apply_rules(_add_kernel(), target, rules, kernel="add_kernel")
    assert name == "injective"
    assert "schedule rule broken failed on add_kernel (TypeError: a bug in the rule)" in caplog.text
    monkeypatch.setenv("GRAPHOPT_STRICT_RULES", "1")
    with pytest.raises(TypeError, match="a bug in the rule"):
        cpu.apply_rules(_add_kernel(), target, rules)


def test_a_schedule_primitive_tvm_refuses_declines_even_in_strict_mode(monkeypatch, caplog):
    monkeypatch.setenv("GRAPHOPT_STRICT_RULES", "1")
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
    rules = [("refused", _refused_rule), *cpu.RULES]
    with caplog.at_level("DEBUG", logger="graphopt.schedule"):
        name, _ = cpu.apply_rules(_add_kernel(), target, rules, kernel="add_kernel")
    assert name == "injective"
    (record,) = [r for r in caplog.records if "rule refused" in r.getMessage()]
    assert record.levelname == "DEBUG" and "ScheduleError" in record.getMessage()
