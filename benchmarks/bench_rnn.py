"""Issue 16's recurrent and small models: graphopt vs onnxruntime vs OpenVINO f32, one process.

    python benchmarks/bench_rnn.py                          # the five models + T sweep
    python benchmarks/bench_rnn.py --models lstm_classifier,tiny_cnn --quick
    python benchmarks/bench_rnn.py --markdown rnn.md        # also write the tables
    python benchmarks/bench_rnn.py --recurrence steps       # one kernel per time step
    python benchmarks/bench_rnn.py --recurrence unrolled    # every step as primitive ops
    python benchmarks/bench_rnn.py --serial-steps           # recurrent GEMVs on one core

Models (``graphopt.zoo_torch``, seeded weights, batch 1, fp32): an LSTM text classifier
(embedding, 2-layer LSTM 256, last step, linear; 32 tokens), a bidirectional GRU tagger, a
CRNN (conv blocks, then a bidirectional LSTM over the image width), a 2-layer Elman (tanh)
RNN and a 3-conv 32x32 CNN. Each is exported once to ONNX (``torch.onnx.export``,
``dynamo=False``), and all three engines run that file on the same inputs; graphopt
compiles it for x86 with default schedules and verification against onnxruntime.

Timing uses ``benchmarks/bench_public.py``'s interleaving: ``--block``-second blocks (1 s;
0.2 s with ``--quick``), each engine's figure the median over ``--rounds`` (3) of its block
medians; OpenVINO with {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}.

Also printed:
- the LSTM classifier at T = 8, 32, 128, 512 tokens (``--sweep``), with graphopt's cost
  per time step from the slope between the two longest (it should not grow with T);
- per recurrent layer kernel, graphopt's time per step (``graphopt.profiling.profile``:
  each kernel alone; a sequence kernel's time divided by its steps, a step kernel's per
  call);

``--recurrence`` picks how the x86 target compiles a recurrent layer: ``sequence`` (the
default: one ``graphopt::RNNSequence`` kernel, the time loop inside it), ``steps`` (one
``graphopt::RNNStep`` kernel per step) or ``unrolled`` (every step as primitive ops).
- the per-call overhead line (``graphopt.profiling.call_overhead``).

Ratios above 1 mean graphopt is slower. On a shared machine, compare the ratios (measured
side by side, interleaved), not the absolute times.
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_public import (  # noqa: E402
    QUICK_BLOCK_S,
    CallEngine,
    GraphoptEngine,
    Row,
    _error_line,
    _openvino_version,
    add_openvino,
    cpu_name,
    geomean,
    interleaved,
    ort_session,
    set_threads,
)

__all__ = ["MODELS", "main"]


def _tokens(vocab: int, length: int):  # noqa: ANN202 - a torch tensor factory
    def make(gen):  # noqa: ANN001, ANN202
        import torch

        return torch.randint(0, vocab, (1, length), generator=gen)

    return make


def _floats(*shape: int):  # noqa: ANN202
    def make(gen):  # noqa: ANN001, ANN202
        import torch

        return torch.randn(*shape, generator=gen)

    return make


# name -> (graphopt.zoo_torch class, its keyword arguments, example input factory)
MODELS = {
    "lstm_classifier": ("LSTMClassifier", {}, _tokens(1000, 32)),
    "gru_tagger": ("GRUTagger", {}, _tokens(5000, 32)),
    "crnn": ("CRNN", {}, _floats(1, 1, 32, 128)),
    "elman_rnn": ("ElmanRNN", {}, _floats(1, 32, 64)),
    "tiny_cnn": ("TinyCNN", {}, _floats(1, 3, 32, 32)),
}
SWEEP = (8, 32, 128, 512)
STEPS = {"lstm_classifier": 32, "gru_tagger": 32, "crnn": 32, "elman_rnn": 32}  # time steps
RECURRENCE = {  # --recurrence: (description, expand-rnn options)
    "sequence": ("one kernel per layer (the default)", {"sequence": True, "fuse_steps": False}),
    "steps": ("one kernel per time step", {"sequence": False, "fuse_steps": True}),
    "unrolled": ("every step as primitive ops", {"sequence": False, "fuse_steps": False}),
}


def export(name: str, workdir: Path, length: int | None = None) -> tuple[Path, dict]:
    """The model as an ONNX file in ``workdir`` and its seeded inputs (numpy)."""
    import torch

    from graphopt import zoo_torch

    cls, kwargs, make_input = MODELS[name]
    if length is not None:
        make_input = _tokens(1000, length)
    torch.manual_seed(0)
    module = getattr(zoo_torch, cls)(**kwargs).eval()
    example = make_input(torch.Generator().manual_seed(0))
    path = workdir / f"{name}{'' if length is None else f'_t{length}'}.onnx"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["input"])
    path.write_bytes(buf.getvalue())
    return path, {"input": example.numpy()}


def bench(label: str, path: Path, inputs: dict, opts: argparse.Namespace) -> tuple[Row, object]:
    """One row: the three engines on ``path``, interleaved; and graphopt's artifact."""
    import graphopt

    row = Row(label)
    session = ort_session(path, opts.threads)
    engines = {"ORT": CallEngine(lambda: session.run(None, inputs))}
    artifact = None
    try:
        start = time.perf_counter()
        artifact = graphopt.compile(path, target="x86", output=opts.workdir / f"{label}.so")
        row.compile_s = time.perf_counter() - start
        row.coverage = (artifact.manifest.get("schedule") or {}).get("coverage")
        engines["graphopt"] = GraphoptEngine(artifact, inputs)
    except Exception as exc:  # noqa: BLE001 - a failed compile/verify is a row with the error
        row.error = _error_line(exc)
    add_openvino(engines, row.notes, path, opts.threads, inputs, session)
    measured = interleaved(engines, opts.block, opts.rounds)
    row.graphopt_ms, row.ort_ms = measured.get("graphopt"), measured.get("ORT")
    row.openvino_ms = measured.get("OpenVINO")
    return row, artifact


def step_costs(path: Path, steps: int, opts: argparse.Namespace) -> list[str]:
    """graphopt's recurrent kernels of a model, each alone: microseconds per time step
    (a sequence kernel runs ``steps`` steps per call, a step kernel one)."""
    from graphopt.profiling import profile

    result = profile(path, "x86", repeat=opts.profile_repeat)
    lines = []
    for r in result.rows:
        per_call = steps if r.rule == "rnn_sequence" else 1
        if r.rule in ("rnn_step", "rnn_sequence"):
            lines.append(
                f"{r.name}: {r.calls * per_call} steps in {r.calls} call(s), "
                f"{1e6 * r.seconds_per_call / per_call:.2f} us/step (rule {r.rule}), "
                f"{100 * r.total_seconds / (result.call_ms / 1e3):.0f}% of the "
                f"{result.call_ms:.3f} ms call"
            )
    return lines or ["no sequence or step kernels"]


COLUMNS = ("model", "graphopt ms", "ORT ms", "OpenVINO ms", "graphopt/ORT", "graphopt/OpenVINO")


def _cells(row: Row) -> list[str]:
    def num(v: float | None, fmt: str, suffix: str = "") -> str:
        return "-" if v is None else format(v, fmt) + suffix

    notes = ([f"FAILED: {row.error}"] if row.error else []) + row.notes
    cells = [
        row.model,
        num(row.graphopt_ms, ".3f"),
        num(row.ort_ms, ".3f"),
        num(row.openvino_ms, ".3f"),
        num(row.vs_ort, ".2f", "x"),
        num(row.vs_openvino, ".2f", "x"),
    ]
    return cells + ["; ".join(notes)]


def table(rows: list[Row]) -> list[str]:
    head = [*COLUMNS, "notes"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1) + "---|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    g = geomean([r.vs_ort for r in rows])
    lines += ["", f"geometric mean graphopt/ORT: {'-' if g is None else f'{g:.2f}x'}"]
    return lines


def header(opts: argparse.Namespace) -> list[str]:
    import datetime
    import platform

    import onnxruntime as ort
    import torch

    import graphopt

    return [
        f"# graphopt RNN and small-model benchmark (issue 16), {datetime.date.today()}",
        f"CPU: {cpu_name()} ({platform.machine()})",
        f"graphopt {graphopt.__version__}, onnxruntime {ort.__version__}, "
        f"OpenVINO {_openvino_version() or 'not installed'}, torch {torch.__version__}",
        f"batch 1, fp32, {opts.threads} thread(s) for every engine; interleaved {opts.block:g} s "
        f"blocks, median of {opts.rounds} rounds; ratio > 1: graphopt slower",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_BLOCK_S} s blocks")
    parser.add_argument("--block", type=float, default=None, help="seconds per block (1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--sweep", default=",".join(map(str, SWEEP)), help="LSTM lengths, or ''")
    parser.add_argument("--profile-repeat", type=int, default=20, help="per step kernel")
    parser.add_argument("--no-profile", action="store_true", help="skip per-step costs")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/graphopt-bench-rnn"))
    parser.add_argument(
        "--recurrence",
        choices=RECURRENCE,
        default="sequence",
        help="sequence: one kernel per layer (the x86 default); steps: one "
        "graphopt::RNNStep kernel per step; unrolled: every step as primitive ops",
    )
    parser.add_argument(
        "--serial-steps",
        action="store_true",
        help="never split a recurrent GEMV across cores (PARALLEL_MIN_BYTES of "
        "targets/_gemv.py and lower/_rnn_sequence.py set to infinity, in this process)",
    )
    opts = parser.parse_args(argv)
    if opts.block is None:
        opts.block = QUICK_BLOCK_S if opts.quick else 1.0
    unknown = [m for m in opts.models.split(",") if m and m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    opts.threads = set_threads(opts.threads)  # before anything starts TVM's thread pool
    import tvm  # noqa: F401 - loaded here, not inside the first model's compile time

    from graphopt.lower import _rnn_sequence
    from graphopt.passes import PASSES, ExpandRNN
    from graphopt.profiling import call_overhead
    from graphopt.targets import _gemv, check_layout, resolve

    # what compile and profile then get from default_passes()
    PASSES["expand-rnn"] = functools.partial(ExpandRNN, **RECURRENCE[opts.recurrence][1])
    if opts.serial_steps:
        _gemv.PARALLEL_MIN_BYTES = _rnn_sequence.PARALLEL_MIN_BYTES = float("inf")

    opts.workdir.mkdir(parents=True, exist_ok=True)
    out = header(opts)
    how = RECURRENCE[opts.recurrence][0]
    how += ", serial recurrent GEMVs" if opts.serial_steps else ""
    out.append(f"recurrent layers: {how}")
    print("\n".join(out), flush=True)
    n_header = len(out)

    rows, steps = [], []
    for name in filter(None, opts.models.split(",")):
        path, inputs = export(name, opts.workdir)
        row, _ = bench(name, path, inputs, opts)
        rows.append(row)
        print(" | ".join(_cells(row)), flush=True)
        if not opts.no_profile and name != "tiny_cnn" and row.error is None:
            steps += [f"- {name}: {line}" for line in step_costs(path, STEPS[name], opts)]
    out += ["", *table(rows)]

    lengths = [int(t) for t in opts.sweep.split(",") if t]
    if lengths:
        sweep = []
        for t in lengths:
            path, inputs = export("lstm_classifier", opts.workdir, length=t)
            row, _ = bench(f"lstm_classifier T={t}", path, inputs, opts)
            sweep.append(row)
            print(" | ".join(_cells(row)), flush=True)
        out += ["", "LSTM classifier, sequence length sweep:", "", *table(sweep)]
        long = [r for r in sweep if r.graphopt_ms is not None][-2:]
        if len(long) == 2:
            t0, t1 = (int(r.model.split("=")[1]) for r in long)
            per_step = (long[1].graphopt_ms - long[0].graphopt_ms) / (t1 - t0) * 1e3
            out += [f"graphopt per time step (2 layers, T={t0}..{t1}): {per_step:.1f} us"]
    if steps:
        out += ["", "graphopt's recurrent kernels, each alone (us per time step):", *steps]
    spec = resolve("x86")
    out += ["", call_overhead(spec, check_layout(spec, None)).line()]
    print("\n".join(out[n_header:]))
    if opts.markdown is not None:
        opts.markdown.write_text("\n".join(out) + "\n")
        print(f"markdown written to {opts.markdown}")


if __name__ == "__main__":
    main()
