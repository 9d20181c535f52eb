"""Issue 13's public benchmark set: graphopt vs onnxruntime vs OpenVINO f32, one process.

    python benchmarks/bench_public.py                       # every model of _public_models.MODELS
    python benchmarks/bench_public.py --models resnet18,shufflenet_v2_x1_0 --quick
    python benchmarks/bench_public.py --markdown results.md # also write the table as markdown

Per model (``benchmarks/_public_models.py``: library definitions, seeded random weights,
ONNX opset 17, exported once and cached): compile with graphopt for x86 with default
schedules and verification (the "compile s" column is ``graphopt.compile`` wall time,
verification included), read the fast-path coverage and the conv/matmul FLOPs from the
artifact's manifest (``schedule``), then time the three engines on the same seeded input,
interleaved: each round runs every engine for one block of ``--block`` seconds (0.5 s; 0.2 s
with ``--quick``), the order rotating from round to round; a block's figure is the median
call latency inside it, an engine's figure the median over ``--rounds`` rounds (7). A ratio
is the median over the rounds of that round's ratio (graphopt's block over the other
engine's block of the same round): on a VM whose speed changes from minute to minute, two
blocks a second apart see the same speed, and a slow stretch moves both sides of a ratio.

- graphopt: ``Artifact.benchmark`` (the VM's ``main`` on inputs already on the device).
- onnxruntime: ``InferenceSession.run``, CPUExecutionProvider, default graph
  optimizations, ``intra_op_num_threads`` = the thread count below.
- OpenVINO: ``compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})``, one infer request
  with its input tensor set once. Its output is compared with onnxruntime's (a note when
  they differ). Without ``pip install openvino`` the column reads "-".

Threads: ``--threads`` (default: the physical cores this process may use, as graphopt's
runtime counts them) for all three engines. Ratios above 1 mean graphopt is slower. A model
that fails to export, compile or verify is a row with the error; the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["Row", "geomean", "markdown_table", "main"]

QUICK_BLOCK_S = 0.2
_MIN_CALLS = 3  # per block, however slow the model


# --- results --------------------------------------------------------------------------------
@dataclass
class Row:
    """One model's figures; None where an engine did not run."""

    model: str
    graphopt_ms: float | None = None
    ort_ms: float | None = None
    openvino_ms: float | None = None
    conv_matmul_flops: float | None = None
    coverage: float | None = None
    compile_s: float | None = None
    error: str | None = None  # why graphopt has no figure (export, compile or verify)
    notes: list[str] = field(default_factory=list)
    paired: dict[str, float] = field(default_factory=dict)  # engine -> median round ratio

    @property
    def vs_ort(self) -> float | None:
        return self.paired.get("ORT") or _ratio(self.graphopt_ms, self.ort_ms)

    @property
    def vs_openvino(self) -> float | None:
        return self.paired.get("OpenVINO") or _ratio(self.graphopt_ms, self.openvino_ms)

    @property
    def gflops(self) -> float | None:
        if not self.conv_matmul_flops or not self.graphopt_ms:
            return None
        return self.conv_matmul_flops / (self.graphopt_ms / 1e3) / 1e9


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def geomean(values: list[float | None]) -> float | None:
    """Geometric mean of the values that exist; None when there are none."""
    vals = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


COLUMNS = (
    "model",
    "graphopt ms",
    "ORT ms",
    "OpenVINO ms",
    "graphopt/ORT",
    "graphopt/OpenVINO",
    "GFLOP/s",
    "coverage",
    "compile s",
    "notes",
)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _coverage(cov: float | None) -> str:
    if cov is None:
        return "-"
    return "99.9%" if cov < 100 and round(cov, 1) >= 100 else f"{cov:.1f}%"  # never rounds up


def cells(row: Row) -> list[str]:
    """The table cells of ``row``, in :data:`COLUMNS` order."""
    notes = ([f"FAILED: {row.error}"] if row.error else []) + row.notes
    return [
        row.model,
        _num(row.graphopt_ms, ".2f"),
        _num(row.ort_ms, ".2f"),
        _num(row.openvino_ms, ".2f"),
        _num(row.vs_ort, ".2f") + ("x" if row.vs_ort else ""),
        _num(row.vs_openvino, ".2f") + ("x" if row.vs_openvino else ""),
        _num(row.gflops, ".1f"),
        _coverage(row.coverage),
        _num(row.compile_s, ".1f"),
        "; ".join(notes),
    ]


def summary_lines(rows: list[Row]) -> list[str]:
    """The geometric means under the table."""
    lines = []
    for what, ratios in (
        ("onnxruntime", [r.vs_ort for r in rows]),
        ("OpenVINO", [r.vs_openvino for r in rows]),
    ):
        g = geomean(ratios)
        n = sum(1 for v in ratios if v)
        shown = "-" if g is None else f"{g:.2f}x"
        lines.append(f"geometric mean graphopt/{what}: {shown} over {n} of {len(rows)} models")
    return lines


def markdown_table(rows: list[Row], header: list[str]) -> str:
    """``header`` lines, the table as markdown, then the geometric means (for RESULTS.md)."""
    esc = lambda text: text.replace("|", "\\|")  # noqa: E731 - error lines may hold a pipe
    right = "|".join(["---"] + ["---:"] * (len(COLUMNS) - 2) + ["---"])
    lines = [*header, "", "| " + " | ".join(COLUMNS) + " |", f"|{right}|"]
    lines += ["| " + " | ".join(esc(c) for c in cells(r)) + " |" for r in rows]
    return "\n".join([*lines, "", *summary_lines(rows)]) + "\n"


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:  # rich's 80 columns would fold the numbers
        console.width = 180
    table = Table(title="issue 13's public benchmark set", title_justify="left")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in ("model", "notes") else "right")
    table.columns[-1].overflow = "fold"
    for r in rows:
        table.add_row(*cells(r))
    console.print(table)
    for line in summary_lines(rows):
        console.print(line, markup=False)


# --- the machine ----------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU /proc/cpuinfo names, with what tells one machine of that name from another:
    LLVM's name for the host (``znver4``, ``sapphirerapids``: what graphopt compiles for)
    and its AVX-512 / bf16 / AMX features. A VM's model name is often only "AMD EPYC",
    which a Zen 3 without AVX-512 and a Zen 4 with it both print."""
    from graphopt.targets._cpu import host_cpu, host_cpu_flags

    name = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(
            (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), ""
        )
    name = name or platform.processor() or platform.machine()
    details = [host_cpu()]
    flags = host_cpu_flags()
    if flags:
        wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")
        details.append(" ".join(f for f in wanted if f in flags) or "no AVX2")
    return f"{name} ({'; '.join(details)})"


def _versions() -> str:
    import _public_models as pm
    import onnxruntime as ort
    import torch

    import graphopt

    parts = [
        f"graphopt {graphopt.__version__}",
        f"onnxruntime {ort.__version__}",
        f"OpenVINO {_openvino_version() or 'not installed'}",
        f"torch {torch.__version__}",
        f"torchvision {pm.import_torchvision().__version__}",
        f"timm {pm.import_timm().__version__}",
    ]
    return ", ".join(parts)


def _openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


def header_lines(threads: int, block_s: float, rounds: int) -> list[str]:
    physical = _physical_cores()
    return [
        f"# graphopt public benchmark, {datetime.date.today()}",
        f"machine: {cpu_name()}, {physical} physical cores / {os.cpu_count()} logical CPUs, "
        f"{platform.system()} {platform.machine()}",
        _versions(),
        f"x86, default schedules, fp32, {threads} thread(s) for every engine; interleaved "
        f"{block_s:g} s blocks, median of {rounds} rounds; ratio: median of the rounds' "
        "ratios, > 1: graphopt slower",
    ]


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Fix the thread count before TVM's pool starts (it reads ``TVM_NUM_THREADS`` once)."""
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
        os.environ.pop("OMP_NUM_THREADS", None)
    from graphopt.targets._runner import use_all_cores

    return use_all_cores()  # keeps a value already set; else the physical cores usable


# --- the engines ----------------------------------------------------------------------------
def _block_ms(call: Callable[[], object], seconds: float) -> float:
    """Median latency (ms) of ``call`` repeated for ``seconds`` (at least a few calls)."""
    call()  # the first call after another engine's block pays its cache and thread wake-up
    times = []
    end = time.perf_counter() + seconds
    while len(times) < _MIN_CALLS or time.perf_counter() < end:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class GraphoptEngine:
    """The artifact's own timer: ``main`` on device-resident inputs, no output copy."""

    def __init__(self, artifact, inputs: dict[str, np.ndarray]) -> None:  # noqa: ANN001
        self.artifact, self.inputs = artifact, inputs
        self.last_ms = artifact.benchmark(inputs, repeat=_MIN_CALLS)["median_ms"]

    def block(self, seconds: float) -> float:
        repeat = max(_MIN_CALLS, int(seconds * 1e3 / max(self.last_ms, 1e-3)))
        self.last_ms = self.artifact.benchmark(self.inputs, repeat=repeat)["median_ms"]
        return self.last_ms

    def close(self) -> None:
        self.artifact.close()


class CallEngine:
    """An engine timed by calling it: onnxruntime's ``run``, OpenVINO's ``infer``."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call

    def block(self, seconds: float) -> float:
        return _block_ms(self.call, seconds)

    def close(self) -> None:
        self.call = None


def ort_session(path: Path, threads: int):  # noqa: ANN201 - an InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def openvino_request(path: Path, threads: int, inputs: dict, precision: str = "f32"):  # noqa: ANN201
    """An OpenVINO infer request (``INFERENCE_PRECISION_HINT`` ``precision``) with
    ``inputs`` set, or None without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return None
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
    }
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    for name, arr in inputs.items():
        request.set_tensor(name, ov.Tensor(arr))
    return request


def seeded_inputs(session, seed: int = 0) -> dict[str, np.ndarray]:  # noqa: ANN001
    """One seeded float32 array per model input, from onnxruntime's input list."""
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:200]


def _agree(ours: np.ndarray, ref: np.ndarray) -> str | None:
    """Why OpenVINO's output is not onnxruntime's, or None (loose: f32 engines differ)."""
    scale = float(np.max(np.abs(ref))) or 1.0
    diff = float(np.max(np.abs(ours.astype(np.float32) - ref)))
    return None if diff <= 1e-3 * scale + 1e-4 else f"OpenVINO differs from ORT by {diff:.2g}"


def add_openvino(engines: dict, notes: list, path: Path, threads: int, inputs: dict, session):  # noqa: ANN001
    """``engines["OpenVINO"]`` for the ONNX file at ``path`` when openvino is installed and
    takes the model; a refusal, or an output unlike onnxruntime's (``session``), is a note."""
    try:
        request = openvino_request(path, threads, inputs)
        if request is not None:
            request.infer()
            note = _agree(request.get_output_tensor(0).data, session.run(None, inputs)[0])
            if note:
                notes.append(note)
            engines["OpenVINO"] = CallEngine(request.infer)
    except Exception as exc:  # noqa: BLE001 - OpenVINO refusing a model is a note
        notes.append("OpenVINO: " + _error_line(exc))


# --- one model ------------------------------------------------------------------------------
def bench_model(name: str, opts: argparse.Namespace, workdir: Path) -> Row:
    import _public_models as pm

    import graphopt

    row = Row(name)
    try:
        path = pm.export_onnx(name)
    except Exception as exc:  # noqa: BLE001 - a model that cannot export is a row, not a crash
        row.error = "export: " + _error_line(exc)
        return row
    session = ort_session(path, opts.threads)
    inputs = seeded_inputs(session)
    engines = {"ORT": CallEngine(lambda: session.run(None, inputs))}
    try:
        start = time.perf_counter()
        artifact = graphopt.compile(path, target="x86", output=workdir / f"{name}.so")
        row.compile_s = time.perf_counter() - start
        schedule = artifact.manifest.get("schedule") or {}
        row.coverage = schedule.get("coverage")
        row.conv_matmul_flops = schedule.get("conv_matmul_flops")
        if schedule.get("fallback_kernels"):
            row.notes.append(f"{len(schedule['fallback_kernels'])} kernels on generic rules")
        engines["graphopt"] = GraphoptEngine(artifact, inputs)
    except Exception as exc:  # noqa: BLE001 - failed compile/verify: a row with the error
        row.error = _error_line(exc)
        if opts.verbose:
            traceback.print_exc()
    add_openvino(engines, row.notes, path, opts.threads, inputs, session)
    rounds = interleaved_rounds(engines, opts.block, opts.rounds)
    measured = medians(rounds)
    row.graphopt_ms = measured.get("graphopt")
    row.ort_ms = measured.get("ORT")
    row.openvino_ms = measured.get("OpenVINO")
    row.paired = paired_ratios(rounds, "graphopt")
    for engine in engines.values():
        engine.close()
    return row


def interleaved(engines: dict, block_s: float, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each engine's block figure, the engines taking turns."""
    return medians(interleaved_rounds(engines, block_s, rounds))


def interleaved_rounds(engines: dict, block_s: float, rounds: int) -> dict[str, list[float]]:
    """Each engine's block figure (ms) of every round, the engines taking turns."""
    names = list(engines)
    figures: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            figures[n].append(engines[n].block(block_s))
    return figures


def medians(figures: dict[str, list[float]]) -> dict[str, float]:
    """Each engine's median block figure (ms) of :func:`interleaved_rounds`."""
    return {n: statistics.median(v) for n, v in figures.items()}


def paired_ratios(figures: dict[str, list[float]], ours: str) -> dict[str, float]:
    """Per other engine: the median over the rounds of ``ours``'s block over that engine's
    block of the same round (:func:`interleaved_rounds`); no entry without ``ours``."""
    return {n: statistics.median(r) for n, r in _round_ratios(figures, ours).items()}


def paired_spread(figures: dict[str, list[float]], ours: str) -> dict[str, tuple[float, float]]:
    """Per other engine: the lower and upper quartile of the rounds' ratios that
    :func:`paired_ratios` takes the median of: how far one run's ratio can be trusted on a
    machine whose speed drifts (the same binary read 0.83-0.90x onnxruntime over five runs
    of an hour on a shared 2-vCPU VM)."""
    out = {}
    for n, ratios in _round_ratios(figures, ours).items():
        if len(ratios) < 2:
            out[n] = (ratios[0], ratios[0])
        else:
            low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
            out[n] = (low, high)
    return out


def _round_ratios(figures: dict[str, list[float]], ours: str) -> dict[str, list[float]]:
    """Per other engine, ``ours``'s block over that engine's, round by round."""
    mine = figures.get(ours)
    if not mine:
        return {}
    return {
        n: [a / b for a, b in zip(mine, v, strict=True)]
        for n, v in figures.items()
        if n != ours and v
    }


# --- the command ----------------------------------------------------------------------------
def model_names(text: str) -> list[str]:
    """``all``, ``issue13``, ``issue14`` or a comma-separated list of names in ``MODELS``."""
    import _public_models as pm

    groups = {
        "all": list(pm.MODELS),
        "issue13": [m.name for m in pm.ISSUE13],
        "issue14": [m.name for m in pm.ISSUE14],
    }
    names: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part not in groups and part not in pm.MODELS:
            raise SystemExit(f"unknown model {part!r}; choose from: {', '.join(pm.MODELS)}")
        names += groups.get(part, [part])
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default="all", help="all (default), issue13, issue14, or names, comma-separated"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_BLOCK_S} s blocks")
    parser.add_argument("--block", type=float, default=None, help="seconds per block (0.5)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/graphopt-bench-public"))
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failures")
    opts = parser.parse_args(argv)
    if opts.block is None:
        opts.block = QUICK_BLOCK_S if opts.quick else 0.5
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    opts.threads = set_threads(opts.threads)  # before anything starts TVM's thread pool
    import _public_models as pm
    import tvm  # noqa: F401 - loaded here (~3 s), not in the first model's compile time
    from _placement import placement_line

    if pm.missing_extra():
        raise SystemExit(pm.missing_extra())
    names = model_names(opts.models)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    header = header_lines(opts.threads, opts.block, opts.rounds)
    header.append(placement_line("before"))  # the host's CPU placement: see _placement
    print("\n".join(header), flush=True)
    rows = []
    for i, name in enumerate(names, 1):
        row = bench_model(name, opts, opts.workdir)
        rows.append(row)
        print(f"[{i}/{len(names)}] " + " | ".join(cells(row)), flush=True)
    header.append(placement_line("after"))
    print(header[-1])
    print()
    print_table(rows)
    if opts.markdown is not None:
        opts.markdown.write_text(markdown_table(rows, header))
        print(f"markdown table written to {opts.markdown}")


if __name__ == "__main__":
    main()
