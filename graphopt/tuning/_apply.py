"""Compile-time use of a tuning database: a Relax pass over the fused kernels.

Put it after FuseTIR and before the default-schedule pass: each PrimFunc whose workload has
a record at least ``MIN_SPEEDUP`` times faster than its default schedule (both measured
when tuning; by their side-by-side re-measurement when ``tune`` made one; by their
times inside a model run when ``tune``'s model timing made those) gets the record's
trace replayed and is marked ``tirx.is_scheduled``, so the default schedules
skip it. Any other kernel is left alone for the defaults. A replayed kernel that streams
its weights (a Winograd conv's products, a dense conv's streamed reduction) gets the
prefetch its default schedule inserts outside the trace (``targets._cpu.after_trace``:
``_winograd.prefetch_products``, ``_cpu_schedules.prefetch_streamed``), so a record is
not handicapped by what its trace cannot hold. ``tune`` measures each candidate and each
re-measured record the same way (:func:`as_built`), so the kernel timed in the search is
the kernel ``compile`` builds from its record.
"""

from __future__ import annotations

import tvm
from tvm import s_tir

from graphopt.targets._cpu import after_trace
from graphopt.targets._phases import schedule_unscheduled
from graphopt.tuning._database import MIN_SPEEDUP, TuningDatabase, beats_default, workload_mod
from graphopt.tuning._tasks import views

__all__ = [
    "ApplyTuningDatabase",
    "MIN_SPEEDUP",
    "SCHEDULE_RULE",
    "applied_secs",
    "as_built",
    "beats_default",
    "replayed",
]

SCHEDULE_RULE = "tuning-db"


def applied_secs(default: float | None, best: float | None) -> float | None:
    """A kernel's time as ``compile`` builds it with the database: the record only when it
    beats the default by ``MIN_SPEEDUP`` (the default unknown: the record)."""
    return best if beats_default(default, best) else default


def as_built(sch: s_tir.Schedule) -> tvm.IRModule:
    """The kernel ``compile`` builds from a schedule replayed from a trace (a search
    candidate, a record): ``sch``'s module with what the default schedule adds outside its
    trace (``after_trace``: the streamed weights' prefetch). ``sch`` itself is left as it
    is (its trace and module are the search's).

    Why the search measures this and not ``sch.mod``: the default is measured with its
    prefetch, and a candidate without it lost to the default by the prefetch alone, on
    exactly the kernels that stream their weights (ResNet-50's last stage), so the search
    could not find a better tile there, and a record chosen without it would be built
    with it."""
    built = s_tir.Schedule(sch.mod)  # (copy() fails on some candidates' symbol tables)
    after_trace(built)
    return built.mod


def replayed(record, wmod: tvm.IRModule) -> tvm.IRModule:  # noqa: ANN001 - a TuningRecord
    """The workload ``wmod`` scheduled by ``record``'s trace, as ``compile`` builds it."""
    sch = s_tir.Schedule(wmod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return as_built(sch)


def ApplyTuningDatabase(  # noqa: N802
    db: TuningDatabase,
    report: dict | None = None,
    selection: dict[str, float] | None = None,
    chosen: dict | None = None,
) -> tvm.transform.Pass:
    """Schedule kernels from ``db``.

    ``selection`` (``{entry key: record seconds}``, a passing whole-model check's, see
    ``_latency.last_passing``): exactly those records, each kernel whose entry it names
    with the record it names, every other kernel left to the defaults; without it, each
    kernel's entry's :meth:`~graphopt.tuning._database._Entry.choice` (its best record
    where that beats its default, else the latest record that beat it inside a model).

    ``report`` (if given) gets ``from_database`` (``{kernel: info}``) and ``default`` (the
    kernels left to the default schedules); ``chosen`` (if given) each applied kernel's
    ``(entry, seconds its record measured in the search)``. Kernels the built model never
    calls (``_tasks.views``: they become views later) are left alone and reported in
    neither: a record for one (a database tuned before tasks left them out) would count
    as used and run nowhere.
    """
    if report is not None:
        report.setdefault("from_database", {})
        report.setdefault("default", [])
    skipped: set[str] = set()

    def schedule_one(gvar, func):  # noqa: ANN001, ANN202
        if gvar.name_hint in skipped:
            return None  # a view in the built model: the default schedule pass takes it
        wmod = workload_mod(func)
        entry = db.find(wmod)
        record = None
        if entry is not None and selection is not None:
            at = selection.get(entry.key)
            record = entry.record_at(at)
            default_secs, best_secs = entry.baseline_secs, at
        elif entry is not None and (choice := entry.choice()) is not None:
            record, at, default_secs, best_secs = choice
        # else the default schedule measured faster: keep it
        if record is None:
            if report is not None:
                report["default"].append(gvar.name_hint)
            return None
        new = replayed(record, wmod)["main"]
        symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
        new = (
            new.with_attr("global_symbol", symbol)
            if symbol is not None
            else new.without_attr("global_symbol")
        )
        if chosen is not None:
            chosen[gvar.name_hint] = (entry, at)
        if report is not None:
            report["from_database"][gvar.name_hint] = {
                "workload": entry.name,
                "tuned_us": round(best_secs * 1e6, 3),
                "default_us": round(default_secs * 1e6, 3) if default_secs is not None else None,
                "trials": entry.trials,
            }
        return SCHEDULE_RULE, new

    inner = schedule_unscheduled("graphopt.ApplyTuningDatabase.kernels", schedule_one)

    @tvm.transform.module_pass(opt_level=0, name="graphopt.ApplyTuningDatabase")
    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: ANN001
        skipped.clear()
        skipped.update(views(mod))
        return inner(mod)

    return apply
