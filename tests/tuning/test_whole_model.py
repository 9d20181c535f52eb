"""The whole-model check: ``tune`` times the model with and without its database in
paired rounds and keeps the figures; ``compile`` keeps the default schedules for a model
that measured slower with the database (never slower than the default, end to end)."""

from __future__ import annotations

import shutil
import time

import onnx
import pytest

from graphopt.artifact import read_manifest
from graphopt.cli import main
from graphopt.targets import check_layout, resolve
from graphopt.tuning import ModelLatency, format_report, last_measured, open_database, tune
from graphopt.tuning._latency import paired_rounds, remember
from graphopt.tuning._tuner import _lower
from tests.tuning._models import conv_relu, slow_defaults


def test_paired_rounds_take_turns_and_pair_each_round() -> None:
    """Each call gets one figure per round, and the paired ratios tell a call twice as slow."""
    order: list[str] = []

    def sleeper(name: str, secs: float):  # noqa: ANN202
        def call() -> None:
            order.append(name)
            time.sleep(secs)

        return call

    figures = paired_rounds(
        {"a": sleeper("a", 0.002), "b": sleeper("b", 0.004)}, rounds=4, block=0.01
    )
    assert len(figures["a"]) == len(figures["b"]) == 4
    ratios = sorted(b / a for a, b in zip(figures["a"], figures["b"], strict=True))
    assert 1.5 < ratios[len(ratios) // 2] < 2.5
    # after 4 warm-up calls each, the order rotates: a b | b a | a b | b a
    assert order[8] == "a" and order[-1] == "a"


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


@pytest.mark.parametrize("ratio", [1.2, 0.8])
def test_compile_keeps_defaults_for_a_model_measured_slower(tuned, tmp_path, capsys, ratio) -> None:  # noqa: ANN001
    """The figures ``tune`` keeps for this model decide: slower with the database, and
    no record is applied (the manifest and the log say why); faster, and they are."""
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
    assert tuning["whole_model"]["applied"] is (ratio < 1)
    assert bool(tuning["from_database"]) is (ratio < 1)
    assert ("default schedules kept" in capsys.readouterr().err) is (ratio > 1)
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
    assert lat.tuned_kernels >= 1 and lat.rounds >= 5
    assert lat.tuned_vs_default > 0 and lat.onnxruntime_ms > 0
    assert "whole-model check: tuned/default" in format_report(report)
    out = tmp_path / "a.so"
    assert main(["compile", str(model), "-o", str(out), "--tuning-db", str(db)]) == 0
    tuning = read_manifest(out)["tuning"]
    assert tuning["whole_model"]["tuned_vs_default"] == round(lat.tuned_vs_default, 4)
    assert bool(tuning["from_database"]) is not lat.keeps_default
    if lat.keeps_default:
        assert "default schedules kept" in capsys.readouterr().err
