"""The model's end-to-end latency before and after tuning, next to onnxruntime's.

The kernel table estimates a model run as the sum of its kernels' times; this measures
the real thing on this machine, as ``compile`` would build it: the model with the
default schedules, with the database (only records that beat their default by
``MIN_SPEEDUP``, as compile applies them), and, for an ONNX model, onnxruntime on the
same seeded inputs. Each is the median of ``repeat`` runs through a bare Relax VM.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import tvm

from graphopt.targets import TargetSpec, build
from graphopt.targets._profile import time_executable
from graphopt.tuning._apply import ApplyTuningDatabase
from graphopt.tuning._database import TuningDatabase

__all__ = ["ModelLatency", "measure_model"]


@dataclass
class ModelLatency:
    """Milliseconds per model run (None: not measured)."""

    default_ms: float | None = None
    tuned_ms: float | None = None
    onnxruntime_ms: float | None = None
    tuned_kernels: int = 0  # kernels the database schedules in the tuned build
    note: str = ""  # why something was not measured


def _inputs(relax_mod: tvm.IRModule, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Seeded inputs for the model's ``main``, by parameter name; None if a shape is symbolic."""
    rng = np.random.default_rng(seed)
    out = {}
    for param in relax_mod["main"].params:
        info = param.ty
        try:
            shape = [int(d) for d in info.shape.values]
        except (TypeError, AttributeError):
            return None
        dtype = str(info.dtype)
        if np.dtype(dtype).kind == "f":
            out[str(param.name)] = rng.standard_normal(shape).astype(dtype)
        else:
            out[str(param.name)] = np.zeros(shape, dtype)
    return out


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def _ort_ms(source, inputs: dict[str, np.ndarray], repeat: int) -> float | None:  # noqa: ANN001
    """onnxruntime's median on ``inputs`` (an ONNX model only; None if it cannot run it)."""
    import onnx
    import onnxruntime as ort

    if not isinstance(source, onnx.ModelProto):
        return None
    try:
        sess = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = dict(zip(names, inputs.values(), strict=True))
        for _ in range(min(repeat, 10)):
            sess.run(None, feed)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - start)
    except Exception:  # noqa: BLE001 - a model onnxruntime cannot run: no comparison
        return None
    return _median_ms(times)


def measure_model(  # noqa: PLR0913
    relax_mod: tvm.IRModule,
    spec: TargetSpec,
    layout: str,
    database: TuningDatabase,
    source,  # noqa: ANN001 - onnx.ModelProto or a torch source (no onnxruntime then)
    repeat: int = 20,
    precision: str = "fp32",
    default=None,  # noqa: ANN001 - the default build, when the caller made it already
) -> ModelLatency:
    """Build the model with and without ``database`` and time both (and onnxruntime),
    at ``precision``."""
    inputs = _inputs(relax_mod)
    if inputs is None:
        return ModelLatency(note="symbolic input shapes: not measured")
    arrays = list(inputs.values())
    device = tvm.cpu()
    report: dict = {}
    if default is None:
        default = build(relax_mod, spec, layout, precision=precision)
    tuned = build(relax_mod, spec, layout, [ApplyTuningDatabase(database, report)], precision)
    return ModelLatency(
        default_ms=_median_ms(time_executable(default, device, arrays, repeat)),
        tuned_ms=_median_ms(time_executable(tuned, device, arrays, repeat)),
        onnxruntime_ms=_ort_ms(source, inputs, repeat),
        tuned_kernels=len(report.get("from_database", {})),
    )
