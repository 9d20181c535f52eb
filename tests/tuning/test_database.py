"""The tuning database on its own: torn writes, corruption, foreign targets."""

from __future__ import annotations

import json

import pytest
import tvm
from tvm import s_tir, te

from graphopt.targets import TargetSpec, resolve
from graphopt.tuning import TuningDatabase, TuningDatabaseError, open_database
from graphopt.tuning._database import workload_mod


def _kernel(n: int = 16):  # noqa: ANN202
    a = te.placeholder((n, n), name="a")
    b = te.compute((n, n), lambda i, j: a[i, j] * 2.0, name="b")
    return workload_mod(te.create_prim_func([a, b]))


@pytest.fixture
def spec() -> TargetSpec:
    return resolve("x86", cpu="x86-64-v3")


def test_round_trip_and_torn_last_line(tmp_path, spec) -> None:
    with TuningDatabase(tmp_path / "db", spec) as db:
        entry = db.add_workload(_kernel(), "double", 256.0)
        db.set_baseline(entry, 2e-6)
    records = tmp_path / "db" / "records.jsonl"
    size = records.stat().st_size
    with open(records, "ab") as f:  # what a kill -9 inside write() could leave
        f.write(b'{"t":"rec","w":"w0","ok":tr')
    with TuningDatabase(tmp_path / "db", spec) as db:
        (entry,) = db.entries()
        assert entry.name == "double" and entry.baseline_secs == 2e-6 and entry.trials == 0
        assert db.find(_kernel()) is entry and db.find(_kernel(8)) is None
        db.mark_exhausted(entry)  # the next append first cuts the torn line off
    assert records.read_bytes().count(b"\n") == 3
    assert records.stat().st_size > size
    with TuningDatabase(tmp_path / "db", spec) as db:
        assert db.entries()[0].exhausted


def test_a_record_whose_trace_transforms_a_layout_is_written_and_read_back(tmp_path, spec) -> None:
    """TVM 0.27's ``TuningRecord.as_json`` cannot write an index map, the input of a
    trace's ``transform_layout`` (which the schedules of 1x1 convs tiled over flat
    pixels hold): the database writes it as text that ``from_json`` reads back, and the
    trace read back builds the same kernel."""
    a = te.placeholder((16, 16), name="a")
    b = te.compute((16, 16), lambda i, j: a[i, j] * 2.0, name="b")
    c = te.compute((16, 16), lambda i, j: b[i, j] + 1.0, name="c")
    mod = workload_mod(te.create_prim_func([a, c]))
    sch = s_tir.Schedule(mod)
    sch.transform_layout(sch.get_sblock("b"), ("write", 0), lambda i, j: (i * 16 + j,))
    with TuningDatabase(tmp_path / "db", spec) as db:
        entry = db.add_workload(mod, "flat", 512.0)
        db.add_results(entry, [(sch.trace, [1e-6], [], None)])
    with TuningDatabase(tmp_path / "db", spec) as db:
        (entry,) = db.entries()
        assert entry.trials == 1 and entry.best is not None
        again = s_tir.Schedule(mod)
        entry.best.trace.apply_to_schedule(again, remove_postproc=False)
    tvm.ir.assert_structural_equal(again.mod, sch.mod)
    assert "T.sblock_alloc_buffer((256,))" in again.mod.script()  # b is flat


def test_corrupt_line_is_refused(tmp_path, spec) -> None:
    with TuningDatabase(tmp_path / "db", spec) as db:
        db.set_baseline(db.add_workload(_kernel(), "double", 256.0), 2e-6)
    records = tmp_path / "db" / "records.jsonl"
    lines = records.read_text().splitlines()
    records.write_text("\n".join([lines[0], "garbage{", lines[1]]) + "\n")
    with pytest.raises(TuningDatabaseError, match="corrupt at line 2"):
        TuningDatabase(tmp_path / "db", spec)


def test_other_target_is_refused(tmp_path, spec) -> None:
    TuningDatabase(tmp_path / "db", spec).close()
    other = resolve("x86", cpu="skylake-avx512")
    with pytest.raises(TuningDatabaseError, match="was tuned for x86"):
        open_database(tmp_path / "db", other)
    arm = resolve("arm")
    with pytest.raises(TuningDatabaseError, match="use a database per target"):
        open_database(tmp_path / "db", arm)


def test_not_a_database(tmp_path, spec) -> None:
    with pytest.raises(TuningDatabaseError, match="not a tuning database"):
        open_database(tmp_path / "nothing", spec)
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "records.jsonl").write_text("{}\n")
    with pytest.raises(TuningDatabaseError, match="no meta.json"):
        TuningDatabase(tmp_path / "db", spec)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(TuningDatabaseError, match="unreadable meta.json"):
        open_database(tmp_path / "bad", spec)
