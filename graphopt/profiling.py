"""``graphopt profile``: where a model's time goes, kernel by kernel, and what a call costs.

:func:`profile` builds the model as ``graphopt.compile`` does (same target phases, no
artifact file), keeps the scheduled module (:mod:`graphopt.targets._profile`) and times
every kernel alone from the built library, then inside whole-model calls (``in model``:
where a kernel's weights come from memory, not from the cache its repeated calls keep
warm, it takes longer there; the ``x alone`` column says how much). Each row says which
schedule rule made the kernel; one line sums it up: the fast-path coverage, the share of
conv/matmul FLOPs in kernels that a specialized rule (not the generic
``reduction``/``fallback``) scheduled.

With ``overhead=True`` it also measures the fixed cost of one call on a one-Relu model
(1x16 float32): through ``Artifact.run`` (numpy in and out), through a bound
``Artifact.runner()`` (the serving hot path, numpy in and out), through the bare TVM
runtime (one Relax VM, inputs already tensors) and through onnxruntime, in microseconds,
the median of many calls (:func:`call_overhead`; benchmarks call it too).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphopt.compiler import compile as compile_model
from graphopt.errors import GraphoptError
from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import TargetSpec, build, check_layout, resolve
from graphopt.targets._profile import (
    GENERIC_RULES,
    bare_call,
    coverage_line,
    device_for,
    kernels,
    record_schedule,
    schedule_summary,
    time_executable,
    time_kernels,
)
from graphopt.targets._runner import use_all_cores
from graphopt.verify import random_inputs

__all__ = [
    "GENERIC_RULES",
    "KernelRow",
    "Overhead",
    "Profile",
    "profile",
    "coverage_line",
    "render",
    "call_overhead",
    "overhead_model",
]

_OVERHEAD_CALLS = 2000
_OVERHEAD_ROUNDS = 3  # each way timed in turn, thrice: the best median of each counts


@dataclass(frozen=True)
class KernelRow:
    """One kernel: its time alone per call, its calls per inference, what made it, and its
    time per inference inside whole-model calls."""

    name: str
    rule: str | None
    family: str | None  # "conv", "matmul" or None
    calls: int
    seconds_per_call: float
    flops: int  # per call, conv/matmul kernels only (0 for the rest)
    # per inference, all its calls, timed inside whole-model calls (None: not measured)
    in_model_seconds: float | None = None

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_call * self.calls

    @property
    def in_model_ratio(self) -> float | None:
        """Its time in the model over its time alone (per inference): above 1 where the
        model's run finds its weights or inputs out of cache."""
        if self.in_model_seconds is None or self.total_seconds <= 0:
            return None
        return self.in_model_seconds / self.total_seconds

    @property
    def gflops(self) -> float | None:
        """GFLOP/s of a conv/matmul kernel; None for the others."""
        if not self.flops or self.seconds_per_call <= 0:
            return None
        return self.flops / self.seconds_per_call / 1e9


@dataclass(frozen=True)
class Overhead:
    """Median microseconds of one call of the same tiny model, four ways."""

    artifact_run_us: float  # Artifact.run: numpy in, numpy out (a dict each way)
    tvm_runtime_us: float  # one Relax VM, inputs already tensors, outputs left there
    onnxruntime_us: float  # InferenceSession.run, numpy in and out
    calls: int
    model: str = "one Relu on a 1x16 float32 input"
    runner_us: float | None = None  # Artifact.runner()(x): the hot path, numpy in and out

    def line(self) -> str:
        """One line, as ``graphopt profile --overhead`` prints it."""
        runner = f"bound runner {self.runner_us:.1f} us, " if self.runner_us is not None else ""
        return (
            f"per-call overhead ({self.model}, median of {self.calls} calls): "
            f"Artifact.run {self.artifact_run_us:.1f} us, {runner}"
            f"TVM runtime {self.tvm_runtime_us:.1f} us, onnxruntime {self.onnxruntime_us:.1f} us"
        )


@dataclass(frozen=True)
class Profile:
    """What :func:`profile` measured; ``rows`` slowest (in total) first."""

    model: str
    target: str
    layout: str
    threads: int
    rows: list[KernelRow]
    schedule: dict  # what compile's manifest records under "schedule"
    call_ms: float  # median of whole-model calls through the bare TVM runtime (best round)
    overhead: Overhead | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kernel_ms(self) -> float:
        """The sum of every kernel's time per inference, in milliseconds."""
        return 1e3 * sum(r.total_seconds for r in self.rows)

    @property
    def in_model_ms(self) -> float | None:
        """The sum of every kernel's time per inference inside whole-model calls, in
        milliseconds (None: not measured)."""
        if not self.rows or any(r.in_model_seconds is None for r in self.rows):
            return None
        return 1e3 * sum(r.in_model_seconds for r in self.rows)

    @property
    def coverage(self) -> float | None:
        """Percent of conv/matmul FLOPs on specialized schedules (None: no such kernel)."""
        return self.schedule["coverage"]

    def share(self, row: KernelRow) -> float:
        """``row``'s percent of the summed kernel time."""
        total = sum(r.total_seconds for r in self.rows)
        return 100.0 * row.total_seconds / total if total > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "target": self.target,
            "layout": self.layout,
            "threads": self.threads,
            "call_ms": self.call_ms,
            "kernel_ms": self.kernel_ms,
            "in_model_ms": self.in_model_ms,
            "schedule": self.schedule,
            "coverage_line": coverage_line(self.schedule),
            "kernels": [
                {
                    **asdict(r),
                    "ms_per_call": r.seconds_per_call * 1e3,
                    "total_ms": r.total_seconds * 1e3,
                    "in_model_ms": None if r.in_model_seconds is None else r.in_model_seconds * 1e3,
                    "in_model_ratio": r.in_model_ratio,
                    "share_percent": self.share(r),
                    "gflops_per_s": r.gflops,
                }
                for r in self.rows
            ],
            "overhead": asdict(self.overhead) if self.overhead else None,
        }


def profile(
    model,  # noqa: ANN001 - whatever graphopt.compile takes
    target: str | dict | TargetSpec = "x86",
    *,
    layout: str | None = None,
    input_shapes: dict | list[str] | None = None,
    repeat: int = 50,
    overhead: bool = False,
    target_options: dict | None = None,
    trust_pickle: bool = False,
    log: Callable[[str], None] | None = None,
    precision: str = "fp32",
) -> Profile:
    """Build ``model`` for ``target`` (as :func:`graphopt.compile` does, without writing or
    verifying an artifact) and time each kernel alone, ``repeat`` calls at least (best of
    3 rounds), then ``max(repeat, 20)`` whole-model calls, plain and instrumented in turn
    (the best of 3 rounds): the model's time and each kernel's inside it. A target
    whose kernels cannot run in this process (CUDA without a GPU, another CPU
    architecture) is refused before any work. ``precision`` ("bf16"/"fp16") builds the
    lower-precision kernels, as ``compile(..., precision=)`` does.
    """
    if repeat < 1:
        raise GraphoptError("repeat must be at least 1")
    say = log or (lambda _msg: None)
    spec = target if isinstance(target, TargetSpec) else resolve(target, **(target_options or {}))
    layout = check_layout(spec, layout)
    device = device_for(spec)
    threads = use_all_cores()
    source, graph, _ = prepare(
        model, input_shapes, trust_pickle=trust_pickle, pass_defaults=spec.pass_defaults
    )
    start = time.perf_counter()
    with record_schedule() as record:
        executable = build(to_relax(graph), spec, layout, precision=precision)
    say(f"built for {spec.name} (layout {layout}) in {time.perf_counter() - start:.1f}s")
    found = kernels(record.module)
    times = time_kernels(executable, found, device, repeat)
    specs = [
        {"name": n, "shape": list(graph.values[n].shape), "dtype": graph.values[n].dtype}
        for n in graph.inputs
    ]
    if isinstance(source, onnx.ModelProto):
        inputs = random_inputs(specs, seed=0)
    else:  # a torch model's own example inputs (token ids in range, for one)
        inputs = source.example_inputs
    arrays = [np.asarray(inputs[s["name"]]) for s in specs]
    calls, in_model = time_executable(executable, device, arrays, max(repeat, 20))
    rows = [
        KernelRow(k.name, k.rule, k.family, k.calls, times[k.name], k.flops, in_model.get(k.name))
        for k in found
    ]
    rows.sort(key=lambda r: -r.total_seconds)
    result = Profile(
        model=Path(model).name if isinstance(model, str | os.PathLike) else graph.name,
        target=spec.name,
        layout=layout,
        threads=threads,
        rows=rows,
        schedule=schedule_summary(found),
        call_ms=1e3 * statistics.median(calls),
        overhead=call_overhead(spec, layout) if overhead else None,
    )
    return result


def overhead_model() -> onnx.ModelProto:
    """The smallest model that still runs one kernel: Relu of a 1x16 float32 tensor."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "overhead", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def call_overhead(
    spec: TargetSpec | str = "x86",
    layout: str | None = None,
    calls: int = _OVERHEAD_CALLS,
    *,
    model: onnx.ModelProto | None = None,
    label: str | None = None,
) -> Overhead:
    """The fixed cost of a call (:class:`Overhead`): the same model through
    ``Artifact.run``, a bound ``Artifact.runner()``, the bare TVM runtime and
    onnxruntime, the median of ``calls`` calls each (the best of 3 rounds, the ways taken
    in turn, so a busy spell of the machine does not land on one way only).

    ``model`` (default :func:`overhead_model`, one Relu) may be any small ONNX model, for
    a benchmark's own; ``label`` names it in :meth:`Overhead.line`. ``spec`` is a target
    (``"x86"``, a dict or a resolved spec), ``layout`` its default when None.
    """
    spec = spec if isinstance(spec, TargetSpec) else resolve(spec)
    layout = check_layout(spec, layout)
    device = device_for(spec)
    if model is None:
        model, label = overhead_model(), label or Overhead.model
    label = label or model.graph.name or "model"
    with tempfile.TemporaryDirectory(prefix="graphopt-overhead-") as tmp:
        artifact = compile_model(model, spec, Path(tmp, "overhead.so"), layout=layout)
        try:
            inputs = artifact.random_inputs(seed=0)
            runner = artifact.runner()
            arrays = [inputs[n] for n in runner.input_names]
            ways = {
                "run": lambda: artifact.run(inputs),
                "runner": lambda: runner(*arrays),
                "bare": bare_call(artifact.path, device, arrays),
                "ort": _onnxruntime_call(model, inputs),
            }
            best = _best_medians(ways, calls)
        finally:
            artifact.close()
    return Overhead(
        artifact_run_us=best["run"],
        tvm_runtime_us=best["bare"],
        onnxruntime_us=best["ort"],
        calls=calls,
        model=label,
        runner_us=best["runner"],
    )


def _onnxruntime_call(model: onnx.ModelProto, inputs: dict) -> Callable[[], object]:
    import onnxruntime as ort  # as graphopt.verify does: only when asked for

    session = ort.InferenceSession(
        model.SerializeToString(), ort.SessionOptions(), providers=["CPUExecutionProvider"]
    )
    return lambda: session.run(None, inputs)


def _best_medians(ways: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """The lowest, over rounds, of each way's median microseconds per call."""
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(_OVERHEAD_ROUNDS):
        for name, call in ways.items():
            best[name] = min(best[name], _median_us(call, calls))
    return best


def _median_us(call: Callable[[], object], calls: int) -> float:
    for _ in range(min(calls, 50)):  # warm up: first loads, caches, thread pools
        call()
    times = []
    clock = time.perf_counter
    for _ in range(calls):
        start = clock()
        call()
        times.append(clock() - start)
    return 1e6 * statistics.median(times)


def render(result: Profile, top: int | None = None, file: IO[str] | None = None) -> None:
    """Print ``result`` as a table (the ``top`` slowest kernels), the coverage line, the
    conv/matmul kernels the generic rules took and, when measured, the call overhead."""
    from rich.console import Console  # only for the table, not on ``import graphopt``
    from rich.table import Table

    console = Console(file=file, highlight=False)
    if not console.is_terminal:  # rich's default there, 80 columns, folds kernel names
        console.width = 140
    shown = result.rows[:top] if top else result.rows
    table = Table(
        title=f"{result.model} on {result.target} (layout {result.layout}, "
        f"{result.threads} thread(s)): {len(result.rows)} kernels",
        title_justify="left",
    )
    table.add_column("kernel", overflow="fold")
    table.add_column("rule")
    for name in ("calls", "ms/call", "total ms", "in model ms", "x alone", "%", "GFLOP/s"):
        table.add_column(name, justify="right")
    for r in shown:
        gflops = f"{r.gflops:.1f}" if r.gflops is not None else "-"
        ratio = r.in_model_ratio
        table.add_row(
            r.name,
            _rule_cell(r),
            str(r.calls),
            f"{r.seconds_per_call * 1e3:.4f}",
            f"{r.total_seconds * 1e3:.3f}",
            f"{r.in_model_seconds * 1e3:.3f}" if r.in_model_seconds is not None else "-",
            f"{ratio:.2f}" if ratio is not None else "-",
            f"{result.share(r):.1f}",
            gflops,
        )
    console.print(table)
    if top and len(result.rows) > top:
        console.print(f"({len(result.rows) - top} faster kernels not shown)", markup=False)
    say = lambda text: console.print(text, markup=False, soft_wrap=True)  # noqa: E731
    inside = result.in_model_ms
    say(
        f"kernels alone: {result.kernel_ms:.3f} ms per inference; "
        + (f"inside the model: {inside:.3f} ms; " if inside is not None else "")
        + f"whole model through the TVM runtime: {result.call_ms:.3f} ms (median)"
    )
    say(coverage_line(result.schedule))
    generic = result.schedule["fallback_kernels"]
    if generic:
        say(
            f"conv/matmul kernels on generic schedules ({'/'.join(GENERIC_RULES)}): "
            + ", ".join(generic)
        )
    if result.overhead is not None:
        say(result.overhead.line())


def _rule_cell(row: KernelRow) -> str:
    rule = row.rule or "-"
    return f"{rule} (!)" if row.family and row.rule in GENERIC_RULES else rule
