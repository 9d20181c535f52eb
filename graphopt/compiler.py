"""``graphopt.compile``: model in, verified artifact out.

The order, one line each:
  1. frontend   - load and check the model, fix input shapes, convert to the graph IR
                 (ONNX, or a torch model through ``graphopt.frontends.torch``);
  2. passes     - graph-level rewrites (``graphopt.passes.DEFAULT_PIPELINE``);
  3. check      - name every op that cannot lower, before TVM does any work;
  4. lower      - graph IR to a Relax IRModule;
  5. build      - the target's Relax phases, then ``tvm.compile`` and export;
  6. verify     - run the artifact and the reference (onnxruntime, or torch eager for a
                 torch model) on the same inputs;
  7. publish    - append the manifest and rename into place (never a half file).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from graphopt._version import __version__
from graphopt.artifact import (
    Artifact,
    append_manifest,
    check_inputs,
    concrete_specs,
    library_digest,
    random_inputs,
    symbolic_dims,
)
from graphopt.errors import (
    ArtifactError,
    CompileError,
    GraphoptError,
    TargetError,
    VerificationError,
    first_line,
)
from graphopt.ir import Graph
from graphopt.lower import to_relax
from graphopt.passes import Pass
from graphopt.prepare import check_sizes, load_model, prepare, reference_for
from graphopt.targets import (
    TargetSpec,
    build,
    check_layout,
    check_precision,
    resolve,
    tvm_version,
)
from graphopt.targets._profile import coverage_line, kernels, record_schedule, schedule_summary
from graphopt.verify import Tolerance, compare, tolerances

__all__ = ["compile", "verify", "prepare", "check_sizes"]  # the last two: graphopt.prepare


def _reserve_output(output, model) -> tuple[Path, Path, list[Path]]:  # noqa: ANN001
    """Check where the artifact goes and create the hidden file it is built in, there;
    return ``(output, temporary file, folders created for it, innermost first)``.

    Done before any work, so a path that cannot be written fails in a second, not after
    a long compile. The temporary name carries this process's id: a compile killed
    (``kill -9``) leaves one behind, and the next compile of that output removes every
    such file whose process is gone.
    """
    made = []
    if output is None:  # a fresh folder, removed again if the compile fails
        out = Path(tempfile.mkdtemp(prefix="graphopt-")) / "model.so"
        made.append(out.parent)
    else:
        out = Path(output)
    where = f"cannot write the artifact to {out}"
    if isinstance(model, str | os.PathLike) and out.exists() and Path(model).exists():
        if os.path.samefile(out, model):
            raise ArtifactError(f"{where}: that is the model being compiled; choose another -o")
    if out.is_dir():
        raise ArtifactError(f"{where}: it is a folder")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ArtifactError(f"{where}: {blocking} is a file, not a folder")
    made += [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        detail = f"{exc.strerror or exc} ({exc.filename or out.parent})"
        raise ArtifactError(f"{where}: {detail}") from None
    _sweep_stale(out)
    try:
        fd, name = tempfile.mkstemp(
            prefix=f".{out.name}.{os.getpid()}.", suffix=".so", dir=out.parent
        )
    except OSError as exc:
        raise ArtifactError(f"{where}: {exc.strerror or exc} ({out.parent})") from None
    os.close(fd)
    return out, Path(name), made


def _sweep_stale(out: Path) -> None:
    """Remove temporaries of ``out`` that a killed compile left: ``.NAME.PID.*.so`` whose
    process no longer runs (a live one may be another compile of the same output)."""
    prefix = f".{out.name}."
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".so")):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for a moment,
    for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _set_mode(path: Path) -> None:
    """Give the artifact the mode a linker's output gets: 0777 less the umask (the
    temporary file was made 0600)."""
    os.chmod(path, 0o777 & ~_umask())


@contextlib.contextmanager
def _stage(what: str):  # noqa: ANN202
    """Turn a failure inside TVM into one :class:`CompileError` line naming the stage.

    The model passed graphopt's checks, so this is a graphopt or TVM limitation; the
    message says so, and ``--debug`` shows the traceback for a report.
    """
    try:
        yield
    except GraphoptError:
        raise
    except MemoryError:
        raise CompileError(f"ran out of memory trying to {what}") from None
    except Exception as exc:
        text = str(exc).strip()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        first = next((ln for ln in lines if not ln.startswith(("Traceback", "File "))), "")
        raise CompileError(
            f"TVM failed to {what}: {type(exc).__name__}: {first[:300]} (a graphopt/TVM "
            "limitation: please report it; --debug shows the traceback)"
        ) from exc


def _sha256(proto: onnx.ModelProto, model) -> str:  # noqa: ANN001
    if isinstance(model, str | os.PathLike):
        data = Path(model).read_bytes()
    else:
        data = proto.SerializeToString()
    return hashlib.sha256(data).hexdigest()


def compile(  # noqa: A001 - the public name users expect
    model,  # noqa: ANN001 - ONNX path/ModelProto, .pt2 path, TorchSource or ExportedProgram
    target: str | dict | TargetSpec = "x86",
    output: str | os.PathLike | None = None,
    *,
    input_shapes: dict | list[str] | None = None,
    passes: list[Pass] | None = None,
    verify: bool = True,
    verify_inputs: dict[str, np.ndarray] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    keep_unverified: bool = False,
    target_options: dict | None = None,
    tuning_db: str | os.PathLike | None = None,
    layout: str | None = None,
    log=None,  # noqa: ANN001 - callable(str) for progress lines
    dump_ir: str | os.PathLike | None = None,
    svg: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    dynamic_batch: bool = False,
    precision: str = "fp32",
) -> Artifact:
    """Compile a model into a verified :class:`Artifact`.

    ``precision``: "fp32" (default), "bf16" or "fp16": convs and weight matmuls compute
    in that type with fp32 accumulation, weights converted once at compile time;
    everything else, and the inputs and outputs, stay fp32
    (:mod:`graphopt.targets._precision`). A target without the hardware for it refuses
    with one line naming the missing feature. The manifest records it; verification
    then uses that precision's tolerances (``graphopt.verify.PRECISION_TOLERANCES``)
    unless ``rtol``/``atol`` are given (None: the precision's; fp32: 1e-3 / 1e-4).

    ``dynamic_batch`` (or a symbol as dim 0 in ``input_shapes``, ``{"x": ("N", 3, 224,
    224)}``): an ONNX model's symbolic batch dim stays symbolic, and the one artifact
    runs any batch size; verification runs it at batches ``VERIFY_BATCHES``.

    ``model``: an ONNX path or ``ModelProto``; or a torch model: what ``graphopt.from_torch``
    returns, an ``ExportedProgram`` or a ``.pt2`` path. ``output`` defaults to a file in a fresh
    temporary folder, removed with the returned artifact (``close()``, or its last reference
    dropped; ``save`` keeps a copy). With ``verify`` (the default), the artifact is run against
    the reference (onnxruntime; torch eager for torch models) on ``verify_inputs`` (when None:
    seeded random inputs, or a torch model's example inputs); on a mismatch
    :class:`VerificationError` is raised and nothing is written at ``output`` unless
    ``keep_unverified`` is set. ``dump_ir`` names a directory for the graph before/after each
    pass and the Relax module; ``svg`` a drawing of the graph after the passes (see
    :func:`prepare`). ``tuning_db``: a ``graphopt tune`` database for this target; kernels with
    records use them (``manifest["tuning"]`` names them). ``layout``: the activation layout
    convs compile in, one the target lists (``graphopt targets``; default: the target's own);
    the manifest records it. ``trust_pickle``: load a ``.pt2`` file as ``torch.export.load``
    does (unpickling, AOTInductor code, ...), which can run code from the file: only for files
    you trust (see ``graphopt.frontends.torch.load_pt2``).

    Before any work, ``output`` is checked: it must not be the model itself, and its
    folder must take a new file (the hidden temporary file the artifact is built in is
    made there first; ones a killed compile left behind are removed).
    """
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    spec = target if isinstance(target, TargetSpec) else resolve(target, **(target_options or {}))
    layout = check_layout(spec, layout)  # refuse one the target lacks before any work
    precision = check_precision(spec, precision)  # and a precision its hardware lacks
    tol = tolerances(precision, rtol, atol)
    tuning = {} if tuning_db is not None else None  # which kernels the database schedules
    tuning_passes = _tuning_for(tuning_db, spec, precision)  # refuses a foreign/corrupt one
    out_path, tmp, made = _reserve_output(output, model)  # and an unwritable output
    done = False
    try:  # the artifact is assembled in ``tmp`` and renamed into place when complete
        source, graph, records = prepare(
            model,
            input_shapes,
            passes,
            dump_ir=dump_ir,
            svg=svg,
            trust_pickle=trust_pickle,
            dynamic_batch=dynamic_batch,
            pass_defaults=spec.pass_defaults,
        )
        say(f"imported and rewrote {len(graph)} nodes ({', '.join(r['name'] for r in records)})")
        blocked = spec.target.cannot_run_here(spec.tvm)
        reference = reference_for(source, graph)
        if verify and not blocked:
            reference = _started(reference)

        with _stage("lower the graph to Relax"):
            mod = to_relax(graph)
        if dump_ir is not None:
            Path(dump_ir, f"{len(records) + 1:02d}-relax.py").write_text(mod.script())
        tuned = tuning_passes(mod, layout, tuning, say)
        with _stage(f"build the model for {spec.name}"), record_schedule() as scheduled:
            executable = build(mod, spec, layout, tuned, precision)
        compile_seconds = time.perf_counter() - start
        with _stage("read which schedule rule made each kernel"):
            schedule = schedule_summary(kernels(scheduled.module))
        chip = spec.tvm.get("mcpu") or spec.tvm.get("arch", "")
        say(
            f"built for {spec.name} ({chip}, layout {layout}, precision {precision}) "
            f"in {compile_seconds:.1f}s"
        )
        say(coverage_line(schedule))

        with _stage(f"export the library for {spec.name}"):
            spec.target.export(executable, tmp)
        _set_mode(tmp)
        manifest = {
            "format": "graphopt-artifact/2",  # 2: the library checksum
            "graphopt_version": __version__,
            "tvm_version": tvm_version(),
            "target": {
                "name": spec.name,
                "tvm": spec.tvm,
                "features": spec.target.features(spec.tvm),
                "layout": layout,
            },
            "precision": precision,  # what convs/matmuls compute in (verification tolerances)
            "inputs": [_spec(graph, n, n) for n in graph.inputs],
            "symbolic_dims": symbolic_dims([_spec(graph, n, n) for n in graph.inputs]),
            "outputs": [_spec(graph, v, n) for n, v in graph.public_outputs()],
            "passes": records,
            "ops": dict(sorted(graph.op_counts().items())),
            "source": _source_entry(model, source, graph),
            "compile_seconds": round(compile_seconds, 3),
            "verification": {"status": "skipped"},
            "tuning": tuning,  # None, or which kernels came from the tuning database
            "schedule": schedule,  # fast-path coverage, conv/matmul kernels on generic rules
            "library": library_digest(tmp),  # checked before every load
        }
        artifact = Artifact(tmp, manifest, check=False)  # not sealed yet
        if verify and blocked:  # e.g. CUDA compiled on a machine without a GPU
            manifest["verification"] = {"status": "not-run", "reason": blocked}
            say(f"verification NOT RUN: {blocked}; run `graphopt verify` where it can run")
        elif verify:
            inputs, whose = _check_inputs_for(source, verify_inputs)
            report = _verify(artifact, reference, inputs, whose, tol)
            manifest["verification"] = report
            say(verification_line(report))
            if not report["ok"] and not keep_unverified:
                bad = report["first_mismatch"]
                detail = bad.get("reason") or (
                    f"max |diff| {bad['max_abs_diff']:.3g}, "
                    + (
                        f"{bad['mismatched']} element(s) differ (integer/bool outputs "
                        "compare exactly)"
                        if bad.get("exact")
                        else f"{bad['mismatched']} element(s) out of tolerance"
                    )
                    + (
                        f", {bad['nonfinite_mismatched']} of them NaN/inf on one side only"
                        if bad.get("nonfinite_mismatched")
                        else ""
                    )
                )
                raise VerificationError(
                    f"artifact disagrees with {report['reference']} on output {bad['name']!r}: "
                    f"{detail} "
                    f"(rtol={tol.rtol}, atol={tol.atol}{tol.note()}); no artifact written "
                    "(--keep-unverified writes it anyway)"
                )
        artifact.close()  # the copy of the code verification loaded
        append_manifest(tmp, manifest)
        os.replace(tmp, out_path)
        done = True
    finally:
        tmp.unlink(missing_ok=True)
        for folder in () if done else made:  # a failed compile leaves no trace
            with contextlib.suppress(OSError):
                folder.rmdir()
    # Without ``output``, the temporary folder goes with the artifact (close, or its last
    # reference): a loop of compiles must not fill /tmp.
    return Artifact(out_path, manifest, owned_dir=out_path.parent if output is None else None)


def _tuning_for(path, spec: TargetSpec, precision: str):  # noqa: ANN001, ANN202
    """The tuning database at ``path`` opened and checked (target, CPU, ``precision``)
    before any work; returns the function that gives, for the lowered model, the passes
    for the target's schedule phase (none without a database): kernels with a record use
    it and ``report`` gets which, the target's default schedules do the rest. None at all
    when ``tune``'s whole-model check last measured this model slower with the database
    than without (``report`` says so), unless an earlier check of the model passed with
    the database smaller: then the records that check applied (``last_passing``)."""
    if path is None:
        return lambda *_args: []
    if not spec.target.tunable:
        raise TargetError(f"target {spec.name} does not take a tuning database (yet)")
    # MetaSchedule takes seconds to import: only when a database is used
    from graphopt.tuning import ApplyTuningDatabase, last_measured, last_passing, open_database

    database = open_database(path, spec, precision)

    def passes(mod, layout: str, report: dict, say) -> list:  # noqa: ANN001
        report.update(database=str(database.path), from_database={}, default=[])
        check = last_measured(mod, layout, database)
        if check is not None and check.tuned_vs_default is not None:
            report["whole_model"] = {
                "tuned_vs_default": round(check.tuned_vs_default, 4),
                "default_ms": check.default_ms,
                "tuned_ms": check.tuned_ms,
                "applied": not check.keeps_default,
            }
            if check.keeps_default:
                earlier = last_passing(mod, layout, database)
                if earlier is None:
                    say(
                        "tuning database: measured with this model when tuned, "
                        f"{check.why_default}; default schedules kept"
                    )
                    return []
                report["whole_model"]["earlier"] = {
                    "tuned_vs_default": round(earlier.tuned_vs_default, 4),
                    "default_ms": earlier.default_ms,
                    "tuned_ms": earlier.tuned_ms,
                    "records": len(earlier.selection),
                }
                say(
                    "tuning database: measured with this model when last tuned, "
                    f"{check.why_default}; using the {len(earlier.selection)} record(s) of "
                    f"its last passing check instead (tuned/default {earlier.tuned_vs_default:.3f})"
                )
                return [ApplyTuningDatabase(database, report, selection=earlier.selection)]
        return [ApplyTuningDatabase(database, report)]

    return passes


VERIFY_BATCHES = (1, 3)  # a dynamic-batch artifact is checked at batch 1 and a larger one


def _started(reference: tuple[str, Callable]) -> tuple[str, Callable]:
    """``reference`` (``reference_for``'s ``(name, make)``) with ``make`` already running
    in a thread, so the reference is ready when the build is done: onnxruntime loads a
    model while TVM builds it (it lets go of the GIL; VGG-11-BN's 530 MB of weights take
    it 5 s). ``make()`` then waits for it and raises what it raised."""
    name, make = reference
    pool = ThreadPoolExecutor(1, thread_name_prefix="graphopt-reference")
    made = pool.submit(make)
    pool.shutdown(wait=False)
    return name, made.result


def _verify(artifact: Artifact, reference, inputs, source: str, tol: Tolerance) -> dict:  # noqa: ANN001
    """``reference``: ``(name, make)``, ``make()`` returning ``inputs dict -> outputs dict``;
    ``inputs`` None means seeded random ones (at each of ``VERIFY_BATCHES`` for a
    dynamic-batch artifact), else ``source`` says whose they are."""
    if inputs is None and artifact.symbolic_dims:
        reports = []
        for batch in VERIFY_BATCHES:
            specs = concrete_specs(artifact.input_specs, batch)
            given = random_inputs(specs, seed=0), f"random(seed=0, batch={batch})"
            try:
                reports.append(_verify(artifact, reference, *given, tol))
            except VerificationError as exc:
                raise VerificationError(f"dynamic batch, at batch {batch}: {exc}") from None
        return _merge_reports(reports, VERIFY_BATCHES)
    if inputs is None:
        inputs, source = random_inputs(artifact.input_specs, seed=0), "random(seed=0)"
    check_inputs(artifact.input_specs, inputs)
    name, make = reference
    try:
        expected = make()(inputs)
    except Exception as exc:  # onnxruntime refuses some valid models (e.g. RNN layout=1)
        msg = first_line(exc)
        raise VerificationError(
            f"{name} cannot run this model, so graphopt cannot verify it: {msg}; "
            "--no-verify compiles without the check"
        ) from None
    try:
        actual = artifact.run(inputs)
    except GraphoptError:
        raise
    except Exception as exc:  # a kernel that fails at run time: never an artifact
        msg = first_line(exc)
        raise VerificationError(
            f"the compiled model failed when run for verification: {msg[:300]}; no artifact "
            "written (a graphopt/TVM limitation: please report it)"
        ) from exc
    report = compare(actual, expected, tol.rtol, tol.atol, scaled=tol.scaled)
    report.update(reference=name, inputs=source, precision=tol.precision)
    return report


def verification_line(report: dict) -> str:
    worst = max((o.get("max_abs_diff", float("inf")) for o in report["outputs"]), default=0.0)
    status = "passed" if report["ok"] else "FAILED"
    return (
        f"verification {status} against {report['reference']} "
        f"({report['inputs']} inputs, max |diff| {worst:.3g}{nonfinite_note(report)}, "
        f"rtol={report['rtol']}, atol={report['atol']}{_tolerance_note(report)})"
    )


def _tolerance_note(report: dict) -> str:
    """``", bf16 tolerances, atol relative to ..."`` for a reduced-precision artifact."""
    precision = report.get("precision", "fp32")
    return Tolerance(0, 0, bool(report.get("atol_scaled")), precision).note()


def nonfinite_note(report: dict) -> str:
    """``", 12 NaN/inf values equal on both sides"``, or "" when there were none."""
    n = sum(o.get("nonfinite_matched", 0) for o in report["outputs"])
    return f", {n} NaN/inf value(s) equal on both sides (not compared)" if n else ""


def _merge_reports(reports: list[dict], batches: tuple[int, ...]) -> dict:
    """One report for runs at several batch sizes: ok when all are; every output entry
    says its batch; the first mismatch is the first batch's that has one."""
    outputs = [
        {**o, "batch": b} for r, b in zip(reports, batches, strict=True) for o in r["outputs"]
    ]
    bad = next((o for o in outputs if not o["ok"]), None)
    return {
        **reports[0],
        "ok": bad is None,
        "outputs": outputs,
        "first_mismatch": bad,
        "inputs": f"random(seed=0, batch {' and '.join(map(str, batches))})",
        "batches": list(batches),
    }


def _spec(graph: Graph, value: str, name: str) -> dict:
    """A manifest entry; a symbolic dim (dynamic batch) is its name."""
    v = graph.values[value]
    shape = [d if isinstance(d, str) else int(d) for d in v.shape]
    return {"name": name, "shape": shape, "dtype": v.dtype}


def _source_name(model) -> str:  # noqa: ANN001
    return Path(model).name if isinstance(model, str | os.PathLike) else "<ModelProto>"


def _source_entry(model, source, graph: Graph) -> dict:  # noqa: ANN001
    """The manifest's ``source``: what was compiled, its SHA-256 and format."""
    if isinstance(source, onnx.ModelProto):
        return {
            "name": _source_name(model),
            "sha256": _sha256(source, model),
            "format": "onnx",
            "opset": graph.opset,
        }
    import torch

    return {
        "name": source.name,
        "sha256": source.sha256,
        "format": "torch",
        "torch_version": torch.__version__,
    }


def verify(
    artifact: Artifact | str | os.PathLike,
    model,  # noqa: ANN001 - what compile() took: ONNX path/ModelProto or a torch model
    inputs: dict[str, np.ndarray] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    trust_pickle: bool = False,
) -> dict:
    """Check an existing artifact against its source model, here and now.

    For an artifact compiled where it could not run (CUDA without a GPU), on the machine
    where it can. Returns the same report ``compile`` stores in the manifest. ``rtol``
    and ``atol`` default to the tolerances of the precision the artifact computes in.
    """
    if not isinstance(artifact, Artifact):
        artifact = Artifact(artifact)
    tol = tolerances(artifact.manifest.get("precision", "fp32"), rtol, atol)
    shapes = {s["name"]: tuple(s["shape"]) for s in artifact.input_specs}
    source, graph = load_model(model, shapes, trust_pickle=trust_pickle)
    inputs, whose = _check_inputs_for(source, inputs)
    return _verify(artifact, reference_for(source, graph), inputs, whose, tol)


def _check_inputs_for(source, given: dict | None) -> tuple[dict | None, str]:  # noqa: ANN001
    """The inputs verification uses and whose they are: the user's; else a torch model's
    own example inputs (token ids in range, for one); else None, seeded random ones."""
    if given is not None:
        return given, "user"
    if isinstance(source, onnx.ModelProto):
        return None, "user"
    return source.example_inputs, "example"
