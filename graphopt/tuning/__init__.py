"""Tuning: MetaSchedule search over the kernels graphopt compiles, into a resumable database.

- :func:`tune` extracts the fused kernels of a model exactly as ``compile`` produces them
  (the target's Relax phases up to its ``schedule`` phase, in the same ``layout``),
  measures each kernel's default schedule, then spends trials on the kernels by their
  share of the model's FLOPs, here or on devices behind TVM's RPC tracker; every
  measured batch is appended to the database.
- :class:`TuningDatabase` is that database (a directory; see ``_database.py`` for why it
  survives ``kill -9``); :func:`open_database` opens one for ``compile``, refusing one
  from another target or a corrupt one.
- :func:`ApplyTuningDatabase` is the Relax pass a target puts before its default
  schedules: kernels with a record faster than their default schedule use it.
"""

from __future__ import annotations

import os
import sys

from graphopt.tuning._apply import SCHEDULE_RULE, ApplyTuningDatabase
from graphopt.tuning._database import TuningDatabase, TuningDatabaseError
from graphopt.tuning._measure import RPCError
from graphopt.tuning._tuner import (
    TaskResult,
    TuneReport,
    TuningError,
    parse_duration,
    tune,
)

__all__ = [
    "tune",
    "TuneReport",
    "TaskResult",
    "TuningDatabase",
    "TuningDatabaseError",
    "TuningError",
    "RPCError",
    "ApplyTuningDatabase",
    "SCHEDULE_RULE",
    "open_database",
    "parse_duration",
    "format_report",
    "ProgressPrinter",
]


def open_database(path: str | os.PathLike, spec) -> TuningDatabase:  # noqa: ANN001 - TargetSpec
    """An existing database for ``spec``, read-only use (compile)."""
    return TuningDatabase(path, spec, create=False)


def _us(secs: float | None) -> str:
    return f"{secs * 1e6:.1f}" if secs is not None else "-"


def _flops(f: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if f >= scale:
            return f"{f / scale:.1f}{unit}"
    return f"{f:.0f}"


def format_report(report: TuneReport) -> str:
    """The per-task table (name, FLOPs, trials, default and tuned latency, speed-up)."""
    name_w = max([len("kernel"), *(len(t.name) for t in report.tasks)])
    head = (
        f"{'kernel':<{name_w}}  {'FLOPs':>7}  {'calls':>5}  {'trials':>9}  "
        f"{'default us':>10}  {'tuned us':>9}  {'speed-up':>8}  status"
    )
    lines = [head, "-" * len(head)]
    total_default = total_best = 0.0
    complete = True
    for t in report.tasks:
        speed = f"{t.speedup:.2f}x" if t.speedup else "-"
        trials = f"{t.trials}" + ("" if report.nominal_budgets else f"/{t.budget}")
        trials += f" ({t.failed} failed)" if t.failed else ""
        lines.append(
            f"{t.name:<{name_w}}  {_flops(t.flops):>7}  {t.calls:>5}  {trials:>9}  "
            f"{_us(t.default_secs):>10}  {_us(t.tuned_secs):>9}  {speed:>8}  {t.status}"
        )
        if t.default_secs is None:
            complete = False
            continue
        total_default += t.default_secs * t.calls
        best = min(x for x in (t.default_secs, t.tuned_secs) if x is not None)
        total_best += best * t.calls
    if complete and total_best > 0:
        lines.append(
            f"kernel time per model run: default {total_default * 1e3:.3f} ms, "
            f"with the database {total_best * 1e3:.3f} ms "
            f"({total_default / total_best:.2f}x)"
        )
    t = report.timing
    lines.append(
        f"{report.new_trials} new trial(s) in {report.seconds:.0f} s (search {t['search']:.0f} s, "
        f"build {t['build']:.0f} s, measure {t['measure']:.0f} s, "
        f"default schedules {t['baseline']:.0f} s); database {report.db}"
        + (f", layout {report.layout}" if report.layout else "")
    )
    return "\n".join(lines)


class ProgressPrinter:
    """Renders :func:`tune` progress on a stream: one updated line on a terminal."""

    def __init__(self, stream=None) -> None:  # noqa: ANN001
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, p: dict) -> None:
        left = p["left"]
        left_text = "?" if left is None else f"{int(left // 60)}m{int(left % 60):02d}s"
        model = f"{p['model_secs'] * 1e3:.2f} ms" if p["model_secs"] is not None else "?"
        line = (
            f"tasks {p['tasks_done']}/{p['tasks']}  trials {p['trials']}"
            f"{'/' + str(p['planned']) if p['planned'] else ''}  "
            f"{p['task']}: best {_us(p['best_secs'])} us (default {_us(p['default_secs'])})  "
            f"model ~{model}  left {left_text}"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
