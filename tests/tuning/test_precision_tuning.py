"""``tune(..., precision="bf16")`` (issue #17): the tasks are the bf16 build's kernels, the
database records its precision, refuses another one, and a bf16 compile applies it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import graphopt
from graphopt.artifact import read_manifest
from graphopt.errors import GraphoptError
from graphopt.targets import resolve
from graphopt.tuning import open_database, tune
from graphopt.tuning._database import TuningDatabaseError
from graphopt.tuning._options import TuningError
from tests.tuning._models import conv_relu, slow_defaults

HOST_BF16 = Path("/proc/cpuinfo").exists() and "avx512_bf16" in Path("/proc/cpuinfo").read_text()
needs_host_bf16 = pytest.mark.skipif(
    not HOST_BF16, reason="needs a CPU with avx512_bf16 (/proc/cpuinfo) to run bf16 kernels"
)


@pytest.fixture(scope="module")
def bf16_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("bf16") / "db"
    # one small task (the casts into bf16) keeps this fast; the conv is not a task anyway
    report = tune(
        conv_relu(),
        "x86",
        db,
        per_task=1,
        batch_size=1,
        tasks="fused_cast*",
        precision="bf16",
        measure_model=False,
    )
    return db, report


@needs_host_bf16
def test_bf16_tune_records_its_precision_and_leaves_the_bf16_rule_alone(bf16_db) -> None:
    db, _ = bf16_db
    assert json.loads((db / "meta.json").read_text())["precision"] == "bf16"
    names = [e.name for e in open_database(db, resolve("x86"), "bf16").entries()]
    assert names  # the casts around the conv are tuned
    assert not any("bf16" in n for n in names)  # the vdpbf16ps conv keeps its rule


@needs_host_bf16
def test_bf16_db_is_refused_at_fp32_and_fp32_db_at_bf16(bf16_db, tmp_path) -> None:
    db, _ = bf16_db
    with pytest.raises(TuningDatabaseError, match="precision bf16, not fp32"):
        open_database(db, resolve("x86"), "fp32")
    with pytest.raises(TuningDatabaseError, match="precision bf16, not fp32"):
        tune(conv_relu(), "x86", db, per_task=1, measure_model=False)
    # a compile that does not say its precision: no bf16 record matches an fp32 kernel
    try:
        graphopt.compile(conv_relu(), output=tmp_path / "a.so", tuning_db=db, verify=False)
    except GraphoptError as exc:
        assert "precision" in str(exc)
    else:
        manifest = read_manifest(tmp_path / "a.so")
        assert manifest["tuning"]["from_database"] == {}


@needs_host_bf16
def test_bf16_compile_applies_the_bf16_db_and_verifies(bf16_db, tmp_path) -> None:
    db, _ = bf16_db
    slow_defaults(db)  # each tuned kernel wins deterministically
    out = tmp_path / "b.so"
    graphopt.compile(conv_relu(), output=out, tuning_db=db, precision="bf16")
    manifest = read_manifest(out)
    assert manifest["verification"]["ok"]
    names = {e.name for e in open_database(db, resolve("x86")).entries()}
    assert set(manifest["tuning"]["from_database"]) == names


def test_unknown_precision_is_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(TuningError, match="unknown precision 'fp8'"):
        tune(conv_relu(), "x86", tmp_path / "db", per_task=1, precision="fp8")
    assert not (tmp_path / "db").exists()
