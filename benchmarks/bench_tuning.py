"""What tuning buys: default vs tuned vs onnxruntime vs OpenVINO, over tuning time.

    python benchmarks/bench_tuning.py [--models resnet18,resnet50,mobilenet_v2,efficientnet_b0]
                                      [--budgets 5,15,30] [--space both] [--threads N]
                                      [--db DIR] [--png tuning_curve.png] [--block 2]
                                      [--rounds 5] [--retime [--processes N]]

For each model (benchmarks/_public_models.py, seeded weights, exported to ONNX): one
database, tuned in steps up to each budget (minutes of ``graphopt.tuning.tune``'s clock,
cumulative: the 15-minute point resumes the 5-minute database for 10 more minutes).
After each step the model is compiled with the database and timed together with graphopt's
default schedules, onnxruntime and OpenVINO (f32): all engines with ``--threads`` threads,
in interleaved ``--block``-second blocks (median of ``--rounds``), so a load that drifts
during the hours of tuning moves every engine alike; a ratio is the median of the rounds'
own ratios (``bench_public.paired_ratios``).

Prints a markdown table (ratio < 1: tuned graphopt faster, in brackets the lower and upper
quartile of the rounds' ratios: on a machine whose speed drifts, how far one run's figure
can be trusted against a bar; "records used": the database's
records the tuned build applied, 0 when compile kept every default schedule, so that the
tuned and default builds run the same kernels; "A/A": a second copy of the default build,
loaded on its own and timed in the same rounds, over the first: the floor under any
tuned/default figure of the row, which the quartiles do not show. Separately loaded
copies of one binary differ by a few percent in one process, steadily over the rounds
(on a Xeon, ResNet-18 with 0 records used: tuned/default 1.06-1.09 while the timed
builds were compile's own return values, 1.02 beside an A/A of 1.03 since every timed
build is a copy, first loaded to be timed); "slowest kernel": each record the tuned build
applied, its kernel timed per call inside whole-model runs of the tuned build against the
same kernel's default schedule inside runs of the default build (the builds taking turns,
as ``tune``'s own in-model check times them), and the largest tuned/default of them: the
issue's bar "no kernel in any tuned model slower than its default", measured here apart
from the tuner's own check ("-": no record used; "k of n timed": n records used, k of
their kernels called by the model runs, the figure covering those; the per-kernel figures
are printed under the model's report), with "(A/A x)": the largest ratio of the same
kernels in the default build's copy over the default, timed in the same rounds. One
kernel's time inside the model differs between two loads of the same file far more than
the whole model's (on a 2-core Zen 4, EfficientNet-B0's kernels of 20 us and more read
0.92-1.07, once 0.74-1.05), so a kernel's tuned/default is slower than its default only
where it stands above that A/A
and draws latency over tuning time, one panel per model, to ``--png`` (matplotlib, Agg):
the measured points after each budget, and the search's own estimate (the best known
kernel times added up) after every batch. ``--db DIR`` keeps the databases
(``DIR/<model>``) to resume later.

``--retime`` times the databases already in ``--db`` again, without searching: one row per
model, labelled with the largest budget and the database's trials. Why: a bar's verdict
on a machine whose speed drifts wants more rounds than the hour of tuning left time for,
and rerunning the tuning command cannot give them, since every point of a resumed run
would be timed with the finished database.

``--retime --processes N`` does that in N fresh processes, one after the other, and ends
with a table of each model's ratios over them: the median of the processes' figures, the
lowest and highest, and each process's core-to-core round trip. Why: more rounds in one
process do not give a bar's verdict either. On the 2-core Zen 4 KVM guest of
benchmarks/RESULTS.md a process keeps its own speed for its life (ResNet-50's default
build read 30.6-35.6 ms in seven fresh processes, onnxruntime 39.0-45.9 beside it, and
tuned/onnxruntime 0.76-0.81), and the host moves the two vCPUs between cores that share
an L3 and cores that do not, from one process to the next (``_placement.py``); one
process's quartiles show neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _placement import core_to_core_ns, describe, placement_line  # noqa: E402
from _public_models import export_onnx, missing_extra  # noqa: E402
from bench_public import (  # noqa: E402
    CallEngine,
    GraphoptEngine,
    cpu_name,
    interleaved_rounds,
    medians,
    openvino_request,
    ort_session,
    paired_ratios,
    paired_spread,
    set_threads,
)

import graphopt  # noqa: E402
from graphopt.targets import resolve  # noqa: E402
from graphopt.tuning import ProgressPrinter, format_report, open_database, tune  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
COPY = "default copy"  # the engine of the default build's second, separately loaded copy


@dataclass
class Point:
    """The engines timed together (interleaved) after ``minutes`` of tuning."""

    minutes: float
    trials: int
    applied: int  # the database's records compile used (0: the default kernels)
    ms: dict[str, float]  # engine -> median ms: tuned, default, ort, openvino
    vs: dict[str, float] = field(default_factory=dict)  # engine -> tuned's round ratio
    # engine -> the lower and upper quartile of those round ratios
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)
    # the default build's second copy over the first: (median, low, high quartile) of the
    # round ratios (None: no copy timed)
    aa: tuple[float, float, float] | None = None
    # each applied record's kernel: tuned/default per call inside model runs (empty: none)
    kernels: dict[str, float] = field(default_factory=dict)
    # the same kernels' A/A: the default build's copy over the default, timed in the same
    # rounds (empty: not timed)
    kernels_aa: dict[str, float] = field(default_factory=dict)
    # the core-to-core round trip measured just before the timing (None: not measured)
    round_trip_ns: float | None = None


def _point(  # noqa: PLR0913
    minutes: float,
    trials: int,
    applied: int,
    engines: dict,
    opts,  # noqa: ANN001 - argparse.Namespace
    kernels: dict | None = None,
    kernels_aa: dict | None = None,
) -> Point:
    """The engines timed in interleaved rounds; tuned's ratios paired round by round;
    ``kernels``: the applied records' in-model ratios, ``kernels_aa`` their A/A
    (:func:`_timed_with`)."""
    figures = interleaved_rounds(engines, opts.block, opts.rounds)
    aa = None
    if COPY in figures:
        pair = {COPY: figures.pop(COPY), "default": figures["default"]}
        ratio = paired_ratios(pair, COPY)["default"]
        aa = (ratio, *paired_spread(pair, COPY)["default"])
    return Point(
        minutes,
        trials,
        applied,
        medians(figures),
        paired_ratios(figures, "tuned"),
        paired_spread(figures, "tuned"),
        aa,
        kernels or {},
        kernels_aa or {},
    )


@dataclass
class Curve:
    """One model's results: a point per budget, and the search's estimate per batch."""

    name: str
    points: list[Point] = field(default_factory=list)
    estimate: list[tuple[float, float]] = field(default_factory=list)  # (min, ms)


def _default_files(path: Path, work: Path) -> tuple[Path, Path]:
    """Where the default build and its second copy (the A/A's) are saved in ``work``."""
    return work / f"{path.stem}-default.so", work / f"{path.stem}-default-copy.so"


def _engines(path: Path, work: Path, opts) -> tuple[dict, dict]:  # noqa: ANN001
    """graphopt's default schedules, onnxruntime and OpenVINO on the same seeded inputs."""
    built = graphopt.compile(path, "x86", work / f"{path.stem}-default-built.so")
    # every timed graphopt build is a copy of what compile wrote, first loaded to be timed
    # (the same for the tuned builds); two of the default: the A/A pair
    default, copy = (built.save(f) for f in _default_files(path, work))
    inputs = {k: np.asarray(v) for k, v in default.random_inputs(0).items()}
    sess = ort_session(path, opts.threads)
    engines = {
        "default": GraphoptEngine(default, inputs),
        COPY: GraphoptEngine(copy, inputs),
        "ort": CallEngine(lambda: sess.run(None, inputs)),
    }
    request = openvino_request(path, opts.threads, inputs)
    if request is not None:
        engines["openvino"] = CallEngine(request.infer)
    return engines, inputs


def _timed_with(name: str, path: Path, db: Path, work: Path, label: str, inputs: dict):  # noqa: ANN202
    """graphopt compiled with the database ``db``, as an engine; how many records it
    applied, and their kernels' tuned/default times inside model runs with their A/A
    (:func:`_in_model`)."""
    built = graphopt.compile(path, "x86", work / f"{name}-{label}-built.so", tuning_db=db)
    applied = set(built.manifest.get("tuning", {}).get("from_database", {}))
    tuned = built.save(work / f"{name}-{label}.so")  # loaded as the default builds are
    default, copy = _default_files(path, work)
    kernels, aa = _in_model(default, tuned.path, inputs, applied, copy)
    return GraphoptEngine(tuned, inputs), len(applied), kernels, aa


def _in_model(
    default: Path, tuned: Path, inputs: dict, names: set[str], copy: Path | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Per kernel of ``names``: its median time per call inside whole-model runs of the
    ``tuned`` library over the same kernel's inside runs of ``default`` (the builds taking
    turns; ``graphopt.tuning``'s in-model timing, which its check judges records by); and,
    with ``copy`` (the default build's second file), the same kernels' copy/default: the
    A/A. Why: one kernel's in-model time differs between two loads of the same file by
    more than the model's does (EfficientNet-B0 on a 2-core Zen 4: kernels of 20 us and
    more 0.92-1.07 between the default and its copy in one process, once 0.74-1.05), so
    a tuned/default of a kernel means something only beside its A/A."""
    if not names:
        return {}, {}
    import tvm

    from graphopt.targets._runner import load_library
    from graphopt.tuning._latency import kernel_times_in_model

    libs = {"default": load_library(default), "tuned": load_library(tuned)}
    if copy is not None:
        libs[COPY] = load_library(copy)
    arrays = [np.asarray(v) for v in inputs.values()]
    times = kernel_times_in_model(libs, tvm.cpu(), arrays, names)

    def over_default(build: str) -> dict[str, float]:
        got = times.get(build, {})
        return {
            k: got[k] / times["default"][k]
            for k in sorted(names)
            if got.get(k) and times["default"].get(k)
        }

    return over_default("tuned"), over_default(COPY)


def _round_trip(when: str) -> float | None:
    """The core-to-core round trip now (``_placement``), printed with ``when``: measured
    right before each timing, as a point records it."""
    ns = core_to_core_ns()
    print(describe(ns, when), flush=True)
    return ns


def _retimed(name: str, path: Path, db: Path, work: Path, engines: dict, inputs: dict, opts):  # noqa: ANN001, ANN202, PLR0913
    """The curve of a finished database (``--retime``): one point at the largest budget,
    and its start, the same rounds' figures without the tuned build."""
    with open_database(db, resolve("x86")) as database:
        trials = sum(e.trials for e in database.entries())
    tuned, applied, kernels, aa = _timed_with(name, path, db, work, "retime", inputs)
    timed = {"tuned": tuned, **engines}
    round_trip = _round_trip("before timing")
    point = _point(opts.budgets[-1], trials, applied, timed, opts, kernels, aa)
    point.round_trip_ns = round_trip
    print(_kernel_lines(name, point))
    tuned.close()
    untuned = {k: v for k, v in point.ms.items() if k != "tuned"}
    return [Point(0.0, 0, 0, untuned), point]


def bench_model(name: str, work: Path, opts) -> Curve:  # noqa: ANN001
    """Tune ``name`` up to each budget; after each, time all engines together (with
    ``--retime``: time its finished database, no search)."""
    path = export_onnx(name)
    curve = Curve(name)
    engines, inputs = _engines(path, work, opts)
    db = Path(opts.db) / name if opts.db else work / f"{name}-db"
    if opts.retime:
        curve.points += _retimed(name, path, db, work, engines, inputs, opts)
        return curve
    curve.points.append(_point(0.0, 0, 0, engines, opts))
    spent = 0.0  # minutes of tuning so far (this run)
    start = time.monotonic()
    printer = ProgressPrinter(sys.stderr)

    def progress(p: dict) -> None:
        printer(p)
        if p["model_secs"] is not None:
            curve.estimate.append((spent + p["elapsed"] / 60, p["model_secs"] * 1e3))

    trials = 0
    for budget in opts.budgets:
        step = budget - spent
        if step <= 0:
            continue
        report = tune(
            path,
            "x86",
            db,
            time_budget=step * 60,
            space=opts.space,
            # its whole-model check decides whether compile applies the records; the
            # figures of the table are timed below, interleaved with the other engines
            measure_model=True,
            progress=progress,
            log=lambda m: print(f"  {m}", file=sys.stderr),
        )
        printer.close()
        spent = budget
        trials += report.new_trials
        print(f"\n### {name} after {budget:g} min\n\n```\n{format_report(report)}\n```")
        tuned, applied, kernels, aa = _timed_with(name, path, db, work, f"{budget:g}", inputs)
        timed = {"tuned": tuned, **engines}
        round_trip = _round_trip(f"before timing {budget:g} min")
        curve.points.append(_point(budget, trials, applied, timed, opts, kernels, aa))
        curve.points[-1].round_trip_ns = round_trip
        print(_kernel_lines(name, curve.points[-1]))
        timed["tuned"].close()
        ms = curve.points[-1].ms
        print(
            f"{name}: tuned {ms['tuned']:.3f} ms, default {ms['default']:.3f} ms after "
            f"{budget:g} min ({trials} trials)",
            file=sys.stderr,
        )
    print(f"# {name}: {(time.monotonic() - start) / 60:.1f} min in all", file=sys.stderr)
    return curve


def _kernel_lines(name: str, point: Point) -> str:
    """The applied records' kernels, each with its tuned/default inside model runs (and
    its A/A, the default's copy over the default, where timed)."""
    head = f"{name} after {point.minutes:g} min: "
    if not point.kernels:
        return head + f"{point.applied} record(s) used, no kernel timed inside the model"
    aa = point.kernels_aa
    rows = [
        f"  {k}: {r:.3f}" + (f" (A/A {aa[k]:.3f})" if k in aa else "")
        for k, r in sorted(point.kernels.items(), key=lambda x: -x[1])
    ]
    what = "tuned/default" + (" (A/A: default copy/default)" if aa else "")
    return head + f"each used record's kernel inside model runs, {what}:\n" + "\n".join(rows)


def _slowest(point: Point) -> str:
    """The largest tuned/default of the applied records' kernels inside model runs, and
    how many of them were timed where not all were (a used record whose kernel no model
    run called: the figure does not cover it); with the largest A/A of the same kernels
    where timed, the floor under that figure."""
    if not point.kernels:
        return "-" if not point.applied else f"({point.applied} not timed)"
    worst = f"{max(point.kernels.values()):.2f}"
    if point.kernels_aa:
        worst += f" (A/A {max(point.kernels_aa.values()):.2f})"
    timed = len(point.kernels)
    return worst if timed >= point.applied else f"{worst} ({timed} of {point.applied} timed)"


def _r(point: Point, engine: str) -> str:
    """Tuned's median round ratio to ``engine``, and the quartiles of the round ratios."""
    ratio = point.vs.get(engine)
    if not ratio:
        return "-"
    return _cell(ratio, *point.spread.get(engine, (ratio, ratio)))


def _aa(point: Point) -> str:
    """The default build's second copy over the first, as :func:`_r` writes a ratio."""
    return "-" if point.aa is None else _cell(*point.aa)


def _cell(ratio: float, low: float, high: float) -> str:
    return f"{ratio:.2f} ({low:.2f}-{high:.2f})"


def table(curves: list[Curve]) -> str:
    rows = [
        "| model | budget min | trials | records used | tuned ms | default ms | ORT ms "
        "| OpenVINO ms | tuned/default | A/A | slowest kernel | tuned/ORT | tuned/OpenVINO |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in curves:
        for p in c.points[1:]:
            ms = p.ms
            ov = f"{ms['openvino']:.3f}" if "openvino" in ms else "-"
            rows.append(
                f"| {c.name} | {p.minutes:g} | {p.trials} | {p.applied} | {ms['tuned']:.3f} "
                f"| {ms['default']:.3f} | {ms['ort']:.3f} | {ov} "
                f"| {_r(p, 'default')} | {_aa(p)} | {_slowest(p)} | {_r(p, 'ort')} "
                f"| {_r(p, 'openvino')} |"
            )
    return "\n".join(rows)


def plot(curves: list[Curve], png: Path) -> None:
    """Latency over tuning time, one panel per model: every engine as timed at each point
    (so load drifting during the run moves them all alike), and the search's estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, c in zip(axes[0], curves, strict=True):
        xs = [p.minutes for p in c.points]
        tuned = [p.ms.get("tuned", p.ms["default"]) for p in c.points]
        ax.plot(xs, tuned, "o-", linewidth=2, label="graphopt tuned")
        for key, label, style in (
            ("default", "graphopt default", "--"),
            ("ort", "onnxruntime", "-."),
            ("openvino", "OpenVINO f32", ":"),
        ):
            if all(key in p.ms for p in c.points):
                ax.plot(xs, [p.ms[key] for p in c.points], style, linewidth=1, label=label)
        if c.estimate:
            ex, ey = zip(*c.estimate, strict=True)
            ax.plot(ex, ey, ".", markersize=2, color="gray", label="search estimate (kernels)")
        ax.set_title(c.name)
        ax.set_xlabel("tuning time (min)")
        ax.set_ylabel("latency (ms)")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# --- --retime --processes N: the same retime in N fresh processes ------------------------
# the summary's ratio columns: (the engine of Point.vs that tuned is over, heading)
_ACROSS = (("ort", "tuned/ORT"), ("openvino", "tuned/OpenVINO"), ("default", "tuned/default"))


def _dump(curves: list[Curve], path: Path) -> None:
    """One process's retimed points (``--json``), for the parent of ``--processes``."""
    path.write_text(json.dumps({c.name: dataclasses.asdict(c.points[-1]) for c in curves}))


def _spread_cell(values: list[float]) -> str:
    """The median of the processes' figures, with the lowest and highest."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def across_processes(runs: list[dict]) -> str:
    """The summary of ``--processes``: per model, the median over the processes of each
    process's own figure (itself the median of its rounds' ratios), the lowest and the
    highest, and every process's tuned/ORT with the round trip measured before its timing
    (below ``_placement.SHARED_BELOW_NS``: the two vCPUs shared a cache)."""
    rows = [
        "| model | processes | " + " | ".join(h for _, h in _ACROSS) + " | A/A "
        "| tuned/ORT by process (round trip) |",
        "|---|---|" + "---|" * (len(_ACROSS) + 2),
    ]
    names = list(dict.fromkeys(m for run in runs for m in run))
    for name in names:
        got = [run[name] for run in runs if name in run]
        cells = []
        for engine, _ in _ACROSS:
            values = [p["vs"][engine] for p in got if p["vs"].get(engine)]
            cells.append(_spread_cell(values) if values else "-")
        aa = [p["aa"][0] for p in got if p.get("aa")]
        cells.append(_spread_cell(aa) if aa else "-")
        each = []
        for p in got:
            ns = p.get("round_trip_ns")
            trip = "not measured" if ns is None else f"{ns:.0f} ns"
            ort = p["vs"].get("ort")
            each.append(f"{'-' if ort is None else f'{ort:.2f}'} ({trip})")
        rows.append(f"| {name} | {len(got)} | " + " | ".join(cells) + f" | {', '.join(each)} |")
    return "\n".join(rows)


def _in_processes(argv: list[str], n: int) -> int:
    """Run this script's ``--retime`` (``argv`` without ``--processes``) in ``n`` fresh
    processes, one after the other, their output passed through; then the summary."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-tuning-runs-") as tmp:
        for i in range(n):
            out = Path(tmp) / f"{i}.json"
            print(f"\n# process {i + 1} of {n}", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--json", str(out)]
            done = subprocess.run(cmd, check=False)  # noqa: S603 - this script, its own args
            if done.returncode != 0 or not out.exists():
                print(f"# process {i + 1} failed (exit {done.returncode})", file=sys.stderr)
                return done.returncode or 1
            runs.append(json.loads(out.read_text()))
    print(f"\n## over {n} fresh processes (each: the median of its rounds' ratios)\n")
    print(across_processes(runs))
    return 0


def _without_processes(argv: list[str]) -> list[str]:
    """``argv`` without ``--processes N`` or ``--processes=N``: a child's arguments."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budgets", default="5,15,30", help="minutes, cumulative (default 5,15,30)")
    ap.add_argument("--space", default="both", choices=("generic", "graphopt", "both"))
    ap.add_argument("--threads", type=int, help="threads for every engine (default: all cores)")
    ap.add_argument("--db", help="keep the databases in DB/<model> (resumable)")
    ap.add_argument("--png", default="tuning_curve.png")
    ap.add_argument("--block", type=float, default=2.0, help="seconds per timing block")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved blocks per engine")
    ap.add_argument(
        "--retime", action="store_true", help="time the finished databases in --db, no search"
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="with --retime: in this many fresh processes, then their medians (default 1)",
    )
    ap.add_argument("--json", help=argparse.SUPPRESS)  # a --processes child's points
    opts = ap.parse_args()
    if opts.retime and not opts.db:
        ap.error("--retime times the databases in --db: name it")
    if opts.processes < 1 or (opts.processes > 1 and not opts.retime):
        ap.error("--processes N (N >= 1) goes with --retime")
    missing = missing_extra()
    if missing:
        print(f"needs the bench extra: {missing}", file=sys.stderr)
        return 2
    if opts.processes > 1:
        return _in_processes(_without_processes(sys.argv[1:]), opts.processes)
    opts.budgets = sorted(float(b) for b in opts.budgets.split(","))
    opts.threads = set_threads(opts.threads)
    # Models, artifacts and (without --db) the databases: about 1 GB per model, removed
    # at the end; --db keeps the databases.
    work = Path(tempfile.mkdtemp(prefix="bench-tuning-"))
    print(f"# bench_tuning {datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu_name()}")
    print(f"# {opts.threads} thread(s), space {opts.space}, budgets {opts.budgets} min")
    print(f"# {placement_line('before')}", flush=True)  # the host's CPU placement
    try:
        curves = [bench_model(name, work, opts) for name in opts.models.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table(curves))
    if opts.json:
        _dump(curves, Path(opts.json))
    plot(curves, Path(opts.png))
    print(f"\ncurve: {opts.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
