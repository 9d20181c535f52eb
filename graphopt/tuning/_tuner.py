"""``tune``: check the options, lock the database, find the tasks, run a session.

Everything that can be refused (bad options, a target this host cannot run, a database in
use or foreign, an unreachable tracker, no kernels) is refused here, before any search;
the search itself is :class:`~graphopt.tuning._session.Session`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tvm.s_tir.meta_schedule.runner import Runner
from tvm.target import codegen

from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import TargetSpec, _precision, build, check_layout, resolve
from graphopt.tuning._database import TuningDatabase, TuningDatabaseError
from graphopt.tuning._latency import ModelLatency, last_measured, last_passing, remember
from graphopt.tuning._latency import measure_model as time_model
from graphopt.tuning._measure import (
    PersistentBuilder,
    check_tracker,
    local_runner,
    parse_tracker,
    rpc_runner,
)
from graphopt.tuning._options import TuneOptions, TuningError
from graphopt.tuning._report import TuneReport
from graphopt.tuning._session import Clock, Session, Targets, TaskState
from graphopt.tuning._tasks import Task, extract_tasks

__all__ = ["tune"]

_MAX_BUILD_WORKERS = 16  # memory, not cores, bounds this: ~0.5 GB per worker


def tune(
    model,  # noqa: ANN001 - anything graphopt.compile takes
    target: str | dict = "x86",
    db: str | os.PathLike = "tuning",
    *,
    trials: int | None = None,
    per_task: int | None = None,
    time_budget: str | float | None = None,
    tasks: str | None = None,
    input_shapes: dict | list[str] | None = None,
    target_options: dict | None = None,
    layout: str | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    runner: Runner | None = None,  # overrides measuring here or through the tracker
    batch_size: int = 16,
    population: int = 64,
    build_timeout: float = 60.0,
    run_timeout: float = 10.0,
    seed: int = 0,
    space: str = "both",
    patience: int = 64,
    measure_model: bool = True,
    precision: str = "fp32",
    progress: Callable[[dict], None] | None = None,  # called after every batch
    log: Callable[[str], None] | None = None,  # gets status lines
) -> TuneReport:
    """Tune ``model``'s kernels for ``target`` into the database directory ``db``.

    Budgets: ``trials`` in all (shared by each kernel's measured default time x calls,
    at least 1 per task), or ``per_task`` each (with ``trials``: a cap per task), and/or
    ``time_budget`` (seconds or "30m"). Tasks whose database entry already holds their
    budget are skipped; a task stops early once ``patience`` trials in a row gained
    nothing (0: never). ``space``: "graphopt" (the default schedule rules' choices,
    searched from the default), "generic" (MetaSchedule's) or "both". ``measure_model``:
    time the whole model with the default schedules and with the database (and
    onnxruntime) at the end, when measuring on this machine.
    ``layout``: as for ``compile`` (the target's default when None); compile with the same
    layout to use what this tunes. ``precision`` ("bf16"/"fp16"): tune the kernels
    ``compile(..., precision=)`` builds, into a database that records it (and refuses
    another precision); a target without the hardware for it is refused before any work.
    """
    say = log or _silent
    options = TuneOptions(
        trials=trials,
        per_task=per_task,
        time_budget=time_budget,
        batch_size=batch_size,
        population=population,
        build_timeout=build_timeout,
        run_timeout=run_timeout,
        seed=seed,
        space=space,
        patience=patience,
        measure_model=measure_model,
    )
    if (rpc_tracker is None) != (rpc_key is None):
        raise TuningError("--rpc-tracker and --rpc-key go together")
    spec = resolve(target, **(target_options or {}))
    layout = check_layout(spec, layout)
    refused = _precision.refusal(spec.tvm, precision)
    if refused is not None:
        raise TuningError(refused)
    if rpc_tracker is None and runner is None and not _runs_here(spec.tvm):
        raise TuningError(
            f"target {spec.name} ({spec.tvm.get('mtriple')}) does not run on this host: "
            "measure on its devices with --rpc-tracker HOST:PORT --rpc-key KEY"
        )
    clock = Clock.started(options.time_budget)
    db_path = Path(db)
    with _locked(db_path), TuningDatabase(db_path, spec, precision=precision) as database:
        # the tracker is asked first: an unreachable one fails in seconds, not after
        # the model is lowered
        tracker = None
        if rpc_tracker is not None:
            tracker = _Tracker.check(rpc_tracker, rpc_key, say)
        targets = Targets.of(spec, layout)
        source, relax_mod = _lower(model, input_shapes, spec.pass_defaults)
        found = _extract(relax_mod, targets, tasks, precision)
        budgets = options.budgets(found)
        states = [TaskState.start(t, b, database) for t, b in zip(found, budgets, strict=True)]
        builder = _builder(spec, options)
        session = Session(
            options=options,
            targets=targets,
            database=database,
            builder=builder,
            runner=runner if runner is not None else _runner(tracker, options),
            # winners are re-measured with more repeats; a given runner is used as it is
            confirm_runner=_confirm_runner(options) if runner is None and tracker is None else None,
            states=states,
            clock=clock,
            progress=progress,
            say=say,
        )
        local = rpc_tracker is None and runner is None
        timed = options.measure_model and local
        default = None
        if (
            timed
            and clock.deadline is not None
            and last_measured(relax_mod, targets.layout, database) is None
        ):
            # built now, so that the time budget can keep back what the model timing
            # after the search will take: one more build (the tuned one) and the runs.
            # Not for a rerun whose figures are cached: it must rebuild nothing.
            t0 = time.perf_counter()
            default = build(relax_mod, spec, targets.layout, precision=precision)
            # the tuned build, perhaps once more without records that lose in the model
            session.closing_secs = 2.4 * (time.perf_counter() - t0) + _TIMING_SECS
        report = session.run()
        if timed and not report.interrupted:
            report.latency = _model_latency(
                relax_mod, targets, database, source, say, default=default
            )
            # the rows again: a record timed inside the model is judged by those times
            # now (compile's rule), so one dropped there reads "default", not "record"
            for row, state in zip(report.tasks, states, strict=True):
                row.default_secs, row.tuned_secs = state.entry.judged()
        return report


# the model timing's rounds (kernels in the model; default, tuned, onnxruntime), a typical CNN
_TIMING_SECS = 12.0


def _model_latency(
    relax_mod,
    targets: Targets,
    database,
    source,
    say,
    default=None,  # noqa: ANN001
) -> ModelLatency:
    """The model timed with and without the database (and onnxruntime), kept in the
    database for ``compile``'s whole-model check; a rerun that added nothing to the
    database reuses the last figures instead of building again."""
    known = last_measured(relax_mod, targets.layout, database)
    latency = known
    if latency is None:
        say("timing the model with the default schedules, with the database, onnxruntime")
        latency = time_model(
            relax_mod,
            targets.spec,
            targets.layout,
            database,
            source,
            precision=database.precision,
            default=default,
        )
        remember(relax_mod, targets.layout, database, latency)
    if latency.keeps_default:
        latency.earlier = last_passing(relax_mod, targets.layout, database)
        if known is None:
            say(f"the model with the database: {latency.why_default}; {latency.compile_uses}")
    return latency


def _silent(_msg: str) -> None:
    pass


def _runs_here(tvm_dict: dict) -> bool:
    host = str(codegen.llvm_get_system_triple()).split("-")[0]
    triple = str(tvm_dict.get("mtriple") or host).split("-")[0]
    aliases = {"arm64": "aarch64", "amd64": "x86_64"}
    return tvm_dict.get("kind") != "llvm" or aliases.get(triple, triple) == aliases.get(host, host)


@contextlib.contextmanager
def _locked(db_path: Path) -> Iterator[None]:
    """One ``tune`` per database at a time: each run counts trials and numbers new
    workloads from its own view of the records, which a second run would not see."""
    if db_path.exists() and not db_path.is_dir():
        raise TuningDatabaseError(f"tuning database {db_path} is a file, not a directory")
    db_path.mkdir(parents=True, exist_ok=True)
    fd = os.open(db_path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TuningDatabaseError(
                f"tuning database {db_path} is in use by another `graphopt tune`"
            ) from None
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Tracker:
    """An RPC tracker that answered and lists devices under ``key``."""

    host: str
    port: int
    key: str
    devices: int

    @classmethod
    def check(cls, address: str, key: str, say: Callable[[str], None]) -> _Tracker:
        host, port = parse_tracker(address)
        devices = check_tracker(host, port, key)
        say(f"RPC tracker {host}:{port}: {devices} device(s) under key {key!r}")
        return cls(host, port, key, devices)


def _lower(model, input_shapes: dict | list[str] | None, pass_defaults=None):  # noqa: ANN001, ANN202
    """``(source, Relax module)`` of a model, as ``compile`` lowers it."""
    source, graph, _ = prepare(model, input_shapes, pass_defaults=pass_defaults)
    return source, to_relax(graph)


def _extract(relax_mod, targets: Targets, pattern: str | None, precision: str) -> list[Task]:  # noqa: ANN001
    """The model's kernels as ``compile`` builds them, those matching ``pattern``."""
    found = extract_tasks(
        relax_mod, targets.spec, targets.compile_target, pattern, targets.layout, precision
    )
    if not found:
        raise TuningError(
            f"no kernel matches --tasks {pattern!r}" if pattern else "the model has no kernels"
        )
    return found


def _builder(spec: TargetSpec, options: TuneOptions) -> PersistentBuilder:
    cross = spec.target.cross_compiler
    # a batch's candidates build in parallel on every core (~0.5 GB each), then measure
    # one at a time, so builds never disturb a measurement
    return PersistentBuilder(
        max_workers=max(1, min(os.cpu_count() or 1, _MAX_BUILD_WORKERS)),
        timeout_sec=options.build_timeout,
        cross_compiler=cross() if cross else None,
    )


def _confirm_runner(options: TuneOptions) -> Runner:
    """This machine, 9 cold calls per kernel (their median judges a winning record)."""
    return local_runner(
        timeout_sec=options.run_timeout * 3, number=1, repeat=9, min_repeat_ms=0, cold=True
    )


def _runner(tracker: _Tracker | None, options: TuneOptions) -> Runner:
    """Measure on this machine, or on every device under the tracker's key."""
    if tracker is None:  # each repeat one cold call, as in a model run (local_runner)
        return local_runner(
            timeout_sec=options.run_timeout, number=1, repeat=5, min_repeat_ms=0, cold=True
        )
    # an RPC session's limit also covers uploading and loading the kernel
    return rpc_runner(
        tracker.host,
        tracker.port,
        tracker.key,
        tracker.devices,
        timeout_sec=options.run_timeout * 2,
    )
