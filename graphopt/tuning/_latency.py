"""The model's end-to-end latency before and after tuning, next to onnxruntime's, and the
whole-model check that keeps a database from making a model slower.

The kernel table estimates a model run as the sum of its kernels' times; this measures
the real thing on this machine, as ``compile`` would build it: the model with the
default schedules (timed in two Relax VMs), with the database (only records
that beat their default by ``MIN_SPEEDUP``, as compile applies them), and, for an ONNX
model, onnxruntime on the same seeded inputs. They take turns in ``ROUNDS`` rounds of
short blocks, so a load that drifts during the timing moves all alike.

Why a whole-model check: every record beat its default measured alone (and again, side
by side, in ``Session.confirm``), yet the model can still run slower with them (seen
here: ResNet-18 tuned for 15 minutes, 5% faster by its kernels' estimate, measured 6%
slower end to end), because a kernel in the model meets caches that its neighbours
left, not the cold ones it was measured with. So ``tune`` keeps the figures in
``DB/model-latency.json`` (keyed by the model, the layout and the database's size), and
``compile`` keeps the default schedules for a model whose last check did not measure it
at ``MODEL_MIN_GAIN`` of the default's time or less with the database
(:func:`last_measured`), unless an earlier check passed with the database smaller:
then it applies the records that check timed (:func:`last_passing`), so a longer search
never leaves the model slower than a shorter one left it.

Why a margin, not "faster at all": two builds of the same code, each loaded on its own,
time up to about 2% apart for as long as both stay loaded (where the allocator placed
their buffers and weights; ``bench_tuning``'s A/A column: 0.98-1.02 on the 2-core Xeon
and Zen 4 of benchmarks/RESULTS.md). Paired rounds cancel the machine's drift, not that;
so a check at 0.996 (ResNet-18 after 5 minutes on the Zen 4, one record) says nothing
either way, and the default, which needs no database to be right, stays.

Tried and left out: where a kernel's best record lost inside the model, timing its next
records from the search there too (two turns, each one more build). On ResNet-50's
30-minute database of benchmarks/RESULTS.md (Zen 5), 1 of the 20 records tried won
inside the model: the search's flushed-cache timings rarely pick a kernel that beats
the defaults there, which run the 1x1 convs near the FMA peak.

Why the default twice, and the less favourable of two ratios (:func:`verdict`): with one
load of each build and the median of the rounds' ratios alone, the check's own A/A (the
default built a second time as "tuned", ResNet-50 on the 2-core Zen 4) read 0.976-1.007
over 16 processes, across the 0.98 margin; and twice on a real database it passed (0.965,
0.957) where ``bench_tuning`` then measured the tuned build at 1.03 and 1.00 of the
default. So tuned is now held against the default in two VMs, by the median of the
rounds' ratios and by the ratio of the medians (which a few noisy rounds move less), and
the check reads the largest of the four. The two VMs share the default's one loaded
library (``jit`` of an LLVM-only executable returns the same module: code and weights),
each with its own buffers, so their spread is the buffers' and the rounds' share of the
noise, not that of a separately loaded file; the tuned build is one of those.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi

from graphopt.targets import TargetSpec, build
from graphopt.targets._profile import instrumented_call, main_call
from graphopt.targets._runner import use_all_cores
from graphopt.tuning._apply import ApplyTuningDatabase, beats_default
from graphopt.tuning._database import RECORDS, TuningDatabase

__all__ = [
    "MODEL_MIN_GAIN",
    "ModelLatency",
    "measure_model",
    "last_measured",
    "last_passing",
    "remember",
    "paired_rounds",
    "verdict",
]

ROUNDS = 7  # turns of the engines: the median of 7 paired ratios
# the database is used only where the tuned model measured at most this fraction of the
# default's time: separately loaded builds of the same code differ by up to ~2%
MODEL_MIN_GAIN = 0.98
BLOCK_SECS = 0.25  # each engine's block of runs per round (at least 2 runs)
_CACHE = "model-latency.json"
COPY = "default copy"  # a second VM of the default build, timed beside the first


@dataclass
class ModelLatency:
    """Milliseconds per model run (None: not measured)."""

    default_ms: float | None = None
    tuned_ms: float | None = None
    onnxruntime_ms: float | None = None
    tuned_kernels: int = 0  # kernels the database schedules in the tuned build
    tuned_vs_default: float | None = None  # the check's ratio: see :func:`verdict`
    rounds: int = 0
    # records whose kernel, timed inside the model run, was not MIN_SPEEDUP faster there
    # than its default: dropped (compile judges them by those times from now on)
    dropped_in_model: int = 0
    # the default's second VM over its first (median of the rounds' ratios): how far
    # two VMs of one build differ in this run
    default_aa: float | None = None
    # the records the tuned build applied, {entry key: record seconds}: what compile
    # applies again when a later check of a grown database fails (:func:`last_passing`)
    selection: dict[str, float] | None = None
    note: str = ""  # why something was not measured
    # where this check failed: the last that passed with a smaller database, whose
    # records compile applies instead (:func:`last_passing`; not kept in the file)
    earlier: ModelLatency | None = None

    @property
    def keeps_default(self) -> bool:
        """The model did not measure ``MODEL_MIN_GAIN`` of the default's time or less with
        the database's records: compile keeps its default schedules."""
        return (
            self.tuned_kernels > 0
            and self.tuned_vs_default is not None
            and self.tuned_vs_default > MODEL_MIN_GAIN
        )

    @property
    def compile_uses(self) -> str:
        """What compile builds the model with after this check, in words."""
        if not self.keeps_default:
            return "compile uses the database's records"
        if self.earlier is None or not self.earlier.selection:
            return "compile keeps the default schedules for this model"
        return (
            f"compile uses the {len(self.earlier.selection)} record(s) of the last check "
            f"that passed, with a smaller database (tuned/default "
            f"{self.earlier.tuned_vs_default:.3f})"
        )

    @property
    def why_default(self) -> str:
        """Why compile keeps the default schedules (where :attr:`keeps_default`), in the
        words tune's and compile's messages share."""
        return (
            f"tuned/default {self.tuned_vs_default:.3f}, above {MODEL_MIN_GAIN}: no gain "
            "beyond the noise of separately loaded builds"
        )


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


def _ort_call(source, inputs: dict[str, np.ndarray]) -> Callable[[], object] | None:  # noqa: ANN001
    """onnxruntime's run on ``inputs`` (an ONNX model only; None if it cannot run it)."""
    import onnx
    import onnxruntime as ort

    if not isinstance(source, onnx.ModelProto):
        return None
    try:
        sess = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = dict(zip(names, inputs.values(), strict=True))
        sess.run(None, feed)
    except Exception:  # noqa: BLE001 - a model onnxruntime cannot run: no comparison
        return None
    return lambda: sess.run(None, feed)


def _synced(call: Callable[[], object], device) -> Callable[[], None]:  # noqa: ANN001
    def run() -> None:
        call()
        device.sync()

    return run


def paired_rounds(
    calls: dict[str, Callable[[], None]], rounds: int = ROUNDS, block: float = BLOCK_SECS
) -> dict[str, list[float]]:
    """Each call's median seconds per round; the calls take turns (the order rotating
    each round), each a block of about ``block`` seconds of runs."""
    runs = {}
    for name, call in calls.items():
        for _ in range(3):  # warm: first calls allocate, load weights, page in code
            call()
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        runs[name] = max(2, min(50, int(block / max(once, 1e-6))))
    names = list(calls)
    figures: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times = []
            for _ in range(runs[name]):
                start = time.perf_counter()
                calls[name]()
                times.append(time.perf_counter() - start)
            figures[name].append(statistics.median(times))
    return figures


def kernel_times_in_model(
    libs: dict[str, object],
    device,  # noqa: ANN001
    arrays: list[np.ndarray],
    kernels: set[str],
    rounds: int = ROUNDS,
    block: float = BLOCK_SECS,
) -> dict[str, dict[str, float]]:
    """Per build (``libs``: name -> a loaded library of the model), the median seconds
    per call of each of ``kernels`` inside whole model runs, where each call meets the
    caches the kernels before it left (not flushed ones, as the search measures). The
    builds take turns in :func:`paired_rounds`; the VM's instrument hook times each call."""
    samples: dict[str, dict[str, list[float]]] = {}
    calls = {}
    for name, lib in libs.items():
        calls[name], samples[name] = instrumented_call(lib, device, arrays, only=kernels)
    paired_rounds(calls, rounds, block)  # the warm-up runs are timed too: few, and alike
    return {
        name: {k: statistics.median(v) for k, v in got.items() if v}
        for name, got in samples.items()
    }


def verdict(figures: dict[str, list[float]]) -> tuple[float, float]:
    """The whole-model check's ratio from :func:`paired_rounds`' figures of ``tuned``,
    ``default`` and ``COPY`` (its second VM): the least favourable to tuned of its ratio
    to each, each read as the median of the rounds' ratios and as the ratio of the
    medians. And the A/A, the copy over the default (median of the rounds' ratios)."""

    def per_round(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(figures[a], figures[b], strict=True))

    def of_medians(a: str, b: str) -> float:
        return statistics.median(figures[a]) / statistics.median(figures[b])

    ratio = max(f("tuned", base) for base in ("default", COPY) for f in (per_round, of_medians))
    return ratio, per_round(COPY, "default")


def _judge_in_model(database: TuningDatabase, chosen: dict, times: dict) -> int:
    """Keep each applied record's in-model times in the database (``chosen``: kernel ->
    (entry, the record's search seconds)); how many lost there."""
    lost = 0
    for name, (entry, at) in chosen.items():
        default, tuned = times["default"].get(name), times["tuned"].get(name)
        if default is None or tuned is None:
            continue
        database.set_in_model(entry, default, tuned, at)
        lost += not beats_default(default, tuned)
    return lost


def measure_model(  # noqa: PLR0913
    relax_mod: tvm.IRModule,
    spec: TargetSpec,
    layout: str,
    database: TuningDatabase,
    source,  # noqa: ANN001 - onnx.ModelProto or a torch source (no onnxruntime then)
    rounds: int = ROUNDS,
    precision: str = "fp32",
    default=None,  # noqa: ANN001 - the default build, when the caller made it already
) -> ModelLatency:
    """Build the model with and without ``database`` and time both (the default loaded
    twice) and onnxruntime in :func:`paired_rounds`, at ``precision``; the check's ratio
    is :func:`verdict`'s.

    First each applied record's kernel is timed inside model runs beside its default
    (:func:`kernel_times_in_model`), and the times are kept in the database; records
    that lost there are dropped and the tuned model is built again without them, and
    timed again, all its records, until none loses."""
    inputs = _inputs(relax_mod)
    if inputs is None:
        return ModelLatency(note="symbolic input shapes: not measured")
    use_all_cores()  # before the first kernel runs: TVM sizes its thread pool once
    arrays = list(inputs.values())
    device = tvm.cpu()
    if default is None:
        default = build(relax_mod, spec, layout, precision=precision)
    default_lib = default.jit()

    def tuned_build():  # noqa: ANN202
        chosen: dict = {}
        ex = build(
            relax_mod,
            spec,
            layout,
            [ApplyTuningDatabase(database, chosen=chosen)],
            precision,
        )
        return ex.jit(), chosen

    tuned_lib, chosen = tuned_build()
    dropped = 0
    # a record that loses is dropped; its kernel may take an earlier record that won
    # inside a model (_Entry.choice). Each turn times every record of the build, not only
    # those new to it: a kernel's time inside the model depends on its neighbours' (which
    # core's cache holds the input they wrote), and a record that won beside a record
    # dropped since can lose beside the default that replaced it. Each turn that goes on
    # drops a record, which is not chosen again (its latest in-model timing lost), so
    # this ends; the last turn timed the build that is kept.
    while chosen:
        libs = {"default": default_lib, "tuned": tuned_lib}
        times = kernel_times_in_model(libs, device, arrays, set(chosen), rounds)
        lost = _judge_in_model(database, chosen, times)
        if not lost:
            break
        dropped += lost
        tuned_lib, chosen = tuned_build()
    selection = {entry.key: at for entry, at in chosen.values()}
    calls = {
        "default": _synced(main_call(default_lib, device, arrays), device),
        "tuned": _synced(main_call(tuned_lib, device, arrays), device),
        # made last: were a later VM to run faster, the copy, not tuned, gains
        COPY: _synced(main_call(default.jit(), device, arrays), device),
    }
    ort = _ort_call(source, inputs)
    if ort is not None:
        calls["onnxruntime"] = ort
    figures = paired_rounds(calls, rounds)
    ms = {n: statistics.median(v) * 1e3 for n, v in figures.items()}
    ratio, aa = verdict(figures)
    return ModelLatency(
        default_ms=min(ms["default"], ms[COPY]),  # the faster VM: what tuned must beat
        tuned_ms=ms["tuned"],
        onnxruntime_ms=ms.get("onnxruntime"),
        tuned_kernels=len(chosen),
        tuned_vs_default=ratio,
        rounds=rounds,
        dropped_in_model=dropped,
        default_aa=aa,
        selection=selection or None,
    )


# --- the figures kept in the database -------------------------------------------------------
_FIELDS = (
    "default_ms",
    "tuned_ms",
    "onnxruntime_ms",
    "tuned_kernels",
    "tuned_vs_default",
    "rounds",
    "dropped_in_model",
    "default_aa",
    "selection",
)


def _size(database: TuningDatabase) -> int:
    records = database.path / RECORDS
    return records.stat().st_size if records.exists() else 0


def _prefix(relax_mod: tvm.IRModule, layout: str) -> str:
    return f"{tvm_ffi.structural_hash(relax_mod)}-{layout}-"


def _key(relax_mod: tvm.IRModule, layout: str, database: TuningDatabase) -> str:
    """The model, the layout and the records' size: what the figures depend on."""
    return f"{_prefix(relax_mod, layout)}{_size(database)}"


def _known(database: TuningDatabase) -> dict:
    try:
        known = json.loads((database.path / _CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _figures(entry: dict, note: str) -> ModelLatency:
    return ModelLatency(**{f: entry[f] for f in _FIELDS if f in entry}, note=note)


def last_measured(
    relax_mod: tvm.IRModule, layout: str, database: TuningDatabase
) -> ModelLatency | None:
    """The figures ``DB/model-latency.json`` holds for this model, layout and database
    size (measured when the database last changed), or None. ``tune`` reuses them on a
    rerun; ``compile`` keeps the default schedules when they say
    :attr:`ModelLatency.keeps_default` (or applies :func:`last_passing`'s records)."""
    try:
        entry = _known(database)[_key(relax_mod, layout, database)]
        return _figures(entry, "measured when the database last changed")
    except (KeyError, TypeError):
        return None


def last_passing(
    relax_mod: tvm.IRModule, layout: str, database: TuningDatabase
) -> ModelLatency | None:
    """The latest figures of this model and layout that passed the whole-model check
    with records (:attr:`ModelLatency.selection`), measured when the database was at most
    its present size and every selected record is still in it; None if there are none.

    Why: each check times the records that are each kernel's best *then*. A longer
    search finds records faster alone, and the set of those can fail the check where the
    set of a shorter search passed (MobileNetV2 on the Zen 5 of benchmarks/RESULTS.md:
    0.914 after 5 minutes, 0.986 with the 30-minute records, so compile kept every
    default and the 5-minute gain was lost). ``compile`` then applies the set that
    passed last, as it was timed, so a longer search never leaves a model slower than a
    shorter one left it."""
    prefix, size = _prefix(relax_mod, layout), _size(database)
    found: tuple[int, ModelLatency] | None = None
    for key, entry in _known(database).items():
        if not key.startswith(prefix) or not key[len(prefix) :].isdigit():
            continue
        at = int(key[len(prefix) :])
        try:
            figures = _figures(entry, "measured when the database was smaller")
        except TypeError:
            continue
        passed = (
            figures.selection
            and figures.tuned_kernels > 0
            and figures.tuned_vs_default is not None
            and not figures.keeps_default
        )
        if passed and at <= size and (found is None or at > found[0]):
            found = (at, figures)
    if found is None:
        return None
    for key, secs in found[1].selection.items():
        entry = database.entry(key)
        if entry is None or entry.record_at(secs) is None:
            return None  # not the set that was timed: nothing
    return found[1]


def remember(
    relax_mod: tvm.IRModule, layout: str, database: TuningDatabase, latency: ModelLatency
) -> None:
    """Keep ``latency`` in ``DB/model-latency.json`` (written whole, then renamed)."""
    path = database.path / _CACHE
    known = _known(database)
    known[_key(relax_mod, layout, database)] = {f: getattr(latency, f) for f in _FIELDS}
    tmp = path.with_name(f".{_CACHE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1) + "\n")
    os.replace(tmp, path)
