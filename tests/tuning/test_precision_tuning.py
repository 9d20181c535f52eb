"""``tune(..., precision="bf16")`` (issue #17): the tasks are the bf16 build's kernels (the
vdpbf16ps conv among them, searched in graphopt's space: ``test_bf16_space.py``), the
database records its precision, refuses another one, and a bf16 compile applies it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.artifact import read_manifest
from graphopt.errors import GraphoptError
from graphopt.targets import resolve
from graphopt.tuning import open_database, tune
from graphopt.tuning._database import TuningDatabaseError
from graphopt.tuning._options import TuningError
from tests._system import needs_host_bf16
from tests.conftest import make_model
from tests.tuning._models import conv_relu, slow_defaults


def conv16_relu():  # noqa: ANN201
    """x(1,16,8,8) -> Conv(16->16, 3x3) -> Relu: a conv the vdpbf16ps rule takes (a
    16-channel output block)."""
    w = np.random.default_rng(1).standard_normal((16, 16, 3, 3)).astype(np.float32) / 12
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return make_model(nodes, {"x": (1, 16, 8, 8)}, {"y": (1, 16, 8, 8)}, {"w": w})


@pytest.fixture(scope="module")
def bf16_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("bf16") / "db"
    # two small tasks keep this fast: the casts into bf16 and the vdpbf16ps conv
    report = tune(
        conv16_relu(),
        "x86",
        db,
        per_task=1,
        batch_size=1,
        tasks="cast*,fused_cast*,*conv2d_nchwc_bf16*",
        precision="bf16",
        measure_model=False,
    )
    return db, report


@needs_host_bf16
def test_bf16_tune_records_its_precision_and_tunes_the_bf16_conv(bf16_db) -> None:
    db, report = bf16_db
    assert json.loads((db / "meta.json").read_text())["precision"] == "bf16"
    names = [e.name for e in open_database(db, resolve("x86"), "bf16").entries()]
    assert any("cast" in n for n in names)  # the cast into bf16 before the conv
    conv = next(t for t in report.tasks if "conv2d_nchwc_bf16" in t.name)
    assert conv.name in names and conv.trials == 1 and conv.failed == 0  # in graphopt's space


@needs_host_bf16
def test_bf16_db_is_refused_at_fp32_and_fp32_db_at_bf16(bf16_db, tmp_path) -> None:
    db, _ = bf16_db
    with pytest.raises(TuningDatabaseError, match="precision bf16, not fp32"):
        open_database(db, resolve("x86"), "fp32")
    with pytest.raises(TuningDatabaseError, match="precision bf16, not fp32"):
        tune(conv_relu(), "x86", db, per_task=1, measure_model=False)
    # a compile that does not say its precision: no bf16 record matches an fp32 kernel
    try:
        graphopt.compile(conv16_relu(), output=tmp_path / "a.so", tuning_db=db, verify=False)
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
    graphopt.compile(conv16_relu(), output=out, tuning_db=db, precision="bf16")
    manifest = read_manifest(out)
    assert manifest["verification"]["ok"]
    names = {e.name for e in open_database(db, resolve("x86")).entries()}
    assert set(manifest["tuning"]["from_database"]) == names


def test_unknown_precision_is_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(TuningError, match="unknown precision 'fp8'"):
        tune(conv_relu(), "x86", tmp_path / "db", per_task=1, precision="fp8")
    assert not (tmp_path / "db").exists()
