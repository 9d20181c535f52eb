"""Compile every zoo model for this machine's GPU, check it, and time it against torch.

    python benchmarks/gpu_check.py [--models resnet18,small_cnn] [--repeat 20]
                                   [--precision fp32|fp16|bf16]

Prints the GPU, then a markdown table per model: graphopt's max |diff| to the reference,
the median latency of torch eager and graphopt (ms, inputs already on the device), and
graphopt/torch (> 1 means graphopt is slower). The reference is torch eager on CUDA when
this torch build has CUDA; otherwise onnxruntime on the CPU (said so in the output, and
the latency column is then left empty). Each artifact is also verified against
onnxruntime as it compiles. ``--precision fp16`` (sm_70+) or ``bf16`` (sm_80+) compiles
convs and matmuls for tensor cores (``graphopt.compile(..., precision=...)``); the
compile-time check then uses that precision's tolerances, and the table's max abs diff is
still against the fp32 reference. The whole zoo takes about a minute or two. Exits with status
2 and one line on stderr where there is no CUDA GPU or no nvcc.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402
from graphopt.targets import TargetSpec, cuda  # noqa: E402


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def torch_cuda():  # noqa: ANN201 - the torch module, or None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def time_torch(torch, fn, inputs: dict, repeat: int) -> tuple[float, list]:  # noqa: ANN001
    inputs = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}  # like graphopt's
    for _ in range(3):
        out = fn(**inputs)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(**inputs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, [o.cpu().numpy() for o in out]


def check(  # noqa: PLR0913
    name: str,
    arch: str,
    repeat: int,
    workdir: Path,
    torch,
    *,
    precision: str = "fp32",  # noqa: ANN001
) -> dict:
    model = zoo.build(name)
    start = time.perf_counter()
    artifact = graphopt.compile(
        model,
        TargetSpec("cuda", {"kind": "cuda", "arch": arch}),
        workdir / f"{name}-{precision}.so",
        precision=precision,
    )
    row = {"model": name, "compile_s": time.perf_counter() - start}
    inputs = artifact.random_inputs(seed=0)
    ours = list(artifact.run(inputs).values())
    row["graphopt_ms"] = artifact.benchmark(inputs, repeat=repeat)["median_ms"]
    row["torch_ms"] = None
    expected = None
    if torch is not None:
        from _onnx_torch import Unsupported, build

        try:
            fn = build(model, device="cuda")
            with torch.no_grad():
                row["torch_ms"], expected = time_torch(torch, fn, inputs, repeat)
        except Unsupported as exc:
            row["note"] = f"torch: {exc}"
    if expected is None:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = sess.run(None, inputs)
        row["reference"] = "onnxruntime-cpu"
    else:
        row["reference"] = "torch-cuda"
    row["max_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(ours, expected, strict=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(zoo.ZOO))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="what convs/matmuls compute in (fp16: sm_70+, bf16: sm_80+); default fp32",
    )
    args = parser.parse_args()

    arch = cuda.local_arch()
    if arch is None:
        fail("no CUDA GPU (or no NVIDIA driver) on this machine: gpu_check needs one")
    if cuda.nvcc_path() is None:
        fail("nvcc not found: install the CUDA toolkit or put its bin/ on PATH")

    import tvm

    torch = torch_cuda()
    print(
        f"# graphopt GPU check: {tvm.cuda(0).device_name} ({arch}), graphopt "
        f"{graphopt.__version__}, TVM {tvm.__version__}"
    )
    if torch is None:
        print("torch has no CUDA here: comparing against onnxruntime on the CPU, no torch timing")
    else:
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    print(
        f"batch 1, graphopt in {args.precision} (reference fp32), median of {args.repeat} "
        "runs, inputs on the device\n"
    )
    print(
        "| model | reference | max abs diff | torch eager ms | graphopt ms | graphopt/torch "
        "| compile s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="graphopt-gpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.models.split(","):
        try:
            r = check(name, arch, args.repeat, workdir, torch, precision=args.precision)
        except GraphoptError as exc:
            failed += 1
            print(f"| {name} | FAILED: {exc} | | | | | |", flush=True)
            continue
        t, ours = r["torch_ms"], r["graphopt_ms"]
        torch_ms = f"{t:.3f}" if t else "n/a"
        ratio = f"{ours / t:.2f}x" if t else "n/a"
        print(
            f"| {name} | {r['reference']} | {r['max_diff']:.2g} | {torch_ms} | {ours:.3f} | "
            f"{ratio} | {r['compile_s']:.1f} |",
            flush=True,
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
