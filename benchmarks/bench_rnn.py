"""Latency of three recurrent models: onnxruntime, torch eager and graphopt, in one run.

    python benchmarks/bench_rnn.py [--repeat 50] [--models lstm_classifier,gru_tagger,crnn]

The same torch module (fixed seed) is exported to ONNX for onnxruntime
(``torch.onnx.export(dynamo=False)``), run eagerly by torch, and compiled by graphopt
straight from torch (``graphopt.from_torch``; verified against torch eager as it
compiles). Prints the machine, then a markdown table of median latencies (ms) and
graphopt's ratio to each engine (ratio > 1 means graphopt is slower). Batch 1, fp32,
every engine with its default threads, the same seeded inputs for all.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_zoo import cpu_name, timed  # noqa: E402

import graphopt  # noqa: E402
from graphopt.zoo_torch import CRNN, GRUTagger, LSTMClassifier  # noqa: E402

# name -> (module factory, example input factory), batch 1
MODELS = {
    "lstm_classifier": (LSTMClassifier, lambda g: torch.randint(0, 1000, (1, 32), generator=g)),
    "gru_tagger": (GRUTagger, lambda g: torch.randint(0, 5000, (1, 32), generator=g)),
    "crnn": (CRNN, lambda g: torch.randn(1, 1, 32, 128, generator=g)),
}


def onnx_session(module: nn.Module, example: torch.Tensor, name: str) -> ort.InferenceSession:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, input_names=[name])
    return ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])


def bench(name: str, repeat: int, workdir: Path) -> dict:
    torch.manual_seed(0)
    make_module, make_input = MODELS[name]
    module = make_module().eval()
    example = make_input(torch.Generator().manual_seed(0))
    start = time.perf_counter()
    source = graphopt.from_torch(module, example)
    import_s = time.perf_counter() - start
    inputs = source.example_inputs
    (input_name,) = inputs
    sess = onnx_session(module, example, input_name)
    expected = source.reference(inputs)["out0"]
    np.testing.assert_allclose(sess.run(None, inputs)[0], expected, rtol=1e-3, atol=1e-4)
    # torch and onnxruntime first: TVM's thread pool, once started, competes for the cores.
    row = {"model": name, "ort_ms": timed(lambda: sess.run(None, inputs), repeat)}
    with torch.inference_mode():
        row["torch_ms"] = timed(lambda: module(example), repeat)
    start = time.perf_counter()
    artifact = graphopt.compile(source, "x86", workdir / f"{name}.so")
    row["compile_s"] = import_s + time.perf_counter() - start  # from_torch + compile
    row["graphopt_ms"] = artifact.benchmark(inputs, repeat=repeat)["median_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--workdir", default="/tmp/graphopt-bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# graphopt RNN benchmark, {datetime.date.today()}")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
    )
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), graphopt {graphopt.__version__}, "
        f"repeat {args.repeat}, batch 1, fp32, median latency"
    )
    print()
    print(
        "| model | onnxruntime ms | torch eager ms | graphopt ms | graphopt/ORT | graphopt/torch "
        "| compile+verify s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        r = bench(name, args.repeat, workdir)
        print(
            f"| {name} | {r['ort_ms']:.2f} | {r['torch_ms']:.2f} | {r['graphopt_ms']:.2f} | "
            f"{r['graphopt_ms'] / r['ort_ms']:.2f}x | {r['graphopt_ms'] / r['torch_ms']:.2f}x | "
            f"{r['compile_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
