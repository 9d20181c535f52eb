"""Tuning on this machine: trials per minute, where the time goes, and what it buys.

    python benchmarks/bench_tuning.py [--models small_cnn,resnet18] [--time-budget 10m]
                                      [--trials N] [--db DIR] [--repeat 20]

For each model: ``graphopt.tuning.tune`` with the stated budget (per model) into a fresh
database (or ``--db`` to resume one), then in one run, on the same seeded inputs, the
median latency of onnxruntime, the artifact with default schedules and the artifact with
the database. Prints trials/minute with the split search / build / measure, then one
markdown table. Ratios > 1 mean the second engine is slower.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_zoo import timed  # noqa: E402

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.tuning import ProgressPrinter, format_report, tune  # noqa: E402


def ort_ms(path: Path, inputs: dict, repeat: int) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return timed(lambda: sess.run(None, inputs), repeat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small_cnn,resnet18")
    ap.add_argument("--time-budget", default="10m", help="per model (default 10m)")
    ap.add_argument("--trials", type=int, help="per model, instead of / with the time budget")
    ap.add_argument("--db", help="database directory per model: DB/<model> (default: fresh)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tuning-"))
    print(f"# bench_tuning {datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs,")
    print(f"# budget per model: time {args.time_budget}, trials {args.trials or 'unlimited'}")
    rows = []
    for name in args.models.split(","):
        path = work / f"{name}.onnx"
        onnx.save(zoo.build(name), path)
        db = Path(args.db) / name if args.db else work / f"{name}-db"
        report = tune(
            path,
            "x86",
            db,
            trials=args.trials,
            time_budget=args.time_budget,
            progress=ProgressPrinter(sys.stderr),
            log=lambda m: print(f"  {m}", file=sys.stderr),
        )
        print(f"\n## {name}\n\n```\n{format_report(report)}\n```")
        t = report.timing
        tuning_s = t["search"] + t["build"] + t["measure"]
        rate = report.new_trials / (tuning_s / 60) if tuning_s else 0.0
        print(
            f"{report.new_trials} trials, {rate:.1f} trials/min of tuning time "
            f"(search {t['search']:.0f} s, build {t['build']:.0f} s, "
            f"measure {t['measure']:.0f} s; default-schedule baselines {t['baseline']:.0f} s)"
        )
        default = graphopt.compile(path, "x86", work / f"{name}.so")
        tuned = graphopt.compile(path, "x86", work / f"{name}-tuned.so", tuning_db=db)
        inputs = default.random_inputs(0)
        hits = len(tuned.manifest["tuning"]["from_database"])
        kernels = hits + len(tuned.manifest["tuning"]["default"])
        rows.append(
            (
                name,
                ort_ms(path, {k: np.asarray(v) for k, v in inputs.items()}, args.repeat),
                default.benchmark(inputs, args.repeat)["median_ms"],
                tuned.benchmark(inputs, args.repeat)["median_ms"],
                f"{hits}/{kernels}",
                report.new_trials,
            )
        )
    print(
        "\n| model | onnxruntime ms | default ms | tuned ms | tuned kernels | trials "
        "| default/tuned | tuned/ORT |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, o, d, tu, hits, trials in rows:
        print(
            f"| {name} | {o:.3f} | {d:.3f} | {tu:.3f} | {hits} | {trials} | {d / tu:.2f} "
            f"| {tu / o:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
