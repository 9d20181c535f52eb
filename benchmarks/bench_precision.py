"""graphopt fp32 / bf16 against OpenVINO f32 / bf16 and onnxruntime fp32 (issue #17).

    python benchmarks/bench_precision.py [--models resnet18,resnet50] [--threads N]
                                         [--block 1.0] [--rounds 3]

Prints the CPU's bf16 features (AVX512-BF16, AMX-BF16 from /proc/cpuinfo), then one
markdown row per model: median latency (ms) of each engine, interleaved blocks as in
``bench_public.py``, and graphopt bf16 / OpenVINO bf16 (the issue's bar: <= 1.3), the
median of the rounds' own ratios (``bench_public.paired_ratios``), so a load that drifts
across a run moves both sides of each ratio alike. Each
graphopt artifact is verified against onnxruntime as it compiles (bf16 with the bf16
tolerances); the max |diff| of each bf16 engine to onnxruntime fp32 is printed too. A
CPU with neither bf16 feature prints so and measures fp32 only. Needs the ``bench`` extra
(torchvision, openvino); ratios > 1 mean graphopt is slower.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_public as bp  # noqa: E402

BAR = 1.3  # bf16 graphopt / OpenVINO bf16


def bf16_features() -> list[str]:
    """The bf16 instruction sets /proc/cpuinfo lists (empty when none, or not Linux)."""
    from graphopt.targets._cpu import host_cpu_flags

    flags = host_cpu_flags() or set()
    return [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def _max_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float32) - ref)))


def bench_model(name: str, opts: argparse.Namespace, workdir: Path, bf16: bool) -> dict:
    import _public_models as pm

    import graphopt

    path = pm.export_onnx(name)
    session = bp.ort_session(path, opts.threads)
    inputs = bp.seeded_inputs(session)
    ref = session.run(None, inputs)[0]
    engines = {"ORT fp32": bp.CallEngine(lambda: session.run(None, inputs))}
    row: dict = {"model": name, "notes": []}
    for precision in ("fp32", "bf16") if bf16 else ("fp32",):
        start = time.perf_counter()
        art = graphopt.compile(path, "x86", workdir / f"{name}-{precision}.so", precision=precision)
        row[f"compile {precision}"] = time.perf_counter() - start
        row[f"diff graphopt {precision}"] = _max_diff(art.run(inputs)[art.output_names[0]], ref)
        engines[f"graphopt {precision}"] = bp.GraphoptEngine(art, inputs)
    for hint in ("f32", "bf16") if bf16 else ("f32",):
        request = bp.openvino_request(path, opts.threads, inputs, hint)
        if request is None:
            row["notes"].append("OpenVINO not installed")
            break
        request.infer()
        row[f"diff OpenVINO {hint}"] = _max_diff(request.get_output_tensor(0).data, ref)
        engines[f"OpenVINO {hint}"] = bp.CallEngine(request.infer)
    figures = bp.interleaved_rounds(engines, opts.block, opts.rounds)
    row.update(bp.medians(figures))
    if "graphopt bf16" in figures and "OpenVINO bf16" in figures:
        row["paired"] = bp.paired_ratios(figures, "graphopt bf16")["OpenVINO bf16"]
    for engine in engines.values():
        engine.close()
    return row


COLUMNS = ["graphopt fp32", "graphopt bf16", "ORT fp32", "OpenVINO f32", "OpenVINO bf16"]


def print_row(row: dict) -> None:
    cells = [f"{row[c]:.2f}" if c in row else "-" for c in COLUMNS]
    ratio = row.get("paired")
    verdict = "-"
    if ratio is not None:
        verdict = f"{ratio:.2f}x ({'meets' if ratio <= BAR else 'misses'} <= {BAR})"
    print(f"| {row['model']} | " + " | ".join(cells) + f" | {verdict} |")
    diffs = ", ".join(f"{k[5:]} {v:.3g}" for k, v in row.items() if k.startswith("diff "))
    print(f"<!-- {row['model']}: max |diff| to ORT fp32: {diffs}; {'; '.join(row['notes'])} -->")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--block", type=float, default=1.0, help="seconds per timing block")
    p.add_argument("--rounds", type=int, default=3)
    opts = p.parse_args(argv)
    opts.threads = bp.set_threads(opts.threads)
    feats = bf16_features()
    print(f"machine: {bp.cpu_name()}; bf16 features: {', '.join(feats) or 'none'}")
    bf16 = "avx512_bf16" in feats or "amx_bf16" in feats
    if not bf16:
        print("this CPU has neither avx512_bf16 nor amx_bf16: bf16 skipped, fp32 only")
    print(
        f"{opts.threads} thread(s) per engine, median ms; "
        "last column: graphopt bf16 / OpenVINO bf16, median of the rounds' ratios"
    )
    print("| model | " + " | ".join(COLUMNS) + " | bf16 vs OpenVINO |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.models.split(","):
            print_row(bench_model(name.strip(), opts, Path(tmp), bf16))


if __name__ == "__main__":
    main()
