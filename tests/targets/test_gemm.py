"""The packed-weight GEMM (graphopt/targets/_gemm.py): which matmuls take it, its tile per
target, and its numbers against onnxruntime on x86 (and on ARM under qemu, slow tier)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.targets import _gemm
from tests._system import CROSS_GXX, QEMU


def _target(mcpu: str, triple: str = "x86_64-linux-gnu") -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": triple})


@pytest.mark.parametrize(
    "mcpu,triple,rows,n,expected",
    [
        # AVX2 (8 lanes, 12 accumulators): 2 vectors x the largest divisor of M up to 6
        ("znver3", "x86_64-linux-gnu", 512, 1024, (16, 4)),
        # M = 49 (ConvNeXt's last stage) has no divisor up to 6 but 1: one vector x 7 rows
        ("znver3", "x86_64-linux-gnu", 49, 768, (8, 7)),
        # AVX-512 (16 lanes, 28 accumulators): 8 x 2 and 16 x 1 tie at 16, the wider wins
        ("skylake-avx512", "x86_64-linux-gnu", 512, 1024, (32, 8)),
        # N not a multiple of 2 vectors: one vector
        ("znver3", "x86_64-linux-gnu", 64, 24, (8, 8)),
        # NEON (4 lanes, 28 accumulators)
        ("cortex-a72", "aarch64-linux-gnu", 64, 96, (8, 8)),
        # no whole vector divides N
        ("znver3", "x86_64-linux-gnu", 64, 20, None),
    ],
)
def test_tile_fits_the_register_file(mcpu, triple, rows, n, expected):
    assert _gemm.plan_tile(rows, n, _target(mcpu, triple)) == expected


def _matmul_model(
    m: int, k: int, n: int, *, const_weight: bool = True, gemm: bool = False, lead: tuple = ()
):
    """x [*lead, m, k] times a weight [k, n] (MatMul + Add + Relu, or Gemm with transB +
    Relu)."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((n, k) if gemm else (k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, m, k])]
    inits = [numpy_helper.from_array(b, "b")]
    if const_weight:
        inits.append(numpy_helper.from_array(w, "w"))
    else:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)))
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["p"]),
            helper.make_node("Add", ["p", "b"], ["y"]),
        ]
    nodes.append(helper.make_node("Relu", ["y"], ["z"]))
    graph = helper.make_graph(
        nodes,
        "mm",
        inputs,
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [*lead, m, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _check_against_onnxruntime(art, model: onnx.ModelProto) -> None:
    inputs = art.random_inputs(seed=5)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(art.run(inputs)["z"], ref.run(None, inputs)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm_transB"])
@pytest.mark.parametrize("m,k,n", [(64, 48, 96), (49, 40, 200), (96, 300, 16), (32, 64, 37)])
def test_constant_weight_matmul_takes_the_packed_rule(tmp_path, gemm, m, k, n):
    """A constant weight (also behind Gemm's transpose) with enough rows: the packed
    product, the bias and ReLU fused into it, the same numbers as onnxruntime. N = 37 (a
    37-class head) is padded to whole blocks, and the first 37 columns come out."""
    model = _matmul_model(m, k, n, gemm=gemm)
    art = graphopt.compile(model, "x86", tmp_path / "m.so")
    rules = art.manifest["schedule"]["rules"]
    assert rules.get(_gemm.RULE) == 1 and "matmul" not in rules, rules
    assert art.manifest["verification"]["ok"]
    _check_against_onnxruntime(art, model)


def test_leading_dims_are_rows(tmp_path):
    """A time-major projection, x [T, 1, K]: the T x 1 rows are tiled together."""
    model = _matmul_model(1, 24, 40, lead=(32,))
    art = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert art.manifest["schedule"]["rules"].get(_gemm.RULE) == 1
    _check_against_onnxruntime(art, model)


@pytest.mark.parametrize("lead,m", [((1, 16), 16), ((2, 12), 12)])
def test_image_rows_keep_their_leading_dims(tmp_path, lead, m):
    """Per-pixel MLPs ([1, H, W, C] x [C, N], ConvNeXt): the rows tile within W and the
    leading dims stay loops of their own (fused with W, TVM could not prove the tile's
    bindings affine and the rule fell back to the reduction tile)."""
    model = _matmul_model(m, 32, 64, lead=lead)
    art = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert art.manifest["schedule"]["rules"].get(_gemm.RULE) == 1, art.manifest["schedule"]
    _check_against_onnxruntime(art, model)


@pytest.mark.parametrize(
    "m,const_weight", [(4, True), (64, False)], ids=["few_rows", "activation_weight"]
)
def test_other_matmuls_keep_the_reduction_tile(tmp_path, m, const_weight):
    """Fewer rows than _MIN_ROWS (a GEMV-like product), or a weight computed at run time
    (packing it would run every call): the matmul rule, as before."""
    model = _matmul_model(m, 32, 64, const_weight=const_weight)
    art = graphopt.compile(model, "x86", tmp_path / "m.so")
    rules = art.manifest["schedule"]["rules"]
    assert rules.get("matmul") == 1 and _gemm.RULE not in rules, rules
    _check_against_onnxruntime(art, model)


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm_transB"])
@pytest.mark.parametrize("m", [1, 4])
def test_a_gemv_whose_weight_outgrows_the_cache_is_packed(tmp_path, gemm, m):
    """Fewer rows than _MIN_ROWS but a weight of _GEMV_STREAM_BYTES or more (a classifier
    head of 1000 classes, not whole vectors): the packed product, which streams the
    weight, the same numbers as onnxruntime."""
    k, n = 272, 1000
    assert k * n * 4 >= _gemm._GEMV_STREAM_BYTES > k * 64 * 4
    model = _matmul_model(m, k, n, gemm=gemm)
    art = graphopt.compile(model, "x86", tmp_path / "m.so")
    rules = art.manifest["schedule"]["rules"]
    assert rules.get(_gemm.RULE) == 1 and "matmul" not in rules, rules
    _check_against_onnxruntime(art, model)


def test_packed_schedule_tiles_and_parallelizes():
    """The scheduled product: one parallel loop, the rows x nb tile unrolled/vectorized."""
    x = tvm.te.placeholder((64, 96), "float32", "x")
    wp = tvm.te.placeholder((8, 96, 16), "float32", "wp")  # [N/nb, K, nb], packed
    func = tvm.te.create_prim_func([x, wp, _gemm.matmul_packed_te(x, wp)])
    sch = _gemm.rule_matmul_packed(func, _target("znver3"))
    script = sch.mod["main"].script()
    assert script.count("T.parallel") == 1
    assert "T.vectorized(16)" in script and "T.unroll(4)" in script


@pytest.mark.slow
@CROSS_GXX
@QEMU
def test_packed_product_under_arm_emulation(tmp_path):
    model = _matmul_model(64, 48, 96, gemm=True)
    art = graphopt.compile(model, "arm", tmp_path / "arm.so")  # verified under qemu
    assert art.emulated and art.manifest["verification"]["ok"]
    assert art.manifest["schedule"]["rules"].get(_gemm.RULE) == 1
    _check_against_onnxruntime(art, model)


def test_tuning_space_starts_at_the_default_and_its_points_compute_the_same():
    """``graphopt tune``'s space for the packed product (rows, panel width): its first
    point is the default kernel, and sampled points give the default's output."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from graphopt.lower import to_relax
    from graphopt.prepare import prepare
    from graphopt.targets import resolve
    from graphopt.tuning._session import Targets
    from graphopt.tuning._space import default_trace, graphopt_design_spaces, has_choices
    from graphopt.tuning._tasks import extract_tasks

    _, graph, _ = prepare(_matmul_model(96, 64, 128))
    targets = Targets.of(resolve("x86"), "nchwc")
    found = extract_tasks(to_relax(graph), targets.spec, targets.compile_target, None, "nchwc")
    rule = lambda t: str(targets.default_scheduled(t)["main"].attrs["graphopt.schedule_rule"])  # noqa: E731
    (task,) = [t for t in found if rule(t) == _gemm.RULE]
    default = targets.default_scheduled(task)
    assert default_trace(task.mod, targets.tune_target, default) is not None
    assert has_choices(task.mod, targets.tune_target)
    rng = np.random.default_rng(0)
    args = [
        rng.standard_normal([int(d) for d in info.shape]).astype(str(info.dtype))
        for info in ArgInfo.from_prim_func(task.mod["main"])
    ]

    def run(mod):  # noqa: ANN001, ANN202
        lib = tvm.compile(mod, target=tvm.target.Target("llvm"))
        tensors = [tvm.runtime.tensor(a) for a in args]
        lib["main"](*tensors)
        return tensors[-1].numpy()

    expected = run(default)
    (space,) = graphopt_design_spaces(s_tir.Schedule(task.mod), targets.tune_target)
    trace = space.trace.simplified(remove_postproc=True)
    for seed in range(1, 4):
        sch = s_tir.Schedule(task.mod, seed=seed)
        s_tir.Trace(trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
        np.testing.assert_allclose(run(sch.mod), expected, rtol=1e-4, atol=1e-4)
