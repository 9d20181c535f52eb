"""Where ``tune`` spends its budget, and which kernels a database serves (default tier):
budgets by measured time, early stops, and a database of one batch size never serving
another."""

from __future__ import annotations

from types import SimpleNamespace

import onnx
from tvm import s_tir

from graphopt.artifact import read_manifest
from graphopt.cli import main
from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import resolve
from graphopt.tuning import TuningDatabase, format_report, tune
from graphopt.tuning._apply import beats_default
from graphopt.tuning._options import TuneOptions
from graphopt.tuning._report import TaskResult, TuneReport
from graphopt.tuning._session import Clock, Session, Targets, TaskState, applied_secs
from graphopt.tuning._tasks import Task, extract_tasks
from tests.tuning._models import conv_relu, slow_defaults


def test_budgets_follow_measured_time_not_flops() -> None:
    """A kernel with few FLOPs but most of the measured time gets most of the trials."""
    heavy_flops = SimpleNamespace(weight=Task("a", None, None, 1e9, 1, 1e-5).weight)
    slow_copy = SimpleNamespace(weight=Task("b", None, None, 0.0, 2, 1e-3).weight)
    shares = TuneOptions(trials=100).budgets([heavy_flops, slow_copy])
    assert shares[1] > 90 and shares[0] >= 1 and sum(shares) == 100
    # unmeasured: FLOPs x calls
    assert Task("c", None, None, 5.0, 3).weight == 15.0


def _db_with_conv(tmp_path):  # noqa: ANN001, ANN202
    db = TuningDatabase(tmp_path / "db", resolve("x86"))
    _, graph, _ = prepare(conv_relu())
    targets = Targets.of(resolve("x86"), "nchwc")
    task = extract_tasks(to_relax(graph), targets.spec, targets.compile_target, "*conv*")[0]
    return db, task


def test_a_task_stops_once_its_search_stops_improving(tmp_path) -> None:  # noqa: ANN001
    db, task = _db_with_conv(tmp_path)
    entry = db.add_workload(task.mod, task.name, task.flops)
    trace = s_tir.Schedule(task.mod).trace
    info = []

    def add(secs: float | None) -> None:
        db.add_results(entry, [(trace, [secs] if secs else None, info, None if secs else "x")])

    add(1e-3)
    add(0.5e-3)  # 2x faster: an improvement at trial 2
    for _ in range(3):
        add(0.499e-3)  # faster, but by less than 1%: no improvement
    add(None)  # a failure gains nothing either
    assert entry.improved_at == 2 and entry.trials == 6
    assert entry.stalled(4) and not entry.stalled(5) and not entry.stalled(0)
    state = TaskState.start(task, 100, db)
    state.settle(100, 4)
    assert state.status == "converged" and state.done
    state.settle(100, 0)  # patience 0: never stops early
    assert state.status == "pending"
    db.close()
    # a reopened database knows the same (the records are replayed in order)
    with TuningDatabase(tmp_path / "db", resolve("x86")) as again:
        assert again.find(task.mod).improved_at == 2


def test_compile_applies_a_record_only_when_it_beats_the_default_by_5_percent() -> None:
    assert applied_secs(1.0, 0.96) == 1.0  # 4% faster: noise, keep the default
    assert applied_secs(1.0, 0.95) == 0.95
    assert applied_secs(None, 0.5) == 0.5 and applied_secs(1.0, None) == 1.0
    # the one rule compile, tune's confirmation and its in-model check all ask
    assert not beats_default(1.0, 0.96) and beats_default(1.0, 0.95)
    assert beats_default(None, 0.5) and not beats_default(1.0, None)


def test_a_database_of_one_batch_size_does_not_serve_another(tmp_path, capsys) -> None:  # noqa: ANN001
    one, two = tmp_path / "b1.onnx", tmp_path / "b2.onnx"
    onnx.save(conv_relu(), one)
    onnx.save(conv_relu(batch=2), two)
    db = tmp_path / "db"
    tune(one, "x86", db, per_task=1, batch_size=1, space="graphopt", measure_model=False)
    # make every record win, so only a workload mismatch can keep it out
    slow_defaults(db)
    _, graph, _ = prepare(two)
    targets = Targets.of(resolve("x86"), "nchwc")
    tasks = extract_tasks(to_relax(graph), targets.spec, targets.compile_target)
    with TuningDatabase(db, resolve("x86")) as opened:
        assert tasks and all(opened.find(t.mod) is None for t in tasks)
        assert all(e.name for e in opened.entries())  # the batch-1 workloads are there
    out = tmp_path / "b2.so"
    assert main(["compile", str(two), "-o", str(out), "--tuning-db", str(db)]) == 0
    tuning = read_manifest(out)["tuning"]
    assert tuning["from_database"] == {} and "fused_conv2d_nchwc_relu" in tuning["default"]
    # the batch-1 model is served (the records do apply to their own workloads)
    out1 = tmp_path / "b1.so"
    assert main(["compile", str(one), "-o", str(out1), "--tuning-db", str(db)]) == 0
    assert "fused_conv2d_nchwc_relu" in read_manifest(out1)["tuning"]["from_database"]


def test_a_lucky_record_loses_its_claim_when_measured_again(tmp_path) -> None:  # noqa: ANN001
    """The best record claims 2x; measured again beside the default it is 1% faster: the
    check decides (compile keeps the default), until a better record replaces it."""
    db, task = _db_with_conv(tmp_path)
    entry = db.add_workload(task.mod, task.name, task.flops)
    trace = s_tir.Schedule(task.mod).trace
    db.set_baseline(entry, 1e-3)
    db.add_results(entry, [(trace, [0.5e-3], [], None)])
    assert applied_secs(*entry.confirmed()) == 0.5e-3  # as the search measured it
    db.set_checked(entry, 1e-3, 0.99e-3)
    assert entry.confirmed() == (1e-3, 0.99e-3)
    assert applied_secs(*entry.confirmed()) == 1e-3  # not 5% faster: the default stays
    db.close()
    with TuningDatabase(tmp_path / "db", resolve("x86")) as again:
        found = again.find(task.mod)
        assert applied_secs(*found.confirmed()) == 1e-3  # the check is on disk
        again.add_results(found, [(trace, [0.2e-3], [], None)])  # a new best: unchecked
        assert found.confirmed() == (1e-3, 0.2e-3)


def test_a_time_budget_keeps_back_the_work_after_the_search() -> None:
    """The search stops early enough for the re-measure of winning records and the model
    timing to end within the budget, but never keeps back more than half of it."""
    now = Clock.started(100.0)
    assert not now.up() and now.up(reserve=100.5) and not now.up(reserve=90.0)
    assert not Clock.started(None).up(reserve=1e9)  # no budget, no deadline

    def session(claims: int, closing: float) -> Session:
        entry = SimpleNamespace(best=object(), best_secs=1.0, baseline_secs=2.0)
        states = [SimpleNamespace(entry=entry, new_trials=10) for _ in range(claims)]
        s = SimpleNamespace(clock=now, states=states, closing_secs=closing)
        s.timing = {"build": 20.0 * claims, "measure": 10.0 * claims}  # 3 s per candidate
        return s

    # 2 winners x (default + record) x 2 (more repeats) x 3 s, plus the model timing
    assert Session.reserve(session(2, closing=8.0)) == 2 * 2 * 2 * 3.0 + 8.0
    assert Session.reserve(session(0, closing=8.0)) == 8.0
    assert Session.reserve(session(20, closing=8.0)) == 50.0  # half the budget at most


def test_a_finished_run_with_a_time_budget_rebuilds_nothing(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A time budget builds the default model before the search (to keep back its
    timing); a rerun of a finished command has its figures cached and builds nothing."""
    from graphopt.tuning import _latency, _tuner

    db = tmp_path / "db"
    first = tune(conv_relu(), "x86", db, per_task=1, batch_size=1, time_budget="5m")
    assert first.latency.default_ms is not None

    def no_build(*_args, **_kwargs):
        raise AssertionError("a finished run rebuilt the model")

    monkeypatch.setattr(_tuner, "build", no_build)
    monkeypatch.setattr(_latency, "build", no_build)
    again = tune(conv_relu(), "x86", db, per_task=1, batch_size=1, time_budget="5m")
    assert again.latency.default_ms == first.latency.default_ms  # the cached figures
    assert sum(t.new_trials for t in again.tasks) == 0
    # each task reached its one trial or had no choices long before the 5 minutes
    assert "into the 5 min budget" in format_report(first)


def test_report_says_when_every_task_ended_before_the_time_budget() -> None:
    """A search whose tasks all stop early (or run out of space) before the time budget
    ends says so in one line, with how many ended which way; a run the clock or Ctrl-C
    cut short, or one without a time budget, has no such line."""

    def task(name: str, status: str) -> TaskResult:
        return TaskResult(name, 1e6, 1, 8, 8, 8, 0, 1e-4, 1e-4, status)

    tasks = [
        task("a", "stopped early (no gain)"),
        task("b", "search space exhausted"),
        task("c", "stopped early (no gain)"),
    ]
    timing = {"search": 0.0, "build": 0.0, "measure": 0.0, "baseline": 0.0}

    def lines(**kw) -> list[str]:  # noqa: ANN003
        report = TuneReport(tasks=tasks, db="db", timing=timing, seconds=750.0, **kw)
        return [x for x in format_report(report).splitlines() if x.startswith("every task")]

    (line,) = lines(time_budget=1800.0)
    assert "12.5 min into the 30 min budget" in line
    assert "(2 stopped early (no gain), 1 search space exhausted)" in line
    assert lines(time_budget=1800.0, timed_out=True) == []
    assert lines(time_budget=1800.0, interrupted=True) == []
    assert lines() == []
