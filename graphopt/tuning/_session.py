"""One ``tune`` run: MetaSchedule's search, driven task by task from Python.

Why not ``tune_relax``: graphopt needs per-task budgets weighted by each kernel's measured
share of the model (its default schedule's time x calls), early stops, a
database that survives ``kill -9``, resuming without re-spending trials, a progress line,
and Ctrl-C that keeps every finished batch; MetaSchedule's C++ task scheduler offers
none of these hooks. :meth:`Session.loop` is its loop (generate candidates, build, run,
notify the strategy, update the cost model, commit), one batch at a time, always giving
the next batch to the task furthest behind its budget.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import tvm
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.cost_model import CostModel
from tvm.s_tir.meta_schedule.database import TuningRecord
from tvm.s_tir.meta_schedule.runner import Runner, RunnerResult

from graphopt.targets import TargetSpec
from graphopt.tuning._apply import applied_secs, as_built, beats_default, replayed
from graphopt.tuning._database import TuningDatabase, workload_mod
from graphopt.tuning._measure import PersistentBuilder, measure, release_workers
from graphopt.tuning._options import TuneOptions
from graphopt.tuning._report import TaskResult, TuneReport
from graphopt.tuning._search import cost_model, tune_context
from graphopt.tuning._space import default_trace, has_choices, phases_for
from graphopt.tuning._tasks import Task

__all__ = ["Session", "Targets", "TaskState", "Clock"]


@dataclass(frozen=True)
class Targets:
    """What the kernels are built for.

    ``compile_target`` is the one ``graphopt compile`` builds for: tasks are extracted and
    default schedules measured with it, so they match what compile will look up.
    ``tune_target`` adds ``num-cores``, which MetaSchedule needs to plan parallel loops.
    """

    spec: TargetSpec
    layout: str
    compile_target: tvm.target.Target
    tune_target: tvm.target.Target
    cores: int

    @classmethod
    def of(cls, spec: TargetSpec, layout: str) -> Targets:
        """The host's physical cores unless the target dict says ``num-cores``."""
        cores = int(spec.tvm.get("num-cores") or _physical_cores())
        return cls(
            spec=spec,
            layout=layout,
            compile_target=tvm.target.Target(spec.tvm),
            tune_target=tvm.target.Target(dict(spec.tvm, **{"num-cores": cores})),
            cores=cores,
        )

    def default_scheduled(self, task: Task) -> tvm.IRModule:
        """The task's kernel under the target's default schedule (its ``schedule`` phase)."""
        gvar = tvm.ir.GlobalVar(task.name)
        mod = tvm.IRModule({gvar: task.func})
        with self.compile_target:
            schedule = self.spec.target.phases(self.compile_target, self.layout)["schedule"]
            mod = tvm.transform.Sequential(schedule)(mod)
        return workload_mod(mod[gvar])


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@dataclass(frozen=True)
class Clock:
    """When the run started and, with a time budget, when it must stop (monotonic)."""

    start: float
    deadline: float | None

    @classmethod
    def started(cls, budget: float | None) -> Clock:
        now = time.monotonic()
        return cls(now, now + budget if budget is not None else None)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def up(self, reserve: float = 0.0) -> bool:
        """Whether the deadline is within ``reserve`` seconds (always False without one)."""
        return self.deadline is not None and time.monotonic() + reserve >= self.deadline

    def left(self) -> float | None:
        """Seconds to the deadline; None without one."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)


@dataclass
class TaskState:
    """Where one task stands in this run: its database entry, budget and search."""

    task: Task
    entry: object  # its TuningDatabase entry: trials, best and default latency so far
    budget: int
    ctx: object = None  # its MetaSchedule TuneContext, made when first searched
    new_trials: int = 0
    phases: tuple = ()  # the search spaces it goes through, in order (set by the Session)
    phase: int = 0  # which of them it is in
    phase_start: int = 0  # its trial count when that space began
    rechecked: bool = False  # its default measured again beside its first candidates
    status: str = "pending"  # or "tuned", "skipped", "exhausted", "converged"

    @classmethod
    def start(cls, task: Task, budget: int, database: TuningDatabase) -> TaskState:
        """Commit ``task`` to ``database``; a task its records already settle starts done
        (:meth:`settle`), which is how a rerun resumes."""
        entry = database.add_workload(task.mod, task.name, task.flops)
        if entry.baseline_secs is not None:
            task.measured_secs = entry.baseline_secs
        return cls(task, entry, budget)

    def settle(self, budget: int, patience: int) -> None:
        """Set the budget; a task whose records already settle it is done: its space is
        exhausted, its budget spent, or its last ``patience`` trials gained nothing."""
        self.budget = budget
        e = self.entry
        if e.exhausted:
            self.status = "exhausted"
        elif e.trials >= budget:
            self.status = "skipped"
        elif e.stalled(patience):
            self.status = "converged"
        else:
            self.status = "pending"

    def stalled(self, patience: int) -> bool:
        """Whether the current space's last ``patience`` trials gained nothing (1%)."""
        e = self.entry
        return patience > 0 and e.trials - max(e.improved_at, self.phase_start) >= patience

    @property
    def done(self) -> bool:
        return self.status != "pending"

    @property
    def left(self) -> int:
        return self.budget - self.entry.trials

    def result(self, unfinished: str) -> TaskResult:
        """The report's row; ``unfinished`` is the status of a task still pending."""
        e = self.entry
        status = {
            "skipped": "skipped (budget reached)",
            "exhausted": "search space exhausted",
            "converged": "stopped early (no gain)",
            "tuned": "tuned",
        }.get(self.status, unfinished)
        return TaskResult(
            name=self.task.name,
            flops=self.task.flops,
            calls=self.task.calls,
            budget=self.budget,
            trials=e.trials,
            new_trials=self.new_trials,
            failed=e.failed,
            default_secs=e.judged()[0],
            tuned_secs=e.judged()[1],
            status=status,
        )


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


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# A re-measured winner costs about this many search candidates: more repeats per kernel.
_CONFIRM_COST = 2.0


def _no_timing() -> dict[str, float]:
    return {"search": 0.0, "build": 0.0, "measure": 0.0, "baseline": 0.0}


@dataclass
class Session:
    """Everything one ``tune`` run works with, so its steps take no long argument lists.

    :func:`~graphopt.tuning.tune` makes it once the database is locked and the tasks are
    committed; :meth:`run` measures the default schedules, searches, and reports.
    ``progress`` gets a dict after every batch; ``say`` gets status lines.
    """

    options: TuneOptions
    targets: Targets
    database: TuningDatabase
    builder: PersistentBuilder
    runner: Runner
    states: list[TaskState]
    clock: Clock
    progress: Callable[[dict], None] | None
    say: Callable[[str], None]
    confirm_runner: Runner | None = None  # re-measures winners (several repeats each)
    # seconds the work after the session (the model timing) is expected to take: the
    # search stops that much, plus the re-measure of winners, before a time budget ends
    closing_secs: float = 0.0
    # what the run itself changes
    stop: _Stop = field(init=False, default_factory=_Stop)
    timing: dict[str, float] = field(init=False, default_factory=_no_timing)  # seconds each
    timed_out: bool = field(init=False, default=False)
    planned: int = field(init=False)  # trials left to run when the session began

    def __post_init__(self) -> None:
        self.planned = 0
        for state in self.states:
            state.phases = phases_for(self.options.space, state.task.mod)

    def run(self) -> TuneReport:
        """Baselines, budgets by the measured defaults, then the search until budgets,
        early stops, the clock or Ctrl-C end it.

        However it ends, the search contexts are released and everything committed stays
        in the database. The worker processes are kept for the next run in this process
        (``_measure.release_workers``) when it ends between batches (done, out of time, a
        first Ctrl-C); a second Ctrl-C or an exception may leave a worker holding a result
        nobody read, so then they are stopped.
        """
        interrupted = False
        clean = False
        try:
            with self.stop:
                self.baselines()
                self._budgets()
                if not self.stop.requested:
                    self.loop()
                if not self.stop.requested:
                    self.confirm()
                interrupted = self.stop.requested
            clean = True
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self._release()
            if not clean:
                release_workers(this_thread_only=True)
        return self._report(interrupted)

    def _budgets(self) -> None:
        """Share the trials by each task's measured default time x calls (its share of a
        model run), by FLOPs x calls when a default could not be measured; then settle
        which tasks are already done (a rerun's records decide the same way)."""
        tasks = [s.task for s in self.states]
        if any(t.measured_secs is None for t in tasks):
            for t in tasks:
                t.measured_secs = None  # no mixing seconds with FLOPs
        budgets = self.options.budgets(tasks)
        for state, budget in zip(self.states, budgets, strict=True):
            state.settle(budget, self.options.patience)
        self.planned = sum(max(s.left, 0) for s in self.states if not s.done)
        done = sum(1 for s in self.states if s.done)
        by = "measured default time" if tasks and tasks[0].measured_secs else "FLOPs"
        planned = "until the clock stops" if self.options.nominal_budgets else self.planned
        self.say(
            f"{len(self.states)} task(s), {done} already done, trials to run: {planned} "
            f"(shared by {by} x calls; search space {self.options.space}); "
            f"database {self.database.path}"
        )

    def baselines(self) -> None:
        """Measure each task's default schedule once (kept in the database): speed-ups,
        and whether ``compile`` prefers a record, are measured against it."""
        missing = [s for s in self.states if s.entry.baseline_secs is None]
        if not missing:
            return
        self.say(f"measuring the default schedules of {len(missing)} kernel(s)")
        t0 = time.perf_counter()
        mods, infos, measured = [], [], []
        for s in missing:
            try:
                mod = self.targets.default_scheduled(s.task)
            except Exception:  # noqa: BLE001 - no default schedule: no baseline
                continue
            mods.append(mod)
            infos.append(ArgInfo.from_prim_func(mod["main"]))
            measured.append(s)
        target = self.targets.compile_target
        results, _, _ = measure(self.builder, self.runner, target, mods, infos)
        if not self.stop.requested:
            for s, (secs, _err) in zip(measured, results, strict=True):
                if secs is not None:
                    self.database.set_baseline(s.entry, sum(secs) / len(secs))
                    s.task.measured_secs = s.entry.baseline_secs
        self.timing["baseline"] += time.perf_counter() - t0

    def loop(self) -> None:
        """Batch after batch to the task furthest behind its budget, until every task is
        done, the clock runs out or Ctrl-C."""
        model = cost_model(self.targets.cores)
        while not self.stop.requested:
            if self.clock.up(self.reserve()):
                self.timed_out = True
                break
            state = self._furthest_behind()
            if state is None:
                break
            self._batch(state, model)

    def reserve(self) -> float:
        """Seconds a time budget keeps back for what follows the search: re-measuring
        today's winning records beside their defaults (two kernels each, with the confirm
        runner's extra repeats, at the cost per candidate this run has seen) and the
        model timing (``closing_secs``). At most half the budget, so a short one still
        searches."""
        if self.clock.deadline is None:
            return 0.0
        trials = sum(s.new_trials for s in self.states)
        per_candidate = (self.timing["build"] + self.timing["measure"]) / max(trials, 1)
        claims = sum(
            1
            for s in self.states
            if s.entry.best is not None
            and s.entry.baseline_secs is not None
            and beats_default(s.entry.baseline_secs, s.entry.best_secs)
        )
        confirm = claims * 2 * _CONFIRM_COST * per_candidate
        return min(confirm + self.closing_secs, 0.5 * (self.clock.deadline - self.clock.start))

    def _furthest_behind(self) -> TaskState | None:
        """The pending task with the smallest share of its budget spent (ties: heavier)."""
        live = [s for s in self.states if not s.done]
        if not live:
            return None
        return min(live, key=lambda s: (s.entry.trials / s.budget, -s.task.weight))

    def _batch(self, state: TaskState, model: CostModel) -> None:
        """Search, build, measure and commit one batch of ``state``'s task."""
        left = state.left
        if left <= 0:
            state.status = "tuned"
            return
        candidates = self._candidates(state, model)
        if self.stop.requested:
            return
        if not candidates:
            if not self._next_phase(state):
                self.database.mark_exhausted(state.entry)
                state.status = "exhausted"
            return
        candidates = candidates[:left]
        mods = [as_built(c.sch) for c in candidates]  # as compile would build each
        infos = [c.args_info for c in candidates]
        default = self._default_again(state)
        if default is not None:
            mods.insert(0, default)
            infos.insert(0, ArgInfo.from_prim_func(default["main"]))
        target = self.targets.tune_target
        results, build_secs, run_secs = measure(self.builder, self.runner, target, mods, infos)
        self.timing["build"] += build_secs
        self.timing["measure"] += run_secs
        if self.stop.requested:
            return  # this batch may have been hit by the Ctrl-C too: drop it
        if default is not None:
            self._recheck_baseline(state, results.pop(0)[0])
        self._learn(state, model, candidates, results)
        self.database.add_results(
            state.entry,
            [
                (c.sch.trace, secs, c.args_info, err)
                for c, (secs, err) in zip(candidates, results, strict=True)
            ],
        )
        state.new_trials += len(candidates)
        if state.entry.trials >= state.budget:
            state.status = "tuned"
        elif state.stalled(self.options.patience) and not self._next_phase(state):
            state.status = "converged"  # the rest of its budget would buy nothing
        if self.progress is not None:
            self.progress(self._progress(state))

    def _candidates(self, state: TaskState, model: CostModel) -> list:
        """The next batch the search proposes (its context is made on first use)."""
        t0 = time.perf_counter()
        if state.ctx is None:
            space = state.phases[state.phase]
            if space == "graphopt" and not self._searchable(state):
                return []  # only the default, measured already: the space is exhausted
            left = state.left
            state.ctx = tune_context(
                state.task,
                self.targets.tune_target,
                cores=self.targets.cores,
                options=self.options,
                space=space,
            )
            if space == "graphopt":
                self._seed_default(state)
            state.ctx.pre_tuning(
                max_trials=left,
                num_trials_per_iter=min(self.options.batch_size, left),
                database=self.database.memory,
                cost_model=model,
            )
        candidates = state.ctx.generate_measure_candidates()
        self.timing["search"] += time.perf_counter() - t0
        return candidates

    def confirm(self) -> None:
        """Measure each task's best record again, beside its default, when it claims to
        beat the default by ``MIN_SPEEDUP``; ``compile`` then judges it by these.

        Why: on a busy machine a candidate measured once can look fast by luck, and the
        best of hundreds of such measurements is the luckiest of them (seen here:
        records "2-4x faster" that made the model slower). Measured again, several
        repeats each, side by side with the default, a lucky record loses its claim."""
        todo = []
        for state in self.states:
            e = state.entry
            if e.best is None or e.baseline_secs is None:
                continue
            if e.checked is not None and e.checked[2] == e.best_secs:
                continue  # this best was checked already
            if not beats_default(e.baseline_secs, e.best_secs):
                continue  # it does not claim to beat the default
            try:
                default = self.targets.default_scheduled(state.task)
                mods = [default, replayed(e.best, state.task.mod)]
            except Exception:  # noqa: BLE001 - cannot rebuild it: judged as measured
                continue
            todo.append((state, mods))
        if not todo:
            return
        self.say(f"measuring {len(todo)} winning record(s) again, beside their defaults")
        t0 = time.perf_counter()
        mods = [m for _, pair in todo for m in pair]
        infos = [ArgInfo.from_prim_func(m["main"]) for m in mods]
        runner = self.confirm_runner or self.runner
        target = self.targets.tune_target
        results, _, _ = measure(self.builder, runner, target, mods, infos)
        for i, (state, _) in enumerate(todo):
            default, best = results[2 * i][0], results[2 * i + 1][0]
            if default and best:
                self.database.set_checked(state.entry, _median(default), _median(best))
        self.timing["confirm"] = time.perf_counter() - t0

    def _default_again(self, state: TaskState) -> tvm.IRModule | None:
        """The default schedule, to measure once more in the task's first batch of this run.

        Why: the first measurements of a run (all the defaults, in a row) can catch the
        machine busier than the search's batches later do; measured side by side with the
        candidates, the default is judged under the same conditions."""
        if state.rechecked or state.entry.baseline_secs is None:
            return None
        state.rechecked = True
        try:
            return self.targets.default_scheduled(state.task)
        except Exception:  # noqa: BLE001 - no default schedule: nothing to re-measure
            return None

    def _recheck_baseline(self, state: TaskState, secs: list | None) -> None:
        """Keep the faster of the two measurements of the default: a record must then
        beat the default at its best to be used (never slower than the default)."""
        if not secs:
            return
        again = sum(secs) / len(secs)
        if again < state.entry.baseline_secs:
            self.database.set_baseline(state.entry, again)

    def _next_phase(self, state: TaskState) -> bool:
        """Move ``state`` to the next search space of ``--space`` (graphopt's, then the
        generic one), if there is one: a fresh search whose patience starts now."""
        if state.phase + 1 >= len(state.phases):
            return False
        if state.ctx is not None:
            with contextlib.suppress(Exception):
                state.ctx.post_tuning()
        state.ctx = None
        state.phase += 1
        state.phase_start = state.entry.trials
        return True

    def _searchable(self, state: TaskState) -> bool:
        try:
            return has_choices(state.task.mod, self.targets.tune_target)
        except Exception:  # noqa: BLE001 - let the search find out
            return True

    def _seed_default(self, state: TaskState) -> None:
        """Put the default schedule, as the graphopt space's trace with its measured time,
        into the search's database (memory only: it is no trial), so the evolutionary
        search starts from it and mutates around it."""
        e = state.entry
        if e.baseline_secs is None:
            return
        try:
            default = self.targets.default_scheduled(state.task)
            trace = default_trace(state.task.mod, self.targets.tune_target, default)
        except Exception:  # noqa: BLE001 - no default schedule to start from
            return
        if trace is None:
            return
        info = ArgInfo.from_prim_func(state.task.mod["main"])
        record = TuningRecord(trace, e.workload, [e.baseline_secs], self.targets.tune_target, info)
        self.database.memory.commit_tuning_record(record)

    def _learn(self, state: TaskState, model: CostModel, candidates: list, results: list) -> None:
        """Tell the search strategy and the cost model how the batch measured."""
        runner_results = [RunnerResult(secs, err) for secs, err in results]
        t0 = time.perf_counter()
        state.ctx.notify_runner_results(candidates, runner_results)
        model.update(state.ctx, candidates, runner_results)
        self.timing["search"] += time.perf_counter() - t0

    def _progress(self, current: TaskState) -> dict:
        """The progress line's numbers; without a deadline, time left is extrapolated."""
        elapsed = self.clock.elapsed()
        new = sum(s.new_trials for s in self.states)
        planned = None if self.options.nominal_budgets else self.planned
        left = self.clock.left()
        if left is None:
            left = elapsed / new * max(planned - new, 0) if new and planned else None
        return {
            "tasks_done": sum(1 for s in self.states if s.done),
            "tasks": len(self.states),
            "trials": new,
            "planned": planned,
            "task": current.task.name,
            "best_secs": current.entry.best_secs,
            "default_secs": current.entry.baseline_secs,
            "model_secs": self._model_secs(),
            "elapsed": elapsed,
            "left": left,
        }

    def _model_secs(self) -> float | None:
        """Kernel time of one model run with the best known schedule per kernel."""
        total = 0.0
        for s in self.states:
            secs = applied_secs(*s.entry.judged())
            if secs is None:
                return None
            total += secs * s.task.calls
        return total

    def _release(self) -> None:
        for s in self.states:
            if s.ctx is not None:
                with contextlib.suppress(Exception):
                    s.ctx.post_tuning()

    def _report(self, interrupted: bool) -> TuneReport:
        unfinished = "interrupted" if interrupted else "time up" if self.timed_out else "-"
        return TuneReport(
            tasks=[s.result(unfinished) for s in self.states],
            db=str(self.database.path),
            interrupted=interrupted,
            timed_out=self.timed_out,
            seconds=self.clock.elapsed(),
            timing=self.timing,
            nominal_budgets=self.options.nominal_budgets,
            time_budget=self.options.time_budget,
            layout=self.targets.layout,
            space=self.options.space,
            build_workers=self.builder.workers,
        )
