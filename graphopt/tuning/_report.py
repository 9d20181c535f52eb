"""What a ``tune`` run reports: a result per task, the table, the progress line."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

from graphopt.tuning._apply import MIN_SPEEDUP, applied_secs
from graphopt.tuning._latency import MODEL_MIN_GAIN, ModelLatency

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
    time_budget: float | None = None  # seconds (None: none given)
    layout: str = ""  # the layout the kernels were extracted in (compile with the same)
    space: str = ""  # the search space: generic, graphopt or both
    build_workers: int = 0
    latency: ModelLatency | None = None  # the whole model, measured (None: not measured)

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
    """The per-task table: name, FLOPs, calls, trials, the default schedule's and the best
    record's latency, and what compile uses (the record with its speed-up, or the default:
    a record is applied only when it beats the default by ``MIN_SPEEDUP``)."""
    name_w = max([len("kernel"), *(len(t.name) for t in report.tasks)])
    head = (
        f"{'kernel':<{name_w}}  {'FLOPs':>7}  {'calls':>5}  {'trials':>9}  "
        f"{'default us':>10}  {'best us':>9}  {'compile uses':>12}  status"
    )
    lines = [head, "-" * len(head)]
    total_default = total_best = 0.0
    complete = True
    for t in report.tasks:
        uses = _uses(t)
        trials = f"{t.trials}" + ("" if report.nominal_budgets else f"/{t.budget}")
        trials += f" ({t.failed} failed)" if t.failed else ""
        lines.append(
            f"{t.name:<{name_w}}  {_flops(t.flops):>7}  {t.calls:>5}  {trials:>9}  "
            f"{_us(t.default_secs):>10}  {_us(t.tuned_secs):>9}  {uses:>12}  {t.status}"
        )
        if t.default_secs is None:
            complete = False
            continue
        total_default += t.default_secs * t.calls
        total_best += applied_secs(t.default_secs, t.tuned_secs) * t.calls
    lines += _latency_lines(report, (total_default, total_best) if complete else None)
    lines += _early_end_line(report)
    t = report.timing
    spent = t["search"] + t["build"] + t["measure"]
    rate = f", {report.new_trials / (spent / 60):.1f} trials/min" if spent > 0 else ""
    lines.append(
        f"{report.new_trials} new trial(s) in {report.seconds:.0f} s{rate} (search "
        f"{t['search']:.0f} s, build {t['build']:.0f} s on {report.build_workers or '?'} "
        f"worker(s), measure {t['measure']:.0f} s, default schedules {t['baseline']:.0f} s"
        + (f", re-measuring winners {t['confirm']:.0f} s" if "confirm" in t else "")
        + (f", model timing {t['model']:.0f} s" if "model" in t else "")
        + f"); database {report.db}"
        + (f", layout {report.layout}" if report.layout else "")
        + (f", space {report.space}" if report.space else "")
    )
    return "\n".join(lines)


def _early_end_line(report: TuneReport) -> list[str]:
    """Where a time budget was given and every task ended before it (each stopped early,
    ran out of space or reached its trials): say so, and how, so that the unspent time
    does not read as a search cut short."""
    if report.time_budget is None or report.timed_out or report.interrupted or not report.tasks:
        return []
    counts = Counter(t.status for t in report.tasks)
    how = ", ".join(f"{n} {status}" for status, n in counts.most_common())
    return [
        f"every task ended {report.seconds / 60:.1f} min into the {report.time_budget / 60:g} "
        f"min budget ({how}): more time would not have searched further"
    ]


def _uses(t: TaskResult) -> str:
    """What compile runs for the kernel: the database's record and its speed-up when it
    beats the default by MIN_SPEEDUP (:func:`applied_secs`), else "default" (a slower best
    is never applied, so the table shows no speed-up below 1)."""
    if t.default_secs is None:
        return "-"
    used = applied_secs(t.default_secs, t.tuned_secs)
    return "default" if used == t.default_secs else f"record {t.default_secs / used:.2f}x"


def _ms(value: float | None) -> str:
    return f"{value:.3f} ms" if value is not None else "-"


def _latency_lines(report: TuneReport, kernels: tuple[float, float] | None) -> list[str]:
    """The model's latency before and after: estimated (its kernels' times added up) and
    measured end to end, next to onnxruntime's."""
    lat = report.latency
    ort = f"; onnxruntime {_ms(lat.onnxruntime_ms)}" if lat and lat.onnxruntime_ms else ""
    lines = []
    for when, index, measured in (
        ("before", 0, lat.default_ms if lat else None),
        ("after ", 1, lat.tuned_ms if lat else None),
    ):
        est = _ms(kernels[index] * 1e3) if kernels else "-"
        text = f"model latency {when} tuning: estimated {est} (kernels), measured {_ms(measured)}"
        if when == "after " and lat and lat.tuned_kernels:
            text += f" ({lat.tuned_kernels} kernel(s) from the database)"
        lines.append(text + ort)
    if lat and lat.dropped_in_model:
        lines.append(
            f"timed inside the model: {lat.dropped_in_model} record(s) not "
            f"{MIN_SPEEDUP:g}x faster there than their default schedule, dropped "
            "(compile keeps those kernels' defaults)"
        )
    if lat and lat.tuned_vs_default is not None and lat.tuned_kernels:
        aa = f", {lat.default_aa:.3f} apart" if lat.default_aa is not None else ""
        verdict = (
            f"above {MODEL_MIN_GAIN} (no gain beyond the noise of separate builds): "
            if lat.keeps_default
            else ""
        ) + lat.compile_uses
        lines.append(
            f"whole-model check: tuned/default {lat.tuned_vs_default:.3f} (the least "
            f"favourable reading over {lat.rounds} paired rounds, against the default in two "
            f"VMs{aa}), {verdict}"
        )
    if lat and lat.note:
        lines.append(f"model latency: {lat.note}")
    return lines


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
