"""What a ``tune`` run reports: a result per task, the table, the progress line."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

__all__ = ["TaskResult", "TuneReport", "format_report", "ProgressPrinter"]


@dataclass
class TaskResult:
    """One kernel's row of the report."""

    name: str
    flops: float
    calls: int
    budget: int
    trials: int  # in the database, all runs together
    new_trials: int  # this run
    failed: int
    default_secs: float | None
    tuned_secs: float | None
    status: str  # "tuned", "skipped (budget reached)", "interrupted", "time up", ...

    @property
    def speedup(self) -> float | None:
        if self.default_secs and self.tuned_secs:
            return self.default_secs / self.tuned_secs
        return None


@dataclass
class TuneReport:
    """What a run did: per-task results, how it ended, where the time went."""

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
