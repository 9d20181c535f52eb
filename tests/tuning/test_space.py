"""graphopt's schedule rules as a search space (``tune --space``), default tier.

The space's first point must be today's default schedule exactly (so the untuned kernels
and the search's starting point are one and the same), every other point a valid kernel
computing the same values, and ``--space`` must pick the generators it names.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import onnx
import pytest
from tvm import s_tir
from tvm.s_tir.meta_schedule.space_generator import (
    PostOrderApply,
    ScheduleFn,
    SpaceGeneratorUnion,
)

from graphopt import zoo
from graphopt.artifact import read_manifest
from graphopt.cli import main
from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import resolve
from graphopt.tuning import TuningError, format_report, tune
from graphopt.tuning._options import SPACES, TuneOptions
from graphopt.tuning._search import tune_context
from graphopt.tuning._session import Targets
from graphopt.tuning._space import (
    default_trace,
    graphopt_design_spaces,
    has_choices,
    phases_for,
    phases_of,
)
from graphopt.tuning._tasks import extract_tasks
from tests.conftest import make_model
from tests.targets._cnn_blocks import inverted_residual
from tests.tuning._models import conv_relu, slow_defaults
from tests.tuning._spaces import assert_points_match, random_args, run_kernel

CONV_RULES = {"conv2d_nchwc", "pointwise_nchwc", "depthwise_nchwc", "grouped_nchwc"}
# The reduction over input channel chunks split in steps of 4 (a streamed kernel).
STEPS = r"v_rco = T\.axis\.reduce\(T\.int64\(\d+\), \w+ \* T\.int64\(4\)"


def _tasks(model, layout: str):  # noqa: ANN001, ANN202
    _, graph, _ = prepare(model)
    targets = Targets.of(resolve("x86"), layout)
    found = extract_tasks(to_relax(graph), targets.spec, targets.compile_target, None, layout)
    return targets, found


@pytest.fixture(scope="module")
def conv_tasks():  # noqa: ANN201
    """conv_variants' kernels (dense, dilated, 1x1, depthwise, grouped convs) in NCHWc."""
    return _tasks(zoo.build("conv_variants"), "nchwc")


def test_first_point_is_the_default_schedule(conv_tasks) -> None:  # noqa: ANN001
    targets, found = conv_tasks
    rules = set()
    for task in found:
        default = targets.default_scheduled(task)
        rule = str(default["main"].attrs["graphopt.schedule_rule"])
        # the graphopt space's default decisions give the same kernel, TIR for TIR
        assert default_trace(task.mod, targets.tune_target, default) is not None, task.name
        spaces = graphopt_design_spaces(s_tir.Schedule(task.mod), targets.tune_target)
        if rule in CONV_RULES:
            rules.add(rule)
            assert len(spaces) >= 2, task.name  # the default plan and its alternatives
            assert has_choices(task.mod, targets.tune_target)
        elif rule == "injective":
            assert len(spaces) == 1 and not has_choices(task.mod, targets.tune_target)
    assert rules == CONV_RULES  # every packed-conv family was checked


def test_nhwc_and_matmul_spaces_start_at_their_defaults() -> None:
    for model, layout in ((conv_relu(), "nhwc"), (zoo.build("mlp_head"), "nchwc")):
        targets, found = _tasks(model, layout)
        for task in found:
            default = targets.default_scheduled(task)
            assert default_trace(task.mod, targets.tune_target, default) is not None, task.name


def test_sampled_points_compute_what_the_default_does(conv_tasks) -> None:  # noqa: ANN001
    """Random points of every design space of a dense and a depthwise conv: each replays,
    builds and gives the default kernel's output (the default matches onnxruntime:
    tests/targets)."""
    targets, found = conv_tasks
    rng = np.random.default_rng(0)
    checked = 0
    seen = set()
    for task in found:
        rule = str(targets.default_scheduled(task)["main"].attrs["graphopt.schedule_rule"])
        if rule not in ("conv2d_nchwc", "depthwise_nchwc") or rule in seen:
            continue
        seen.add(rule)
        args = random_args(task.mod, rng)
        expected = run_kernel(targets.default_scheduled(task), args)
        spaces = graphopt_design_spaces(s_tir.Schedule(task.mod), targets.tune_target)
        for i, space in enumerate(spaces):
            checked += assert_points_match(task.mod, space, expected, args, [i + 1])
    assert seen == {"conv2d_nchwc", "depthwise_nchwc"} and checked >= 8


def test_a_streaming_conv_space_starts_at_its_default_and_its_points_compute_the_same() -> None:
    """An 8x8 1024->512 1x1 conv (2 MiB of weights: the default streams them,
    _cpu_schedules._stream_reduction, on AVX-512 and AVX2 alike: 8 pixels take a
    two-block tile on both, where ResNet's 7 take a padded one on AVX2): the space's
    default decisions give the default kernel, TIR for TIR, and random points of its
    default plan (the register tile and the step sampled) compute what it does."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((512, 1024, 1, 1)) / 32).astype(np.float32)
    conv = onnx.helper.make_node("Conv", ["x", "w"], ["y"])
    model = make_model([conv], {"x": (1, 1024, 8, 8)}, {"y": (1, 512, 8, 8)}, {"w": w})
    targets, found = _tasks(model, "nchwc")
    (task,) = [
        t
        for t in found
        if str(targets.default_scheduled(t)["main"].attrs["graphopt.schedule_rule"])
        == "pointwise_nchwc"
    ]
    default = targets.default_scheduled(task)
    assert re.search(STEPS, default["main"].script())  # the stream's steps
    assert default_trace(task.mod, targets.tune_target, default) is not None
    args = random_args(task.mod, rng)
    expected = run_kernel(default, args)
    spaces = graphopt_design_spaces(s_tir.Schedule(task.mod), targets.tune_target)
    assert_points_match(task.mod, spaces[0], expected, args, [1, 2, 3])


def test_a_fused_depthwise_pointwise_space_starts_at_its_default_and_computes_the_same() -> None:
    """MobileNetV2's block: the depthwise conv and the projection it feeds are one kernel
    (graphopt/targets/_fuse_dwpw.py); the space of its rule starts at the default kernel,
    TIR for TIR, and random points (both register tiles sampled) compute what it does."""
    targets, found = _tasks(inverted_residual(28), "nchwc")
    (task,) = [
        t
        for t in found
        if str(targets.default_scheduled(t)["main"].attrs["graphopt.schedule_rule"])
        == "depthwise_pointwise_nchwc"
    ]
    default = targets.default_scheduled(task)
    assert default_trace(task.mod, targets.tune_target, default) is not None
    assert has_choices(task.mod, targets.tune_target)
    rng = np.random.default_rng(2)
    args = random_args(task.mod, rng)
    expected = run_kernel(default, args)
    spaces = graphopt_design_spaces(s_tir.Schedule(task.mod), targets.tune_target)
    assert_points_match(task.mod, spaces[0], expected, args, [1, 2, 3])


def test_space_option_picks_the_generators(conv_tasks) -> None:  # noqa: ANN001
    targets, found = conv_tasks
    kinds = {"generic": PostOrderApply, "graphopt": ScheduleFn, "union": SpaceGeneratorUnion}
    for space, kind in kinds.items():
        ctx = tune_context(
            found[0], targets.tune_target, cores=1, options=TuneOptions(), space=space
        )
        assert isinstance(ctx.space_generator, kind)
    # what each --space searches, in order (both: graphopt's space first, then generic)
    phases = {space: phases_of(space) for space in SPACES}
    assert phases == {
        "generic": ("generic",),
        "graphopt": ("graphopt",),
        "both": ("graphopt", "generic"),
    }
    with pytest.raises(TuningError, match="--space must be one of"):
        TuneOptions(space="dlight")
    assert TuneOptions().space == "both"


def test_both_keeps_winograd_kernels_to_graphopts_space(tmp_path) -> None:  # noqa: ANN001
    """``--space both`` searches a Winograd kernel (its transforms and products) in
    graphopt's space only: the generic rules schedule them as unrelated stages, many times
    slower than the default, and their builds ran into the time limit. Run with a budget
    its graphopt space cannot fill (patience 1), no Winograd task gets a generic trial and
    each ends there, while the 1x1 conv beside them moves on to the generic space;
    ``--space generic`` still searches a Winograd kernel where it is asked to."""
    from tests.targets.test_winograd import downsample_block

    model, _ = downsample_block()
    targets, found = _tasks(model, "nchwc")
    winograd = {t.name for t in found if "winograd" in t.name}
    others = {t.name for t in found if "conv2d" in t.name} - winograd
    assert len(winograd) >= 2 and others  # the strided parts and the 3x3 conv; the 1x1s
    for task in found:
        own = task.name in winograd
        assert phases_for("both", task.mod) == (("graphopt",) if own else phases_of("both"))
        assert phases_for("generic", task.mod) == ("generic",)
        assert phases_for("graphopt", task.mod) == ("graphopt",)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    db = tmp_path / "db"
    report = tune(
        path, "x86", db, per_task=8, batch_size=2, patience=1, measure_model=False, seed=1
    )
    generic = _generic_trials(db)
    rows = {t.name: t for t in report.tasks}
    for name in winograd:
        assert generic.get(name, 0) == 0, name
        assert rows[name].status in ("search space exhausted", "stopped early (no gain)")
    assert any(generic.get(name, 0) > 0 for name in others)


def _generic_trials(db) -> dict[str, int]:  # noqa: ANN001
    """Per kernel, the records of a database whose trace is the generic space's (the
    generic rules sample tile sizes with ``SamplePerfectTile``; graphopt's space never
    does)."""
    from graphopt.tuning import TuningDatabase

    counts = {}
    with TuningDatabase(db, resolve("x86"), create=False) as database:
        for entry in database.entries():
            counts[entry.name] = sum(
                any(i.kind.name == "SamplePerfectTile" for i in record.trace.insts)
                for record in entry.records.values()
            )
    return counts


def test_graphopt_space_tunes_prints_latency_and_verifies(tmp_path) -> None:  # noqa: ANN001
    """``--space graphopt``: only the conv is searched (the layout transforms have no
    choices), the report has the before/after model latency lines next to onnxruntime,
    a rerun spends nothing, and the tuned model still matches onnxruntime."""
    model = tmp_path / "a.onnx"
    onnx.save(conv_relu(), model)
    db = tmp_path / "db"
    report = tune(model, "x86", db, per_task=2, batch_size=2, space="graphopt")
    conv = next(t for t in report.tasks if t.name == "fused_conv2d_nchwc_relu")
    assert conv.trials == 2 and conv.failed == 0 and conv.tuned_secs is not None
    others = [t for t in report.tasks if t is not conv]
    assert others and all(t.status == "search space exhausted" and t.trials == 0 for t in others)
    text = format_report(report)
    before = next(x for x in text.splitlines() if x.startswith("model latency before tuning"))
    after = next(x for x in text.splitlines() if x.startswith("model latency after"))
    for line in (before, after):
        assert "estimated" in line and "measured" in line and "onnxruntime" in line
    assert report.latency.default_ms > 0 and report.latency.onnxruntime_ms > 0
    assert "trials/min" in text and "space graphopt" in text
    # a rerun: no trial, nothing built (not even the model: its timing is reused)
    records = (db / "records.jsonl").read_bytes()
    again = tune(model, "x86", db, per_task=2, batch_size=2, space="graphopt")
    assert again.new_trials == 0 and again.timing["build"] == 0
    assert (db / "records.jsonl").read_bytes() == records
    assert again.latency.default_ms == report.latency.default_ms
    assert "model latency before tuning" in format_report(again)
    # compiled with the records (defaults made slow so they apply): matches onnxruntime
    slow = tmp_path / "slow"
    shutil.copytree(db, slow)
    slow_defaults(slow)
    out = tmp_path / "a.so"
    assert main(["compile", str(model), "-o", str(out), "--tuning-db", str(slow)]) == 0
    manifest = read_manifest(out)
    assert manifest["verification"]["ok"]
    assert "fused_conv2d_nchwc_relu" in manifest["tuning"]["from_database"]


def test_kernels_the_built_model_runs_as_views_get_no_task_and_no_record(tmp_path) -> None:  # noqa: ANN001
    """small_cnn's flatten is a reshape kernel up to the schedule phase and a view of its
    input in the built model: tuning it bought nothing, and a record for it counted as
    used in compile's report (ResNet-50 tuned 30 minutes: 7 used, 5 kernels ran)."""
    import tvm
    from tvm import tirx
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from graphopt.targets import build
    from graphopt.tuning import ApplyTuningDatabase, TuningDatabase
    from graphopt.tuning._database import workload_mod
    from graphopt.tuning._tasks import phases_before_schedule, views

    model = zoo.build("small_cnn")
    targets, found = _tasks(model, "nchwc")
    _, graph, _ = prepare(model)
    relax_mod = to_relax(graph)
    with targets.compile_target:
        passes = phases_before_schedule(targets.spec, targets.compile_target, "nchwc")
        mod = tvm.transform.Sequential(passes)(relax_mod)
    kernels = {g.name_hint: f for g, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    gone = views(mod)
    assert gone and gone < set(kernels)
    assert not gone & {t.name for t in found}
    # a database with a record for every kernel, the views' too (as tune made them before)
    with TuningDatabase(tmp_path / "db", resolve("x86")) as db:
        for name, func in kernels.items():
            wmod = workload_mod(func)
            entry = db.add_workload(wmod, name, 0.0)
            trace = s_tir.Schedule(wmod).trace
            db.add_results(entry, [(trace, [1e-6], ArgInfo.from_prim_func(func), None)])
        report: dict = {}
        build(relax_mod, targets.spec, "nchwc", [ApplyTuningDatabase(db, report)])
    assert set(report["from_database"]) == set(kernels) - gone
    assert not gone & set(report["default"])


def _last_stage_winograd():  # noqa: ANN202
    from tests.targets.test_winograd import last_stage

    return last_stage()[0]


def _streamed_1x1():  # noqa: ANN202
    from tests.targets.test_cpu_schedules import _wide_conv_model

    # 2 MiB of weights, streamed on AVX-512 and AVX2 alike (ResNet's 7-wide rows take a
    # padded tile on AVX2, which keeps the default nest)
    return _wide_conv_model(1024, 512, 1, 1, 8)


def _default_replayed(mod, target):  # noqa: ANN001, ANN202
    """(the graphopt space's default trace of ``mod``, a schedule of ``mod`` replaying it
    bare: nothing added outside the trace)."""
    trace = graphopt_design_spaces(s_tir.Schedule(mod), target)[0].trace
    sch = s_tir.Schedule(mod)
    trace.apply_to_schedule(sch, remove_postproc=False)
    return trace, sch


@pytest.mark.parametrize(
    ("model", "kernel"), [(_last_stage_winograd, "winograd"), (_streamed_1x1, "conv2d")]
)
def test_a_record_streaming_its_weights_gets_the_prefetch(tmp_path, model, kernel) -> None:  # noqa: ANN001
    """The prefetches of streamed weights (``_winograd.prefetch_products``,
    ``_cpu_schedules.prefetch_streamed``) are put into the scheduled nest outside the
    schedule's trace; a record of a 512-channel 7x7 Winograd conv (16 MiB of transformed
    weights) or of an 8x8 1024->512 1x1 conv (2 MiB) applied by compile has it as the
    default schedule does; its trace alone replays without it."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from graphopt.targets import build
    from graphopt.targets._profile import record_schedule
    from graphopt.tuning import ApplyTuningDatabase, TuningDatabase

    model = model()
    targets, found = _tasks(model, "nchwc")
    (task,) = [t for t in found if kernel in t.name]
    trace, replayed = _default_replayed(task.mod, targets.tune_target)
    assert "llvm.prefetch" not in replayed.mod.script()
    _, graph, _ = prepare(model)
    with TuningDatabase(tmp_path / "db", resolve("x86")) as db:
        entry = db.add_workload(task.mod, task.name, 0.0)
        args = ArgInfo.from_prim_func(task.mod["main"])
        db.add_results(entry, [(trace, [1e-6], args, None)])
        report: dict = {}
        with record_schedule() as record:
            build(to_relax(graph), targets.spec, "nchwc", [ApplyTuningDatabase(db, report)])
    assert list(report["from_database"]) == [task.name]
    assert "llvm.prefetch" in record.module[task.name].script()


def test_the_search_measures_its_candidates_as_compile_builds_them(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """An 8x8 1024->512 1x1 conv streams its 2 MiB of weights, and its default schedule
    prefetches them outside the trace. Each kernel ``tune`` measures is the kernel compile
    builds from its record (``_apply.as_built``: with the prefetch where the candidate's
    nest streams its weights), and the records keep the bare traces. Measured as the bare
    trace, a candidate lost to the default by the prefetch alone.

    The batch's first candidate is the default's own trace (bare), the others the search's:
    which of those stream their weights varies from run to run (about one in three did, and
    a batch of three had none in one CI run), so the test puts in one that does."""
    import tvm_ffi
    from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate

    from graphopt.tuning import TuningDatabase, _session
    from graphopt.tuning._apply import replayed

    model_path = tmp_path / "m.onnx"
    onnx.save(_streamed_1x1(), model_path)
    measured: list = []
    real = _session.measure

    def spy(builder, runner, target, mods, infos):  # noqa: ANN001, ANN202
        measured.extend(m["main"] for m in mods if "conv2d" in m["main"].script())
        return real(builder, runner, target, mods, infos)

    real_candidates = _session.Session._candidates

    def with_default(self, state, model):  # noqa: ANN001, ANN202
        found = real_candidates(self, state, model)
        _, sch = _default_replayed(state.task.mod, self.targets.tune_target)
        return [MeasureCandidate(sch, found[0].args_info), *found[1:]] if found else found

    monkeypatch.setattr(_session, "measure", spy)
    monkeypatch.setattr(_session.Session, "_candidates", with_default)
    # measured with the batch, the default itself would stand for its trace's candidate
    monkeypatch.setattr(_session.Session, "_default_again", lambda self, state: None)
    report = tune(
        model_path,
        "x86",
        tmp_path / "db",
        tasks="*conv2d*",
        per_task=3,
        batch_size=3,
        space="graphopt",
        measure_model=False,
    )
    (task,) = report.tasks
    assert task.trials == 3
    with TuningDatabase(tmp_path / "db", resolve("x86")) as db:
        (entry,) = [e for e in db.entries() if e.trials]
        records = list(entry.records.values())
        wmod = entry.workload.mod
    assert records and all("llvm.prefetch" not in str(r.trace) for r in records)
    built = [replayed(record, wmod)["main"] for record in records]
    for kernel in built:  # each candidate was measured as compile builds its record
        assert any(tvm_ffi.structural_equal(kernel, m) for m in measured)
    assert any("llvm.prefetch" in kernel.script() for kernel in built)
