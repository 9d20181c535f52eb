"""`graphopt tune` and `compile --tuning-db`, driven as a user would (default tier).

One small model is tuned once per session (2 trials per kernel); the tests then resume
it, compile with it, tune a second model sharing its conv, and check the refusals.
"""

from __future__ import annotations

import json
import platform
import shutil

import cloudpickle
import onnx
import pytest

from graphopt.artifact import read_manifest
from graphopt.cli import main
from graphopt.targets import resolve
from graphopt.tuning import TuningDatabase, tune
from tests.tuning import _faults
from tests.tuning._models import conv_relu, slow_defaults


@pytest.fixture(scope="module")
def models(tmp_path_factory):  # noqa: ANN001, ANN201
    folder = tmp_path_factory.mktemp("models")
    a, b = folder / "a.onnx", folder / "b.onnx"
    onnx.save(conv_relu(), a)
    onnx.save(conv_relu(extra_conv=True), b)
    return a, b


@pytest.fixture(scope="module")
def tuned(models, tmp_path_factory):  # noqa: ANN001, ANN201
    db = tmp_path_factory.mktemp("tuned") / "db"
    argv = ["tune", str(models[0]), "--db", str(db), "--per-task", "2", "--batch", "2"]
    assert main(argv) == 0
    return db


def _records(db) -> list[dict]:  # noqa: ANN001
    return [json.loads(line) for line in (db / "records.jsonl").read_text().splitlines()]


def test_tune_prints_table_and_progress(tuned, models, capsys) -> None:
    recs = _records(tuned)
    assert {r["t"] for r in recs} >= {"wl", "rec", "base"}
    assert sum(r["t"] == "rec" for r in recs) >= 3  # conv 2 + small kernels >= 1 each
    # resume: every task is at its budget, nothing is re-measured
    before = (tuned / "records.jsonl").read_bytes()
    argv = ["tune", str(models[0]), "--db", str(tuned), "--per-task", "2", "--batch", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "default us" in out and "best us" in out and "compile uses" in out
    assert "fused_conv2d_nchwc_relu" in out and "0 new trial(s)" in out
    assert (tuned / "records.jsonl").read_bytes() == before


def test_compile_with_db_uses_records_and_verifies(tuned, models, tmp_path, capsys) -> None:
    db = tmp_path / "db"
    shutil.copytree(tuned, db)
    slow_defaults(db)
    out = tmp_path / "a.so"
    assert main(["compile", str(models[0]), "-o", str(out), "--tuning-db", str(db)]) == 0
    manifest = read_manifest(out)
    assert manifest["verification"]["ok"]
    tuning = manifest["tuning"]
    assert "fused_conv2d_nchwc_relu" in tuning["from_database"]
    assert tuning["from_database"]["fused_conv2d_nchwc_relu"]["trials"] == 2
    assert "tuning db:" in capsys.readouterr().out
    # without a database nothing is claimed
    plain = tmp_path / "plain.so"
    assert main(["compile", str(models[0]), "-o", str(plain), "--no-verify"]) == 0
    assert read_manifest(plain)["tuning"] is None


def test_second_model_reuses_shared_workload(tuned, models, tmp_path, capsys) -> None:
    db = tmp_path / "db"
    shutil.copytree(tuned, db)
    shared = {r["w"]: r["name"] for r in _records(db) if r["t"] == "wl"}
    before = _records(db)
    argv = ["tune", str(models[1]), "--db", str(db), "--per-task", "2", "--batch", "2"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    progress = [line for line in captured.err.splitlines() if line.startswith("tasks ")]
    assert progress and "trials" in progress[-1] and "best" in progress[-1]
    assert "left" in progress[-1]
    row = next(line for line in out.splitlines() if line.startswith("fused_conv2d_nchwc_relu"))
    assert "skipped (budget reached)" in row
    new = [r for r in _records(db)[len(before) :] if r["t"] == "rec"]
    assert new  # the new conv was tuned ...
    assert not [r for r in new if r["w"] in shared]  # ... and nothing shared was re-tuned
    slow_defaults(db)
    out_so = tmp_path / "b.so"
    assert main(["compile", str(models[1]), "-o", str(out_so), "--tuning-db", str(db)]) == 0
    hits = read_manifest(out_so)["tuning"]["from_database"]
    assert any(v["workload"] == "fused_conv2d_nchwc_relu" for v in hits.values())


def test_each_layout_tunes_and_uses_its_own_kernels(tuned, models, tmp_path, capsys) -> None:
    """``tune --layout nhwc`` extracts the kernels ``compile --layout nhwc`` builds: the
    database then serves both layouts, each compile finding its own layout's records."""
    db = tmp_path / "db"
    shutil.copytree(tuned, db)
    argv = ["tune", str(models[0]), "--db", str(db), "--layout", "nhwc", "--per-task", "1"]
    assert main([*argv, "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "fused_conv2d_nhwc_relu" in out and "layout nhwc" in out
    slow_defaults(db)
    for layout, kernel in (
        ("nhwc", "fused_conv2d_nhwc_relu"),
        ("nchwc", "fused_conv2d_nchwc_relu"),
    ):
        so = tmp_path / f"{layout}.so"
        argv = ["compile", str(models[0]), "-o", str(so), "--tuning-db", str(db)]
        assert main([*argv, "--layout", layout]) == 0
        manifest = read_manifest(so)
        assert manifest["verification"]["ok"] and manifest["target"]["layout"] == layout
        assert kernel in manifest["tuning"]["from_database"]


def test_crashing_and_hanging_candidates_are_failures(models, tmp_path, monkeypatch) -> None:
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner

    cloudpickle.register_pickle_by_value(_faults)
    # not GRAPHOPT_*: only this test's runner reads them, and a change of graphopt's own
    # variables would restart the build workers tuning keeps (_measure._kept) twice
    monkeypatch.setenv("TUNING_TEST_FAULT_COUNTER", str(tmp_path / "calls"))
    # the first 3 calls measure the default schedules, the 4th the conv's default again
    # (beside its first candidates); then one crash, one hang
    monkeypatch.setenv("TUNING_TEST_CRASH_AT", "5")
    monkeypatch.setenv("TUNING_TEST_HANG_AT", "6")
    runner = LocalRunner(
        timeout_sec=3,
        evaluator_config=EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0),
        f_run_evaluator=_faults.faulty_run_evaluator,
    )
    report = tune(models[0], "x86", tmp_path / "db", per_task=3, batch_size=3, runner=runner)
    assert not report.interrupted
    assert sum(t.failed for t in report.tasks) == 2
    conv = next(t for t in report.tasks if t.name == "fused_conv2d_nchwc_relu")
    assert conv.trials == 3 and conv.tuned_secs is not None
    with TuningDatabase(tmp_path / "db", resolve("x86")) as db:  # the failures are on disk
        assert sum(e.failed for e in db.entries()) == 2


def test_a_second_run_in_the_process_reuses_its_worker_processes(
    models, tmp_path, monkeypatch
) -> None:
    """The builders and runners (one TVM import each, ~4 s) are kept for the next run;
    another environment for the workers, an exception or release_workers ends them, and
    a run in another thread has its own."""
    import threading

    from graphopt.tuning import _measure, _session

    def pools() -> dict:
        return {slot: getattr(held, "pool", held) for slot, (_, held) in _measure._KEPT.items()}

    def run(db: str) -> None:
        tune(models[0], "x86", tmp_path / db, per_task=1, batch_size=1, measure_model=False)

    run("a")
    first = pools()
    me = threading.get_ident()
    assert {(me, "build"), (me, "run-1x5"), (me, "run-1x9")} <= set(first)
    run("b")
    assert pools() == first  # the same pools: no worker process started

    # stand-ins under the real ones' keys, so that the real workers outlive this test
    stopped = []

    class Pool:
        def shutdown(self, wait: bool) -> None:
            stopped.append(self)

    stand_ins = {slot: (key, Pool()) for slot, (key, _) in _measure._KEPT.items()}
    done = threading.Event()
    busy = threading.Thread(target=done.wait, daemon=True)  # a run holding its pools
    busy.start()
    other = {(busy.ident, "build"): (("a run in another thread",), Pool())}
    monkeypatch.setattr(_measure, "_KEPT", {**stand_ins, **other})

    def broken(_self) -> None:
        raise RuntimeError("a bug in the search")

    monkeypatch.setattr(_session.Session, "baselines", broken)
    with pytest.raises(RuntimeError, match="a bug in the search"):
        run("c")
    # the run took its kept pools, and stopped them: a worker might hold an unread result;
    # another thread's stay
    assert _measure._KEPT == other and {id(p) for p in stopped} == {
        id(held) for _, held in stand_ins.values()
    }
    del stopped[:]

    settings = ("same settings",)
    kept = _measure._kept("kind", settings, Pool)
    assert _measure._kept("kind", settings, Pool) is kept and not stopped
    in_thread = []
    worker = threading.Thread(
        target=lambda: in_thread.append(_measure._kept("kind", settings, Pool))
    )
    worker.start()
    worker.join()
    assert in_thread[0] is not kept and not stopped
    assert _measure._kept("kind", settings, Pool) is kept  # and the ended thread's are gone
    assert stopped == [in_thread[0]] and len(_measure._KEPT) == 2
    del stopped[:]
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # the workers would inherit another pool size
    again = _measure._kept("kind", settings, Pool)
    assert again is not kept and stopped == [kept]
    _measure.release_workers()
    everyone_else = [*(held for _, held in other.values()), again]
    assert _measure._KEPT == {} and sorted(map(id, stopped[1:])) == sorted(map(id, everyone_else))
    done.set()
    busy.join()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "0"], "--trials must be at least 1"),
        (["--per-task", "-3"], "--per-task must be at least 1"),
        (["--time-budget=-5m"], "--time-budget must be positive"),
        (["--time-budget", "0"], "--time-budget must be positive"),
        (["--rpc-tracker", "127.0.0.1:9"], "--rpc-tracker and --rpc-key go together"),
        (["--rpc-tracker", "127.0.0.1:1", "--rpc-key", "x"], "cannot reach the RPC tracker"),
        (["--tasks", "no_such_kernel*"], "no kernel matches"),
    ],
)
def test_bad_options_are_one_line_errors(models, tmp_path, capsys, args, message) -> None:
    assert main(["tune", str(models[0]), "--db", str(tmp_path / "db"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="needs a non-ARM host")
def test_arm_needs_a_tracker_on_x86(models, tmp_path, capsys) -> None:
    assert main(["tune", str(models[0]), "--db", str(tmp_path / "db"), "--target", "arm"]) == 2
    assert "--rpc-tracker" in capsys.readouterr().err


def test_foreign_or_corrupt_db_is_refused(tuned, models, tmp_path, capsys) -> None:
    db = tmp_path / "db"
    shutil.copytree(tuned, db)
    argv = ["compile", str(models[0]), "--cpu", "x86-64-v2", "--tuning-db", str(db)]
    assert main([*argv, "-o", str(tmp_path / "x.so")]) == 2
    assert "was tuned for x86" in capsys.readouterr().err
    assert main(["tune", str(models[0]), "--db", str(db), "--cpu", "x86-64-v2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: tuning database")
    lines = (db / "records.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    (db / "records.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "y.so"
    assert main(["compile", str(models[0]), "--tuning-db", str(db), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt at line 2" in err[0] and not out.exists()


def test_budgets_add_up_to_the_requested_trials_and_leave_no_task_out():
    from types import SimpleNamespace

    from graphopt.tuning._options import TuneOptions

    tasks = [SimpleNamespace(weight=w) for w in (18.9, 9.5, 4.7, 1.8, 1.0, 0.1, 0.0, 0.0)]
    shares = TuneOptions(trials=24).budgets(tasks)
    assert sum(shares) == 24 and min(shares) >= 1
    assert shares == sorted(shares, reverse=True)  # heavier tasks never get fewer
    assert TuneOptions(trials=3).budgets(tasks) == [1] * len(tasks)  # fewer trials than tasks
    assert max(TuneOptions(trials=1000, per_task=50).budgets(tasks)) == 50  # --per-task caps
