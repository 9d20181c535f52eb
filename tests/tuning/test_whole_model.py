"""The whole-model check: ``tune`` times the model with and without its database in
paired rounds and keeps the figures; ``compile`` keeps the default schedules for a model
that did not measure faster with the database beyond the noise of separate builds (never
slower than the default, end to end)."""

from __future__ import annotations

import json
import shutil
import time

import onnx
import pytest

from graphopt.artifact import read_manifest
from graphopt.cli import main
from graphopt.targets import check_layout, resolve
from graphopt.tuning import (
    ModelLatency,
    TuneReport,
    format_report,
    last_measured,
    last_passing,
    open_database,
    tune,
)
from graphopt.tuning._latency import COPY, MODEL_MIN_GAIN, paired_rounds, remember, verdict
from graphopt.tuning._report import TaskResult
from graphopt.tuning._tuner import _lower
from tests.tuning._models import conv_relu, slow_defaults


def test_paired_rounds_take_turns_and_pair_each_round() -> None:
    """Each call gets one figure per round, and the paired ratios tell a call twice as slow.
    (Sleeps of 10 and 20 ms: at 2 and 4 ms a loaded machine's oversleep read 2.55.)"""
    order: list[str] = []

    def sleeper(name: str, secs: float):  # noqa: ANN202
        def call() -> None:
            order.append(name)
            time.sleep(secs)

        return call

    figures = paired_rounds(
        {"a": sleeper("a", 0.01), "b": sleeper("b", 0.02)}, rounds=4, block=0.05
    )
    assert len(figures["a"]) == len(figures["b"]) == 4
    ratios = sorted(b / a for a, b in zip(figures["a"], figures["b"], strict=True))
    assert 1.5 < ratios[len(ratios) // 2] < 2.5
    # after 4 warm-up calls each, the order rotates: a b | b a | a b | b a
    assert order[8] == "a" and order[-1] == "a"


def test_the_check_reads_the_least_favourable_ratio() -> None:
    """tuned is held against each VM of the default and read two ways; the check takes
    the reading least favourable to tuned, so no single lucky reading passes it."""
    # 5% faster than the default's first VM every round, level with the second
    ratio, aa = verdict({"default": [1.0] * 5, COPY: [0.95] * 5, "tuned": [0.95] * 5})
    assert ratio == pytest.approx(1.0) and aa == pytest.approx(0.95)
    assert ratio > MODEL_MIN_GAIN
    # the median of the rounds' ratios passes (0.975) but the medians do not (1.17)
    default = [10.0, 10.0, 10.0, 12.0, 12.0]
    figures = {"default": default, COPY: default, "tuned": [9.7, 9.7, 12.0, 11.7, 11.7]}
    ratio, aa = verdict(figures)
    assert ratio == pytest.approx(1.17) and aa == pytest.approx(1.0)
    # a real gain, however read, passes
    ratio, _ = verdict({"default": [1.0, 1.1], COPY: [1.02, 1.08], "tuned": [0.9, 0.99]})
    assert ratio == pytest.approx(0.9) and ratio < MODEL_MIN_GAIN


_NO_TIMING = {"search": 0.0, "build": 0.0, "measure": 0.0, "baseline": 0.0}


def _lowered(model):  # noqa: ANN001, ANN202 - as compile lowers it for x86
    spec = resolve("x86")
    return _lower(model, None, spec.pass_defaults)[1], check_layout(spec, None)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):  # noqa: ANN001, ANN201
    """A tiny model tuned into a database whose records compile would apply (its
    defaults made slow), with no whole-model figures yet."""
    tmp = tmp_path_factory.mktemp("whole")
    model = tmp / "a.onnx"
    onnx.save(conv_relu(), model)
    db = tmp / "db"
    tune(model, "x86", db, per_task=2, batch_size=2, space="graphopt", measure_model=False)
    slow_defaults(db)
    return model, db


@pytest.mark.parametrize("ratio", [1.2, 0.99, 0.8])
def test_compile_keeps_defaults_for_a_model_measured_slower(tuned, tmp_path, capsys, ratio) -> None:  # noqa: ANN001
    """The figures ``tune`` keeps for this model decide: slower with the database, or
    faster by less than separately loaded builds of the same code differ (0.99), and no
    record is applied (the manifest and the log say why); faster, and they are."""
    model, src = tuned
    db = tmp_path / "db"
    shutil.copytree(src, db)
    relax_mod, layout = _lowered(onnx.load(model))
    check = ModelLatency(
        default_ms=1.0, tuned_ms=ratio, tuned_kernels=1, tuned_vs_default=ratio, rounds=7
    )
    remember(relax_mod, layout, open_database(db, resolve("x86")), check)
    out = tmp_path / "a.so"
    assert main(["compile", str(model), "-o", str(out), "--tuning-db", str(db)]) == 0
    tuning = read_manifest(out)["tuning"]
    assert tuning["whole_model"]["tuned_vs_default"] == ratio
    assert tuning["whole_model"]["applied"] is (ratio < 0.9)
    assert bool(tuning["from_database"]) is (ratio < 0.9)
    assert ("default schedules kept" in capsys.readouterr().err) is (ratio > 0.9)
    # a database that changed since (more records) is not judged by the old figures
    with open(db / "records.jsonl", "a") as f:
        f.write("\n")
    assert last_measured(relax_mod, layout, open_database(db, resolve("x86"))) is None


def test_tune_measures_the_model_and_compile_finds_its_figures(tuned, tmp_path, capsys) -> None:  # noqa: ANN001
    """A real run: tune times the model in paired rounds, prints the check, and compile
    of the same model reads the same figures from the database."""
    model, src = tuned
    db = tmp_path / "db"
    shutil.copytree(src, db)
    report = tune(model, "x86", db, per_task=2, batch_size=2, space="graphopt")
    lat = report.latency
    # how many records are applied is the machine's call: the rerun re-measures each
    # record beside its default (5% rule), then inside the model; none may pass (one CI
    # run: 0 applied, 0 dropped). The figures are kept and found either way.
    assert lat.rounds >= 5 and lat.tuned_kernels >= 0 and lat.dropped_in_model >= 0
    assert lat.tuned_vs_default > 0 and lat.onnxruntime_ms > 0
    assert 0.5 < lat.default_aa < 2  # the default's two VMs, timed in the same rounds
    # the records it applied are named, for a later failing check to fall back to
    assert bool(lat.selection) == bool(lat.tuned_kernels)
    kept = last_measured(*_lowered(onnx.load(model)), open_database(db, resolve("x86")))
    assert kept.selection == lat.selection
    if lat.tuned_kernels:
        assert "whole-model check: tuned/default" in format_report(report)
    out = tmp_path / "a.so"
    assert main(["compile", str(model), "-o", str(out), "--tuning-db", str(db)]) == 0
    tuning = read_manifest(out)["tuning"]
    assert tuning["whole_model"]["tuned_vs_default"] == round(lat.tuned_vs_default, 4)
    # the records tune applied, unless the model measured slower with them
    assert len(tuning["from_database"]) == (0 if lat.keeps_default else lat.tuned_kernels)
    if lat.keeps_default:
        assert "default schedules kept" in capsys.readouterr().err


def test_kernels_are_timed_inside_the_model(tuned) -> None:  # noqa: ANN001
    """The VM's instrument hook times each named kernel per call inside whole runs, for
    each build; a name the model does not call gets no figure."""
    import tvm

    from graphopt.targets import build
    from graphopt.tuning._latency import _inputs, kernel_times_in_model

    model, _ = tuned
    relax_mod, layout = _lowered(onnx.load(model))
    lib = build(relax_mod, resolve("x86"), layout).jit()
    arrays = list(_inputs(relax_mod).values())
    kernels = {"fused_conv2d_nchwc_relu", "no_such_kernel"}
    times = kernel_times_in_model({"a": lib, "b": lib}, tvm.cpu(), arrays, kernels, rounds=3)
    for per in times.values():
        assert set(per) == {"fused_conv2d_nchwc_relu"}
        assert 0 < per["fused_conv2d_nchwc_relu"] < 0.1


@pytest.fixture
def losing_inside(tuned, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """A copy of the tuned database, with every record timed inside the model twice as
    slow as its default (``kernel_times_in_model`` replaced): (model, database)."""
    from graphopt.tuning import _latency

    model, src = tuned
    db = tmp_path / "db"
    shutil.copytree(src, db)

    def slower_inside(libs, _device, _arrays, kernels, *_args):  # noqa: ANN001, ANN202
        return {"default": dict.fromkeys(kernels, 1e-4), "tuned": dict.fromkeys(kernels, 2e-4)}

    monkeypatch.setattr(_latency, "kernel_times_in_model", slower_inside)
    return model, db


def test_records_that_lose_inside_the_model_are_dropped(losing_inside) -> None:  # noqa: ANN001
    """A record that beat its default alone but not inside the model run is dropped:
    its in-model times go to the database (``ctx``), the tuned model is built without
    it, and compile judges it by those times from then on."""
    from graphopt.tuning import _latency

    model, db = losing_inside
    relax_mod, layout = _lowered(onnx.load(model))
    with open_database(db, resolve("x86")) as database:
        lat = _latency.measure_model(relax_mod, resolve("x86"), layout, database, None)
    assert lat.dropped_in_model >= 1 and lat.tuned_kernels == 0
    text = format_report(TuneReport(tasks=[], db=str(db), latency=lat, timing=_NO_TIMING))
    assert "record(s) not 1.05x faster there" in text
    ctx = [x for x in (db / "records.jsonl").read_text().splitlines() if '"t":"ctx"' in x]
    assert len(ctx) == lat.dropped_in_model
    entry = next(e for e in open_database(db, resolve("x86")).entries() if e.in_model)
    assert entry.confirmed() == (1e-4, 2e-4)  # judged by the in-model times now
    out = db.parent / "a.so"
    assert main(["compile", str(model), "-o", str(out), "--tuning-db", str(db)]) == 0
    assert read_manifest(out)["tuning"]["from_database"] == {}


def test_every_record_is_timed_again_once_another_was_dropped(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A record that won inside the model beside a record dropped since is timed again
    in the build without it, and dropped if it loses there (a kernel's in-model time
    depends on its neighbours'): the kept build is the one last timed. Scripted times:
    in the first turn one kernel loses, in every later turn every kernel does."""
    from graphopt.tuning import _latency

    model = tmp_path / "two.onnx"
    onnx.save(conv_relu(extra_conv=True), model)
    db = tmp_path / "db"
    tune(model, "x86", db, per_task=2, batch_size=2, space="graphopt", measure_model=False)
    slow_defaults(db)
    turns: list[set[str]] = []

    def scripted(libs, _device, _arrays, kernels, *_args):  # noqa: ANN001, ANN202
        turns.append(set(kernels))
        first = min(kernels) if len(turns) == 1 else None
        tuned = {k: (5e-5 if k != first and len(turns) == 1 else 2e-4) for k in kernels}
        return {"default": dict.fromkeys(kernels, 1e-4), "tuned": tuned}

    monkeypatch.setattr(_latency, "kernel_times_in_model", scripted)
    relax_mod, layout = _lowered(onnx.load(model))
    with open_database(db, resolve("x86")) as database:
        lat = _latency.measure_model(relax_mod, resolve("x86"), layout, database, None)
    assert len(turns[0]) >= 2, "the model should apply two records"
    assert turns[1] == turns[0] - {min(turns[0])}  # the winners, timed again
    assert lat.tuned_kernels == 0 and lat.dropped_in_model == len(turns[0])


def test_report_shows_what_compile_uses_never_a_slowdown() -> None:
    """The table's last figure is what compile runs: a record that is slower than its
    default, or not MIN_SPEEDUP faster, reads "default"; only a winner reads "record".
    The model estimate after tuning adds up those, not the slower records."""

    def task(name: str, default_us: float, best_us: float) -> TaskResult:
        return TaskResult(name, 1e6, 1, 8, 8, 8, 0, default_us * 1e-6, best_us * 1e-6, "tuned")

    tasks = [task("slower", 592.2, 2222.3), task("faster", 1648.6, 1194.5), task("tie", 100, 97)]
    text = format_report(TuneReport(tasks=tasks, db="db", timing=_NO_TIMING))
    rows = {line.split()[0]: line for line in text.splitlines() if line.split()}
    assert rows["slower"].split()[-2:] == ["default", "tuned"]
    assert "2222.3" in rows["slower"]  # the search's best is still shown
    assert "record 1.38x" in rows["faster"]
    assert rows["tie"].split()[-2:] == ["default", "tuned"]
    after = next(x for x in text.splitlines() if x.startswith("model latency after"))
    assert f"estimated {(592.2 + 1194.5 + 100) / 1e3:.3f} ms" in after


def test_the_report_judges_dropped_records_by_their_times_in_the_model(
    losing_inside, monkeypatch
) -> None:  # noqa: ANN001
    """A record dropped inside the model reads "default" in the report's table (as compile
    builds it), and the estimate after tuning counts its default time, not the record's."""
    from graphopt.tuning import _session

    model, db = losing_inside
    # the side-by-side check would judge the slowed defaults by real times: skipped
    monkeypatch.setattr(_session.Session, "confirm", lambda _self: None)
    report = tune(model, "x86", db, per_task=2, batch_size=2, space="graphopt")
    assert report.latency.dropped_in_model >= 1
    for row in report.tasks:
        if row.tuned_secs == 2e-4:  # dropped: its in-model times judge it now
            assert row.default_secs == 1e-4
    text = format_report(report)
    assert "record(s) not 1.05x faster there" in text
    assert "  record " not in text  # no row says compile uses a record


def _faster_record(db, factor: float = 0.5) -> None:  # noqa: ANN001 - the database folder
    """Append, for each kernel, a copy of its best record measured ``factor`` times its
    time: a longer search's new best."""
    path = db / "records.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    best = {}
    for line in lines:
        if line["t"] == "rec" and line["ok"]:
            secs = sum(line["r"][1]) / len(line["r"][1])
            if line["w"] not in best or secs < best[line["w"]][0]:
                best[line["w"]] = (secs, line)
    with open(path, "a") as f:
        for _, line in best.values():
            copy = json.loads(json.dumps(line))
            copy["r"][1] = [s * factor for s in copy["r"][1]]
            f.write(json.dumps(copy) + "\n")


def _check(ratio: float, selection: dict | None) -> ModelLatency:
    return ModelLatency(
        default_ms=1.0,
        tuned_ms=ratio,
        tuned_kernels=len(selection or {1: 0}),
        tuned_vs_default=ratio,
        rounds=7,
        selection=selection,
    )


def test_a_longer_search_never_undoes_a_passing_check(tuned, tmp_path, capsys) -> None:  # noqa: ANN001
    """A check that passed (tuned/default 0.9) names the records it timed; the search
    goes on and finds records faster alone, and the check of the grown database fails
    (1.0). compile applies the records of the check that passed, as they were timed,
    not the new bests and not only defaults; the manifest and the log say so."""
    model, src = tuned
    db = tmp_path / "db"
    shutil.copytree(src, db)
    relax_mod, layout = _lowered(onnx.load(model))
    spec = resolve("x86")
    database = open_database(db, spec)
    selection = {e.key: e.best_secs for e in database.entries() if e.best is not None}
    assert selection
    remember(relax_mod, layout, database, _check(0.9, selection))
    _faster_record(db)
    database = open_database(db, spec)
    for e in database.entries():
        if e.key in selection:
            assert e.best_secs == pytest.approx(selection[e.key] * 0.5)  # a new best
    assert last_measured(relax_mod, layout, database) is None  # grown: not checked yet
    remember(relax_mod, layout, database, _check(1.0, {k: v * 0.5 for k, v in selection.items()}))
    earlier = last_passing(relax_mod, layout, database)
    assert earlier is not None and earlier.selection == selection
    out = tmp_path / "a.so"
    assert main(["compile", str(model), "-o", str(out), "--tuning-db", str(db)]) == 0
    tuning = read_manifest(out)["tuning"]
    assert tuning["whole_model"]["applied"] is False
    assert tuning["whole_model"]["tuned_vs_default"] == 1.0
    assert tuning["whole_model"]["earlier"]["tuned_vs_default"] == 0.9
    used = {info["tuned_us"] for info in tuning["from_database"].values()}
    assert used == {round(s * 1e6, 3) for s in selection.values()}  # the timed records
    assert "record(s) of its last passing check instead" in capsys.readouterr().err
    # the report of a tune that ends so says what compile uses
    lat = _check(1.0, selection)
    lat.earlier = earlier
    text = format_report(TuneReport(tasks=[], db=str(db), latency=lat, timing=_NO_TIMING))
    assert f"compile uses the {len(selection)} record(s) of the last check that passed" in text


def test_no_fallback_to_records_the_database_no_longer_has(tuned, tmp_path, capsys) -> None:  # noqa: ANN001
    """A passing check whose records are not all in the database (a selection naming a
    time no record measured) is not the set that was timed: the defaults stay."""
    model, src = tuned
    db = tmp_path / "db"
    shutil.copytree(src, db)
    relax_mod, layout = _lowered(onnx.load(model))
    database = open_database(db, resolve("x86"))
    selection = {e.key: 123.0 for e in database.entries() if e.best is not None}
    remember(relax_mod, layout, database, _check(0.9, selection))
    _faster_record(db)
    database = open_database(db, resolve("x86"))
    remember(relax_mod, layout, database, _check(1.0, selection))
    assert last_passing(relax_mod, layout, database) is None
    out = tmp_path / "a.so"
    assert main(["compile", str(model), "-o", str(out), "--tuning-db", str(db)]) == 0
    assert read_manifest(out)["tuning"]["from_database"] == {}
    assert "default schedules kept" in capsys.readouterr().err


def _ctx(db, key: str, default: float, best: float, at: float) -> None:  # noqa: ANN001
    line = {"t": "ctx", "w": key, "default": default, "best": best, "at": at}
    with open(db / "records.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def test_a_kernel_whose_new_best_loses_inside_the_model_keeps_the_record_that_won(
    tuned, tmp_path
) -> None:  # noqa: ANN001
    """A record won inside the model (50 us against the default's 100); the search went
    on and its new best (faster alone) lost there (200 us). The kernel gets the record
    that won, not its default; once that one loses inside a model too, the default."""
    model, src = tuned
    db = tmp_path / "db"
    shutil.copytree(src, db)
    spec = resolve("x86")
    first = {e.key: e.best_secs for e in open_database(db, spec).entries() if e.best is not None}
    for key, secs in first.items():
        _ctx(db, key, 1e-4, 5e-5, secs)
    _faster_record(db)
    newer = {e.key: e.best_secs for e in open_database(db, spec).entries() if e.best is not None}
    for key, secs in newer.items():
        assert secs < first[key]
        _ctx(db, key, 1e-4, 2e-4, secs)
    for e in open_database(db, spec).entries():
        if e.key in first:
            assert e.confirmed() == (1e-4, 2e-4)  # the best loses ...
            record, at, *judged = e.choice()  # ... and the record that won is applied
            assert at == first[e.key] and record is e.record_at(at) and judged == [1e-4, 5e-5]
            assert e.judged() == (1e-4, 5e-5)  # what the report's rows say compile uses
    out = tmp_path / "a.so"
    assert main(["compile", str(model), "-o", str(out), "--tuning-db", str(db)]) == 0
    used = read_manifest(out)["tuning"]["from_database"]
    assert used and {info["tuned_us"] for info in used.values()} == {50.0}
    # the record that won, timed again inside a model, loses there: the default now
    for key, secs in first.items():
        _ctx(db, key, 1e-4, 2e-4, secs)
    assert all(e.choice() is None for e in open_database(db, spec).entries() if e.key in first)
    assert main(["compile", str(model), "-o", str(out), "--tuning-db", str(db)]) == 0
    assert read_manifest(out)["tuning"]["from_database"] == {}
