"""The x86 bf16 kernels (``conv2d_nchwc_bf16``, ``matmul_bf16``: vdpbf16ps) in graphopt's
search space (issue #17), default tier.

As ``test_space.py`` does for the fp32 rules: the space's first point is the default
schedule exactly; random points of every design space build, keep the vdpbf16ps tensor
intrinsic and compute what the default does (a plain matmul: what numpy does); and
``graphopt tune --precision bf16 --space graphopt`` searches the bf16 kernels, whose
records a bf16 compile applies and verifies against onnxruntime (slow tier; the default
tier's bf16 tune, with the vdpbf16ps conv a task, is in ``test_precision_tuning.py``).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import tvm
from onnx import helper
from tvm import s_tir
from tvm.s_tir.meta_schedule.arg_info import ArgInfo

from graphopt.artifact import read_manifest
from graphopt.cli import main
from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import _bf16, build, resolve
from graphopt.targets._profile import packed_kernel
from graphopt.tuning import _tasks, open_database
from graphopt.tuning._apply import ApplyTuningDatabase
from graphopt.tuning._database import workload_mod
from graphopt.tuning._session import Targets
from graphopt.tuning._space import default_trace, graphopt_design_spaces, has_choices
from graphopt.tuning._tasks import Task, phases_before_schedule
from tests._system import needs_host_bf16
from tests.conftest import make_model
from tests.tuning._models import slow_defaults

pytestmark = needs_host_bf16
BF16_RULES = ("conv2d_nchwc_bf16", "matmul_bf16")


def _conv_gemm(channels: int = 32, size: int = 8, rows: int = 1) -> onnx.ModelProto:
    """x(rows,c,s,s) -> Conv c->c (3x3, pad 1) -> Relu -> Flatten -> Gemm (c*s*s -> 64);
    and y = x2(4, 64) @ W(64, 48): a plain matmul with rows to tile."""
    rng = np.random.default_rng(5)
    flat = channels * size * size
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
            helper.make_node("MatMul", ["x2", "w2"], ["z"]),
        ],
        {"x": (rows, channels, size, size), "x2": (4, 64)},
        {"y": (rows, 64), "z": (4, 48)},
        {
            "w": (rng.standard_normal((channels, channels, 3, 3)) / 17).astype(np.float32),
            "fc": (rng.standard_normal((64, flat)) / 45).astype(np.float32),
            "w2": (rng.standard_normal((64, 48)) / 8).astype(np.float32),
        },
    )


def _bf16_tasks(model: onnx.ModelProto) -> tuple[Targets, list[Task]]:
    """The model's bf16-rule kernels as tuning tasks (workload modules), in the default
    layout at precision bf16."""
    _, graph, _ = prepare(model)
    targets = Targets.of(resolve("x86"), "nchwc")
    target = targets.compile_target
    with target:
        passes = phases_before_schedule(targets.spec, target, "nchwc", "bf16")
        mod = tvm.transform.Sequential(passes)(to_relax(graph))
    found = []
    for gvar, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and packed_kernel(func) in BF16_RULES:
            found.append(Task(gvar.name_hint, workload_mod(func), func, 0.0, 1))
    return targets, found


@pytest.fixture(scope="module", autouse=True)
def _no_amx():  # noqa: ANN202
    """These are the vdpbf16ps rules' spaces: on a host with AMX (the default target has
    its features) the AMX kernels would take the convs and wide matmuls, so AMX is off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHOPT_AMX", "0")
        yield


@pytest.fixture(scope="module")
def bf16_tasks() -> tuple[Targets, list[Task]]:
    return _bf16_tasks(_conv_gemm())


def _rule(targets: Targets, task: Task) -> str:
    return str(targets.default_scheduled(task)["main"].attrs["graphopt.schedule_rule"])


def _plain_matmul(targets: Targets, found: list[Task]) -> Task:
    """The x2 @ w2 kernel: the matmul whose output has 4 rows."""
    return next(
        t
        for t in found
        if _rule(targets, t) == "matmul_bf16"
        and int(ArgInfo.from_prim_func(t.mod["main"])[-1].shape[0]) == 4
    )


def test_first_point_is_the_default_bf16_schedule(bf16_tasks) -> None:  # noqa: ANN001
    targets, found = bf16_tasks
    rules = {}
    for task in found:
        default = targets.default_scheduled(task)
        rule = str(default["main"].attrs["graphopt.schedule_rule"])
        rules.setdefault(rule, []).append(task.name)
        # the space's default decisions and plan give the default kernel, TIR for TIR
        assert default_trace(task.mod, targets.tune_target, default) is not None, task.name
        spaces = graphopt_design_spaces(s_tir.Schedule(task.mod), targets.tune_target)
        assert has_choices(task.mod, targets.tune_target), task.name
        if rule == "conv2d_nchwc_bf16":  # the default plan and its alternatives
            assert len(spaces) == len(_bf16.CONV_PLANS), task.name
    # the conv, the Gemm (one row: no row plans) and the plain matmul (4 rows: every plan)
    assert sorted(rules) == list(BF16_RULES) and len(rules["matmul_bf16"]) == 2
    plain = _plain_matmul(targets, found)
    spaces = graphopt_design_spaces(s_tir.Schedule(plain.mod), targets.tune_target)
    assert len(spaces) == len(_bf16.MATMUL_PLANS)


def test_a_fp32_kernel_is_not_taken_by_a_bf16_space() -> None:
    """The bf16 spaces decline kernels that are not theirs (an fp32 conv keeps the fp32
    rule's space), as their rules do."""
    targets = Targets.of(resolve("x86"), "nchwc")
    _, graph, _ = prepare(_conv_gemm())
    tasks = _tasks.extract_tasks(
        to_relax(graph), targets.spec, targets.compile_target, "*conv2d*", "nchwc"
    )
    assert tasks
    for task in tasks:
        sch = s_tir.Schedule(task.mod)
        for schedule, plans in _bf16.TUNABLE.values():
            assert schedule(sch.copy(), targets.tune_target, plan=plans[0]) is None
        assert _rule(targets, task) not in BF16_RULES


def _run(mod: tvm.IRModule, args: list[np.ndarray], target: tvm.target.Target) -> tuple:
    lib = tvm.compile(mod, target=target)
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy(), lib.mod.inspect_source("asm")


def _inputs(task: Task, rng: np.random.Generator) -> list[np.ndarray]:
    return [
        rng.standard_normal([int(d) for d in info.shape]).astype(
            ml_dtypes.bfloat16 if str(info.dtype) == "bfloat16" else str(info.dtype)
        )
        for info in ArgInfo.from_prim_func(task.mod["main"])
    ]


def test_random_points_keep_vdpbf16ps_and_compute_the_same(bf16_tasks) -> None:  # noqa: ANN001
    """Seeded random points of every design space of the conv and the plain matmul: each
    replays, builds, still calls vdpbf16ps, and gives the default kernel's output (the
    default matches onnxruntime: tests/targets/test_precision.py); the plain matmul also
    numpy's (bf16 products are exact in float32: only the sums' rounding differs)."""
    targets, found = bf16_tasks
    target = targets.compile_target
    conv = next(t for t in found if _rule(targets, t) == "conv2d_nchwc_bf16")
    plain = _plain_matmul(targets, found)
    rng = np.random.default_rng(0)
    checked, varied = 0, 0
    for task, per_space in ((conv, 3), (plain, 4)):
        args = _inputs(task, rng)
        expected, asm = _run(targets.default_scheduled(task), args, target)
        assert "vdpbf16ps" in asm
        if task is plain:  # out[m, n] = sum_k x[m, k] * w[k, n], w stored as [n/16, k/2, 16, 2]
            x, pairs = (a.astype(np.float64) for a in args[:2])
            w = pairs.transpose(1, 3, 0, 2).reshape(x.shape[1], -1)
            np.testing.assert_allclose(expected, x @ w, rtol=1e-5, atol=1e-4)
        spaces = graphopt_design_spaces(s_tir.Schedule(task.mod), targets.tune_target)
        defaults = [dict(s.trace.decisions.items()) for s in spaces]
        for i, space in enumerate(spaces):
            trace = space.trace.simplified(remove_postproc=True)
            for seed in range(per_space):
                sch = s_tir.Schedule(task.mod, seed=7919 * seed + i + 1)
                s_tir.Trace(trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
                picked = [int(v) for v in sch.trace.decisions.values()]
                varied += picked != [int(v) for v in defaults[i].values()]
                got, asm = _run(sch.mod, args, target)
                assert "vdpbf16ps" in asm, (task.name, i, picked)
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
                checked += 1
    assert checked >= 24 and varied >= 8  # points other than the default were built


@pytest.mark.slow  # a tune and two builds: 35-80 s on this shared machine
def test_tune_bf16_space_graphopt_searches_bf16_kernels(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """``graphopt tune --precision bf16 --space graphopt`` on a tiny model: the vdpbf16ps
    conv and matmul are tasks with choices (searched, not "search space exhausted" before
    a trial); a bf16 compile with the database applies their records, which still call
    vdpbf16ps, and verifies against onnxruntime."""
    model = tmp_path / "m.onnx"
    onnx.save(_conv_gemm(channels=16, size=4), model)
    db = tmp_path / "db"
    argv = ["tune", str(model), "--db", str(db), "--precision", "bf16", "--space", "graphopt"]
    argv += ["--per-task", "2", "--batch", "2", "--tasks", "*bf16*", "--no-model-latency"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if "bf16" in line.split()[0]}
    conv = next(line for name, line in lines.items() if "conv2d_nchwc_bf16" in name)
    assert "2/2" in conv and "exhausted" not in conv  # two trials, not a space of one point
    assert any("matmul_bf16" in name for name in lines)
    # compiled with the records (defaults made slow so they apply): verifies
    slow_defaults(db)
    out_so = tmp_path / "m.so"
    compile_argv = ["compile", str(model), "-o", str(out_so), "--tuning-db", str(db)]
    assert main([*compile_argv, "--precision", "bf16"]) == 0
    manifest = read_manifest(out_so)
    assert manifest["verification"]["ok"]
    applied = set(manifest["tuning"]["from_database"])
    assert any("conv2d_nchwc_bf16" in name for name in applied), applied
    # the records' schedules keep the tensor intrinsic
    _, graph, _ = prepare(_conv_gemm(channels=16, size=4))
    spec = resolve("x86")
    database = open_database(db, spec, "bf16")
    exe = build(to_relax(graph), spec, "nchwc", [ApplyTuningDatabase(database)], "bf16")
    asm = "".join(m.inspect_source("asm") for m in exe.mod.imports if m.kind == "llvm")
    assert "vdpbf16ps" in asm
