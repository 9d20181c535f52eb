"""Latency of every zoo CNN: onnxruntime, torch eager and graphopt, side by side in one run.

    python benchmarks/bench_zoo.py [--rounds 7] [--block 0.5] [--models resnet18,small_cnn]
                                   [--against REV]

Prints the machine, then a markdown table: median latency of each engine (ms) and
graphopt's ratio to each (ratio > 1 means graphopt is slower). All engines use their
defaults for threads on this machine; inputs are the same seeded arrays for all.
Each graphopt artifact is verified against onnxruntime as it compiles.

Timing is ``bench_public.py``'s: the engines take turns in ``--rounds`` rounds of one
``--block``-second block each; an engine's figure is the median of its blocks' median
latencies, a ratio the median of the rounds' own ratios (the VM's speed changes from
minute to minute; two blocks of one round see the same speed).

``--against REV`` (a git revision of this repository, e.g. the commit an issue was filed
on) adds a column: the zoo compiled by the code at REV (checked out in a temporary git
worktree, compiled in a subprocess with that tree first on ``sys.path``) and timed in the
same rounds, so "is any zoo model slower than it was" is answered on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_public import (  # noqa: E402
    CallEngine,
    GraphoptEngine,
    cpu_name,
    interleaved_rounds,
    medians,
    paired_ratios,
)

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402


def model_flops(name: str) -> float:
    """FP32 FLOPs of one inference: 2 * multiply-adds of Conv, Gemm and MatMul."""
    from graphopt.frontends.onnx import onnx_to_graph

    g = onnx_to_graph(zoo.build(name))
    total = 0
    for n in g.nodes():
        out = g.values[n.outputs[0]].shape
        if n.op_type == "Conv":
            w = g.values[n.inputs[1]].shape  # (O, I/groups, kh, kw)
            total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            a = g.values[n.inputs[0]].shape
            k = a[0] if n.op_type == "Gemm" and n.attrs.get("transA", 0) else a[-1]
            total += 2 * int(np.prod(out)) * int(k)
    return float(total)


def fp32_peak_gflops() -> tuple[float, str]:
    """The machine's FP32 peak, measured: an FMA loop that never touches memory.

    Why measured: a clock from /proc/cpuinfo is the nominal one (2.6 GHz on this
    project's machine) while the cores boost well above it; a peak computed from it is
    exceeded by onnxruntime. Every thread TVM uses runs independent chains of
    ``acc = acc * x + x`` one SIMD register wide, as many as a conv tile's accumulators
    (``max_reg_n``: 28 with AVX-512's 32 registers, 12 with AVX2's 16), enough to cover
    FMA latency on every pipe, so the loop runs at the FMA issue rate. (A fixed 24 chains
    spilled to the stack on AVX2 and measured a third of the peak.)
    """
    import tvm
    from tvm.script import tirx as T

    from graphopt.targets import resolve
    from graphopt.targets._cpu_schedules import max_reg_n, vector_lanes
    from graphopt.targets._runner import use_all_cores

    threads = use_all_cores()
    target = tvm.target.Target(resolve("x86").tvm)
    lanes = vector_lanes(target)
    acc_n, steps, chunks = max_reg_n(target), 20000, threads * 8

    @T.prim_func
    def fma(x: T.Buffer((lanes,), "float32"), out: T.Buffer((chunks, acc_n, lanes), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for p in T.parallel(chunks):
            acc = T.alloc_buffer((acc_n, lanes), "float32", scope="local")
            for a in T.unroll(acc_n):
                for v in T.vectorized(lanes):
                    acc[a, v] = T.float32(a)
            for _k in range(steps):
                for a in T.unroll(acc_n):
                    for v in T.vectorized(lanes):
                        acc[a, v] = acc[a, v] * x[v] + x[v]
            for a in T.unroll(acc_n):
                for v in T.vectorized(lanes):
                    out[p, a, v] = acc[a, v]

    dev = tvm.cpu()
    x = tvm.runtime.tensor(np.full(lanes, 0.5, "float32"), dev)
    out = tvm.runtime.tensor(np.zeros((chunks, acc_n, lanes), "float32"), dev)
    run = tvm.compile(fma, target).jit().time_evaluator("main", dev, number=5, repeat=5)
    seconds = min(run(x, out).results)
    peak = 2.0 * chunks * acc_n * lanes * steps / seconds / 1e9
    return peak, f"measured: {threads} threads x {acc_n} chains of {lanes}-lane FMA"


_COMPILE_AT_REV = """
import sys
import graphopt
from graphopt import zoo
for name in sys.argv[2].split(","):
    graphopt.compile(zoo.build(name), "x86", f"{sys.argv[1]}/{name}.so")
"""


def compile_at(rev: str, names: list[str], out: Path) -> Path:
    """The zoo models ``names`` compiled by the code at git revision ``rev``, as
    ``out/<name>.so``; that revision is checked out in a temporary worktree."""
    repo = Path(__file__).resolve().parents[1]
    out.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix="bench-zoo-rev-")) / "tree"
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        cmd = [sys.executable, "-c", _COMPILE_AT_REV, str(out), ",".join(names)]
        subprocess.run(cmd, check=True, cwd=tree, env=env)
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)
    return out


def bench(
    name: str, block_s: float, rounds: int, workdir: Path, against: Path | None = None
) -> dict:
    model = zoo.build(name)
    start = time.perf_counter()
    artifact = graphopt.compile(model, "x86", workdir / f"{name}.so")
    compile_s = time.perf_counter() - start
    inputs = artifact.random_inputs(seed=0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    row = {"model": name, "compile_s": compile_s, "torch_ms": None, "vs_torch": None}
    engines = {
        "graphopt": GraphoptEngine(artifact, inputs),
        "ORT": CallEngine(lambda: sess.run(None, inputs)),
    }
    if against is not None:
        import tvm

        from graphopt.targets._profile import main_call
        from graphopt.targets._runner import load_library

        lib = load_library(against / f"{name}.so")  # any graphopt version's artifact
        engines["REV"] = CallEngine(main_call(lib, tvm.cpu(), list(inputs.values())))
    try:
        from _onnx_torch import Unsupported, build

        try:
            fn = build(model)
            ref = sess.run(None, inputs)[0]
            np.testing.assert_allclose(fn(**inputs)[0].numpy(), ref, rtol=1e-3, atol=1e-3)
            engines["torch"] = CallEngine(lambda: fn(**inputs))
        except Unsupported:
            pass
    except ImportError:
        pass
    figures = interleaved_rounds(engines, block_s, rounds)
    paired, ms = paired_ratios(figures, "graphopt"), medians(figures)
    row["graphopt_ms"], row["ort_ms"], row["vs_ort"] = ms["graphopt"], ms["ORT"], paired["ORT"]
    if "torch" in figures:
        row["torch_ms"], row["vs_torch"] = ms["torch"], paired["torch"]
    if "REV" in figures:
        row["vs_rev"] = paired["REV"]
    artifact.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block", type=float, default=0.5, help="seconds per block")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="resnet18,mobilenetv2,small_cnn")
    parser.add_argument("--workdir", default="/tmp/graphopt-bench")
    parser.add_argument("--against", metavar="REV", help="also time the zoo as REV compiled it")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    against = None
    if args.against:
        against = compile_at(args.against, names, workdir / f"at-{args.against}")
    print(f"# graphopt zoo benchmark, {datetime.date.today()}")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
    )
    print(
        f"onnxruntime {ort.__version__}, graphopt {graphopt.__version__}, batch 1, fp32; "
        f"interleaved {args.block:g} s blocks, median of {args.rounds} rounds; ratio: median "
        "of the rounds' ratios"
    )
    print()
    rev = f" graphopt/{args.against} |" if against else ""
    print(
        "| model | onnxruntime ms | torch eager ms | graphopt ms | graphopt/ORT | graphopt/torch "
        f"|{rev} compile+verify s |"
    )
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if against else "") + "---:|")
    rows = []
    for name in names:
        r = bench(name, args.block, args.rounds, workdir, against)
        rows.append(r)
        torch_ms = f"{r['torch_ms']:.2f}" if r["torch_ms"] else "n/a"
        vs_torch = f"{r['vs_torch']:.2f}x" if r["vs_torch"] else "n/a"
        vs_rev = f" {r['vs_rev']:.2f}x |" if against else ""
        print(
            f"| {name} | {r['ort_ms']:.2f} | {torch_ms} | {r['graphopt_ms']:.2f} | "
            f"{r['vs_ort']:.2f}x | {vs_torch} |{vs_rev} {r['compile_s']:.1f} |",
            flush=True,
        )
    peak, how = fp32_peak_gflops()
    print()
    print(f"FP32 peak: {peak:.0f} GFLOP/s ({how})")
    for r in rows:
        gflop = model_flops(r["model"]) / 1e9
        print(
            f"{r['model']}: {gflop:.2f} GFLOP per inference; graphopt "
            f"{gflop / (r['graphopt_ms'] / 1e3):.1f} GFLOP/s "
            f"({100 * gflop / (r['graphopt_ms'] / 1e3) / peak:.0f}% of peak), onnxruntime "
            f"{gflop / (r['ort_ms'] / 1e3):.1f} GFLOP/s"
        )


if __name__ == "__main__":
    main()
