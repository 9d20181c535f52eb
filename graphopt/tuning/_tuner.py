"""The tuning loop: MetaSchedule's search, driven task by task from Python.

Why not ``tune_relax``: graphopt needs per-task budgets weighted by the model's FLOPs, a
database that survives ``kill -9``, resuming without re-spending trials, a progress line,
and Ctrl-C that keeps every finished batch; MetaSchedule's C++ task scheduler offers
none of these hooks. The loop below is its loop (generate candidates, build, run, notify
the strategy, update the cost model, commit), one batch at a time, always giving the next
batch to the task furthest behind its budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import math
import os
import re
import shutil
import signal
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.builder import BuilderInput
from tvm.s_tir.meta_schedule.runner import RunnerInput, RunnerResult

from graphopt.errors import GraphoptError
from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import check_layout, resolve
from graphopt.tuning._database import TuningDatabase, TuningDatabaseError, workload_mod
from graphopt.tuning._measure import (
    PersistentBuilder,
    check_tracker,
    local_runner,
    parse_tracker,
    rpc_runner,
)
from graphopt.tuning._tasks import Task, extract_tasks

__all__ = ["tune", "TuneReport", "TaskResult", "parse_duration", "TuningError"]

# Trials for a task when no budget is given, on average (weighted by FLOPs).
DEFAULT_TRIALS_PER_TASK = 64
# With only --time-budget, budgets are this many trials per task (weighted): the clock
# stops the run long before, and the weights still share the time.
_TIME_ONLY_TRIALS_PER_TASK = 2000


class TuningError(GraphoptError):
    """Bad tuning options, or nothing to tune."""


@dataclass
class TaskResult:
    name: str
    flops: float
    calls: int
    budget: int
    trials: int  # in the database, all runs together
    new_trials: int  # this run
    failed: int
    default_secs: float | None
    tuned_secs: float | None
    status: str  # "tuned", "skipped (budget reached)", "exhausted", "interrupted", ...

    @property
    def speedup(self) -> float | None:
        if self.default_secs and self.tuned_secs:
            return self.default_secs / self.tuned_secs
        return None


@dataclass
class TuneReport:
    tasks: list[TaskResult]
    db: str
    interrupted: bool = False
    timed_out: bool = False
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)  # search / build / measure / baseline seconds
    nominal_budgets: bool = False  # only a time budget: the clock, not the trials, ends it
    layout: str = ""  # the layout the kernels were extracted in (compile with the same)

    @property
    def new_trials(self) -> int:
        return sum(t.new_trials for t in self.tasks)


def parse_duration(text: str | float | int | None) -> float | None:
    """``"30m"``, ``"1h30m"``, ``"90s"``, ``"45"`` (seconds) -> seconds (must be > 0)."""
    if text is None:
        return None
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = text.strip().lower()
        if s.startswith("-"):
            raise TuningError(f"--time-budget must be positive, got {text!r}")
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            parts = re.fullmatch(
                r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s
            )
            if not s or parts is None:
                raise TuningError(f"--time-budget {text!r}: use e.g. 30m, 1h30m, 90s")
            h, m, sec = (float(p) if p else 0.0 for p in parts.groups())
            seconds = h * 3600 + m * 60 + sec
    if not seconds > 0:
        raise TuningError(f"--time-budget must be positive, got {text!r}")
    return seconds


def _budgets(
    tasks: list[Task], trials: int | None, per_task: int | None, time_budget: float | None
) -> list[int]:
    if trials is None and per_task is not None:
        return [per_task] * len(tasks)
    if trials is None:
        per = _TIME_ONLY_TRIALS_PER_TASK if time_budget is not None else DEFAULT_TRIALS_PER_TASK
        trials = per * len(tasks)
    # One trial each first (no task is left out; with fewer trials than tasks that is
    # the whole budget), then the rest by weight, largest remainders first, so the
    # shares add up to exactly max(trials, len(tasks)).
    rest = max(trials - len(tasks), 0)
    total = sum(t.weight for t in tasks) or 1.0
    exact = [rest * t.weight / total for t in tasks]
    out = [1 + math.floor(e) for e in exact]
    by_remainder = sorted(range(len(tasks)), key=lambda i: math.floor(exact[i]) - exact[i])
    for i in by_remainder[: rest - sum(math.floor(e) for e in exact)]:
        out[i] += 1
    return [min(n, per_task) for n in out] if per_task is not None else out


class _Stop:
    """First Ctrl-C: finish nothing more, keep what is committed. Second: raise now."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _Stop:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C is not ours to catch
            self._old = None
        return self

    def _handle(self, *_args) -> None:  # noqa: ANN002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *_exc) -> None:  # noqa: ANN002
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


@contextlib.contextmanager
def _locked(db_path: Path):  # noqa: ANN202
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


@dataclass
class _State:
    task: Task
    entry: object
    budget: int
    ctx: object = None
    new_trials: int = 0
    status: str = "pending"

    @property
    def done(self) -> bool:
        return self.status != "pending"


def _search_strategy(population: int):  # noqa: ANN202
    from tvm.s_tir.meta_schedule.search_strategy import EvolutionarySearch

    # MetaSchedule's defaults (population 512, 4 generations) cost ~1 min of search per
    # batch on 2 cores; these keep search a fraction of build + measure time.
    return EvolutionarySearch(
        population_size=population,
        init_measured_ratio=0.2,
        init_min_unmeasured=min(50, population),
        genetic_num_iters=3,
        genetic_max_fail_count=4,
    )


def _cost_model(cores: int):  # noqa: ANN202
    from tvm.s_tir.meta_schedule.cost_model import RandomModel, XGBModel
    from tvm.s_tir.meta_schedule.feature_extractor import PerStoreFeature

    try:
        import xgboost  # noqa: F401
    except ImportError:  # tuning still works, the search is just blinder
        return RandomModel(), "random (pip install xgboost for the learned cost model)"
    return XGBModel(
        extractor=PerStoreFeature(), adaptive_training=True, num_tuning_cores=cores
    ), "xgboost"


def _cpu_intrinsics_only() -> None:
    """Register only the CPU tensor intrinsics before MetaSchedule imports them all.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` builds every
    target's intrinsics: 20-35 s on a loaded 2-core machine, almost all of it CUDA's.
    A bare package module in its place lets each submodule still import on demand.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        return
    package = types.ModuleType(name)
    package.__path__ = list(found.submodule_search_locations)
    package.__package__ = name
    sys.modules[name] = package
    import tvm.s_tir

    tvm.s_tir.tensor_intrin = package
    importlib.import_module(f"{name}.x86")
    importlib.import_module(f"{name}.arm_cpu")


def _tune_context(task: Task, target, population: int, cores: int, seed: int):  # noqa: ANN001, ANN202
    _cpu_intrinsics_only()
    from tvm.s_tir.meta_schedule import TuneContext
    from tvm.s_tir.meta_schedule.logging import get_logger

    logger = get_logger("graphopt.tuning")
    logger.setLevel("WARNING")
    return TuneContext(
        task.mod,
        target=target,
        space_generator="post-order-apply",
        search_strategy=_search_strategy(population),
        task_name=task.name,
        rand_state=seed,
        num_threads=cores,
        logger=logger,
    )


def _measure(builder, runner, mods: list, target, args_infos: list) -> tuple[list, float, float]:  # noqa: ANN001
    """Build and run ``mods``; returns ``(run_secs or None, error or None) per mod, times``."""
    t0 = time.perf_counter()
    built = builder.build([BuilderInput(m, target) for m in mods])
    t1 = time.perf_counter()
    results: list[tuple] = [None] * len(mods)
    inputs, where = [], []
    for i, b in enumerate(built):
        if b.error_msg is not None:
            results[i] = (None, b.error_msg)
        else:
            inputs.append(RunnerInput(b.artifact_path, _device_type(target), args_infos[i]))
            where.append(i)
    if inputs:
        futures = runner.run(inputs)
        for i, fut in zip(where, futures, strict=True):
            r = fut.result()
            if r.error_msg is not None or not r.run_secs:
                results[i] = (None, r.error_msg or "no measurement")
            else:
                results[i] = ([float(s) for s in r.run_secs], None)
    for b in built:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    return results, t1 - t0, time.perf_counter() - t1


def _device_type(target) -> str:  # noqa: ANN001
    kind = str(target.kind.name)
    return "cpu" if kind == "llvm" else kind


def _default_scheduled(task: Task, spec, target, layout: str) -> tvm.IRModule:  # noqa: ANN001
    """The task's kernel under the target's default schedule (its ``schedule`` phase)."""
    gvar = tvm.ir.GlobalVar(task.name)
    mod = tvm.IRModule({gvar: task.func})
    with target:
        schedule = spec.target.phases(target, layout)["schedule"]
        mod = tvm.transform.Sequential(schedule)(mod)
    return workload_mod(mod[gvar])


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
    runner=None,  # noqa: ANN001 - a MetaSchedule Runner, overriding local/RPC
    batch_size: int = 16,
    population: int = 64,
    build_timeout: float = 60.0,
    run_timeout: float = 10.0,
    seed: int = 0,
    progress=None,  # noqa: ANN001 - callable(dict) after every batch
    log=None,  # noqa: ANN001 - callable(str) for status lines
) -> TuneReport:
    """Tune ``model``'s kernels for ``target`` into the database directory ``db``.

    Budgets: ``trials`` in all (shared by FLOPs x calls, at least 1 per task), or
    ``per_task`` each (with ``trials``: a cap per task), and/or ``time_budget`` (seconds
    or "30m"). Tasks whose database entry already holds their budget are skipped.
    ``layout``: as for ``compile`` (the target's default when None); compile with the same
    layout to use what this tunes.
    """
    say = log or (lambda _msg: None)
    for flag, value in (("--trials", trials), ("--per-task", per_task)):
        if value is not None and value < 1:
            raise TuningError(f"{flag} must be at least 1, got {value}")
    if batch_size < 1:
        raise TuningError(f"batch size must be at least 1, got {batch_size}")
    seconds = parse_duration(time_budget)
    if (rpc_tracker is None) != (rpc_key is None):
        raise TuningError("--rpc-tracker and --rpc-key go together")
    spec = resolve(target, **(target_options or {}))
    layout = check_layout(spec, layout)
    if rpc_tracker is None and runner is None and not _runs_here(spec.tvm):
        raise TuningError(
            f"target {spec.name} ({spec.tvm.get('mtriple')}) does not run on this host: "
            "measure on its devices with --rpc-tracker HOST:PORT --rpc-key KEY"
        )
    start = time.monotonic()
    deadline = start + seconds if seconds is not None else None
    db_path = Path(db)
    with _locked(db_path), TuningDatabase(db_path, spec) as database:
        devices = 1
        if rpc_tracker is not None:
            host, port = parse_tracker(rpc_tracker)
            devices = check_tracker(host, port, rpc_key)
            say(f"RPC tracker {host}:{port}: {devices} device(s) under key {rpc_key!r}")
        compile_target = tvm.target.Target(spec.tvm)
        cores = int(spec.tvm.get("num-cores") or _physical_cores())
        tune_target = tvm.target.Target(dict(spec.tvm, **{"num-cores": cores}))

        _, graph, _ = prepare(model, input_shapes)
        found = extract_tasks(to_relax(graph), spec, compile_target, tasks, layout)
        if not found:
            raise TuningError(
                f"no kernel matches --tasks {tasks!r}" if tasks else "the model has no kernels"
            )
        budgets = _budgets(found, trials, per_task, seconds)
        nominal = trials is None and per_task is None and seconds is not None
        states = []
        for task, budget in zip(found, budgets, strict=True):
            entry = database.add_workload(task.mod, task.name, task.flops)
            state = _State(task, entry, budget)
            if entry.exhausted:
                state.status = "exhausted"
            elif entry.trials >= budget:
                state.status = "skipped"
            states.append(state)
        todo = sum(max(s.budget - s.entry.trials, 0) for s in states if not s.done)
        say(
            f"{len(states)} task(s), {sum(1 for s in states if s.done)} already at budget, "
            f"{todo} trial(s) to run; database {db_path}"
        )

        cross = spec.target.cross_compiler
        # builds and measurements alternate, so builds may use every core (~0.5 GB each)
        builder = PersistentBuilder(
            max_workers=max(1, min(os.cpu_count() or 1, 4)),
            timeout_sec=build_timeout,
            cross_compiler=cross() if cross else None,
        )
        if runner is None:
            if rpc_tracker is not None:
                runner = rpc_runner(host, port, rpc_key, devices, timeout_sec=run_timeout * 2)
            else:
                runner = local_runner(timeout_sec=run_timeout)
        timing = {"search": 0.0, "build": 0.0, "measure": 0.0, "baseline": 0.0}
        report = TuneReport(
            tasks=[], db=str(db_path), timing=timing, nominal_budgets=nominal, layout=layout
        )
        try:
            with _Stop() as stop:
                _baselines(
                    states,
                    database,
                    builder,
                    runner,
                    spec,
                    compile_target,
                    layout,
                    timing,
                    stop,
                    say,
                )
                if not stop.requested:
                    _loop(
                        states,
                        database,
                        builder,
                        runner,
                        tune_target,
                        cores,
                        population,
                        batch_size,
                        seed,
                        deadline,
                        stop,
                        timing,
                        progress,
                        start,
                        report,
                    )
                report.interrupted = stop.requested
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            builder.shutdown()
            for s in states:
                if s.ctx is not None:
                    with contextlib.suppress(Exception):
                        s.ctx.post_tuning()
        report.seconds = time.monotonic() - start
        report.tasks = [_result(s, report) for s in states]
        return report


def _runs_here(tvm_dict: dict) -> bool:
    from tvm.target import codegen

    host = str(codegen.llvm_get_system_triple()).split("-")[0]
    triple = str(tvm_dict.get("mtriple") or host).split("-")[0]
    aliases = {"arm64": "aarch64", "amd64": "x86_64"}
    return tvm_dict.get("kind") != "llvm" or aliases.get(triple, triple) == aliases.get(host, host)


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _baselines(states, database, builder, runner, spec, target, layout, timing, stop, say) -> None:  # noqa: ANN001
    """Measure each task's default schedule once (kept in the database)."""
    missing = [s for s in states if s.entry.baseline_secs is None]
    if not missing:
        return
    say(f"measuring the default schedules of {len(missing)} kernel(s)")
    t0 = time.perf_counter()
    mods, infos, keep = [], [], []
    for s in missing:
        try:
            mod = _default_scheduled(s.task, spec, target, layout)
        except Exception:  # noqa: BLE001 - no default schedule: no baseline
            continue
        mods.append(mod)
        infos.append(ArgInfo.from_prim_func(mod["main"]))
        keep.append(s)
    results, _, _ = _measure(builder, runner, mods, target, infos)
    if not stop.requested:
        for s, (secs, _err) in zip(keep, results, strict=True):
            if secs is not None:
                database.set_baseline(s.entry, sum(secs) / len(secs))
    timing["baseline"] += time.perf_counter() - t0


def _pick(states: list[_State]) -> _State | None:
    live = [s for s in states if not s.done]
    if not live:
        return None
    return min(live, key=lambda s: (s.entry.trials / s.budget, -s.task.weight))


def _loop(
    states,
    database,
    builder,
    runner,
    target,
    cores,
    population,
    batch_size,
    seed,  # noqa: ANN001
    deadline,
    stop,
    timing,
    progress,
    start,
    report,
) -> None:
    cost_model, _ = _cost_model(cores)
    planned = sum(max(s.budget - s.entry.trials, 0) for s in states if not s.done)
    while not stop.requested:
        if deadline is not None and time.monotonic() >= deadline:
            report.timed_out = True
            break
        state = _pick(states)
        if state is None:
            break
        left = state.budget - state.entry.trials
        if left <= 0:
            state.status = "tuned"
            continue
        t0 = time.perf_counter()
        if state.ctx is None:
            state.ctx = _tune_context(state.task, target, population, cores, seed)
            state.ctx.pre_tuning(
                max_trials=left,
                num_trials_per_iter=min(batch_size, left),
                database=database.memory,
                cost_model=cost_model,
            )
        candidates = state.ctx.generate_measure_candidates()
        timing["search"] += time.perf_counter() - t0
        if stop.requested:
            break
        if not candidates:
            database.mark_exhausted(state.entry)
            state.status = "exhausted"
            continue
        candidates = candidates[:left]
        mods = [c.sch.mod for c in candidates]
        results, t_build, t_run = _measure(
            builder, runner, mods, target, [c.args_info for c in candidates]
        )
        timing["build"] += t_build
        timing["measure"] += t_run
        if stop.requested:
            break  # this batch may have been hit by the Ctrl-C too: drop it
        runner_results = [RunnerResult(secs, err) for secs, err in results]
        t0 = time.perf_counter()
        state.ctx.notify_runner_results(candidates, runner_results)
        cost_model.update(state.ctx, candidates, runner_results)
        timing["search"] += time.perf_counter() - t0
        database.add_results(
            state.entry,
            [
                (c.sch.trace, secs, c.args_info, err)
                for c, (secs, err) in zip(candidates, results, strict=True)
            ],
        )
        state.new_trials += len(candidates)
        if state.entry.trials >= state.budget:
            state.status = "tuned"
        if progress is not None:
            shown = None if report.nominal_budgets else planned
            progress(_progress(states, state, shown, start, deadline))


def _progress(states, current, planned, start, deadline) -> dict:  # noqa: ANN001
    elapsed = time.monotonic() - start
    new = sum(s.new_trials for s in states)
    if deadline is not None:
        left = max(deadline - time.monotonic(), 0.0)
    else:
        left = elapsed / new * max(planned - new, 0) if new and planned else None
    return {
        "tasks_done": sum(1 for s in states if s.done),
        "tasks": len(states),
        "trials": new,
        "planned": planned,
        "task": current.task.name,
        "best_secs": current.entry.best_secs,
        "default_secs": current.entry.baseline_secs,
        "model_secs": _model_secs(states),
        "elapsed": elapsed,
        "left": left,
    }


def _model_secs(states) -> float | None:  # noqa: ANN001
    """Kernel time of one model run with the best known schedule per kernel."""
    total = 0.0
    for s in states:
        e = s.entry
        options = [x for x in (e.best_secs, e.baseline_secs) if x is not None]
        if not options:
            return None
        total += min(options) * s.task.calls
    return total


def _result(state: _State, report: TuneReport) -> TaskResult:
    e = state.entry
    status = {
        "skipped": "skipped (budget reached)",
        "exhausted": "search space exhausted",
        "tuned": "tuned",
    }.get(state.status)
    if status is None:
        status = "interrupted" if report.interrupted else "time up" if report.timed_out else "-"
    return TaskResult(
        name=state.task.name,
        flops=state.task.flops,
        calls=state.task.calls,
        budget=state.budget,
        trials=e.trials,
        new_trials=state.new_trials,
        failed=e.failed,
        default_secs=e.baseline_secs,
        tuned_secs=e.best_secs,
        status=status,
    )
