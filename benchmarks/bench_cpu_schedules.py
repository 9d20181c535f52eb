"""Side-by-side latency of graphopt's x86 artifacts and onnxruntime, one process.

    python benchmarks/bench_cpu_schedules.py [model ...] [--repeat N]

Prints compile seconds, graphopt and onnxruntime median latency, and their ratio. Both
run in this process on the same inputs, alternating, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort

import graphopt
from graphopt.zoo import ZOO, build


def _ort_times(session: ort.InferenceSession, inputs: dict, repeat: int) -> list[float]:
    session.run(None, inputs)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["resnet18", "mobilenetv2", "small_cnn"])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    for name in args.models or list(ZOO):
        model = build(name)
        start = time.perf_counter()
        art = graphopt.compile(model, "x86")
        compile_s = time.perf_counter() - start
        inputs = art.random_inputs()
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        ours, theirs = [], []
        for _ in range(3):  # alternate so drifting load hits both
            ours.append(art.benchmark(inputs, repeat=args.repeat)["median_ms"])
            theirs.append(statistics.median(_ort_times(session, inputs, args.repeat)))
        g, o = statistics.median(ours), statistics.median(theirs)
        print(
            f"{name:14s} compile {compile_s:6.1f}s  graphopt {g:8.3f} ms  "
            f"onnxruntime {o:8.3f} ms  ratio {g / o:5.2f}x",
            flush=True,
        )
    np.random.seed(0)


if __name__ == "__main__":
    main()
