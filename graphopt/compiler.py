"""``graphopt.compile``: model in, verified artifact out.

The order, one line each:
  1. frontend   - load and check the model, fix input shapes, convert to the graph IR;
  2. passes     - graph-level rewrites (``graphopt.passes.DEFAULT_PIPELINE``);
  3. check      - name every op that cannot lower, before TVM does any work;
  4. lower      - graph IR to a Relax IRModule;
  5. build      - the target's Relax phases, then ``tvm.compile`` and export;
  6. verify     - run the artifact against onnxruntime on the same inputs;
  7. publish    - append the manifest and rename into place (never a half file).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import graphopt
from graphopt.artifact import Artifact, append_manifest, check_inputs, random_inputs
from graphopt.errors import UnsupportedOpsError, VerificationError
from graphopt.frontends.onnx import graph_to_onnx, load_onnx, onnx_to_graph, parse_input_shapes
from graphopt.ir import Graph
from graphopt.lower import unsupported_nodes
from graphopt.passes import Pass, default_passes, run_passes
from graphopt.targets import TargetSpec, resolve
from graphopt.verify import DEFAULT_ATOL, DEFAULT_RTOL, compare, onnxruntime_reference

__all__ = ["compile", "prepare"]


def _fixed_proto(proto: onnx.ModelProto, graph: Graph) -> onnx.ModelProto:
    """The user's model with the input shapes graphopt compiled for (for onnxruntime)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    shapes = {name: graph.values[name].shape for name in graph.inputs}
    for inp in fixed.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape
            dims.ClearField("dim")
            for d in shapes[inp.name]:
                dims.dim.add().dim_value = d
    return fixed


def prepare(model, input_shapes=None, passes: list[Pass] | None = None):  # noqa: ANN001, ANN201
    """Steps 1-3: return ``(proto, graph, pass_records)`` or raise with every bad node."""
    proto = load_onnx(model)
    graph = onnx_to_graph(proto, parse_input_shapes(input_shapes))
    graph, records = run_passes(graph, default_passes() if passes is None else passes)
    bad = unsupported_nodes(graph)
    if bad:
        raise UnsupportedOpsError(bad)
    return proto, graph, records


def _sha256(proto: onnx.ModelProto, model) -> str:  # noqa: ANN001
    if isinstance(model, str | os.PathLike):
        data = Path(model).read_bytes()
    else:
        data = proto.SerializeToString()
    return hashlib.sha256(data).hexdigest()


def compile(  # noqa: A001 - the public name users expect
    model: str | os.PathLike | onnx.ModelProto,
    target: str | dict | TargetSpec = "x86",
    output: str | os.PathLike | None = None,
    *,
    input_shapes: dict | list[str] | None = None,
    passes: list[Pass] | None = None,
    verify: bool = True,
    verify_inputs: dict[str, np.ndarray] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    keep_unverified: bool = False,
    target_options: dict | None = None,
    log=None,  # noqa: ANN001 - callable(str) for progress lines
) -> Artifact:
    """Compile an ONNX model (path or ``ModelProto``) into a verified :class:`Artifact`.

    ``output`` defaults to a fresh temporary file. With ``verify`` (the default), the
    artifact is run against onnxruntime on ``verify_inputs`` (seeded random inputs when
    None); on a mismatch :class:`VerificationError` is raised and nothing is written at
    ``output`` unless ``keep_unverified`` is set.
    """
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    spec = target if isinstance(target, TargetSpec) else resolve(target, **(target_options or {}))
    proto, graph, records = prepare(model, input_shapes, passes)
    say(f"imported and rewrote {len(graph)} nodes ({', '.join(r['name'] for r in records)})")

    from graphopt.lower import to_relax

    mod = to_relax(graph)
    executable = _build(mod, spec)
    compile_seconds = time.perf_counter() - start
    say(f"built for {spec.name} ({spec.tvm.get('mcpu', '')}) in {compile_seconds:.1f}s")

    out_path = (
        Path(output)
        if output is not None
        else Path(tempfile.mkdtemp(prefix="graphopt-")) / "model.so"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".so", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        spec.module.export(executable, tmp)
        manifest = {
            "format": "graphopt-artifact/1",
            "graphopt_version": graphopt.__version__,
            "tvm_version": _tvm_version(),
            "target": {"name": spec.name, "tvm": spec.tvm},
            "inputs": [_spec(graph, n) for n in graph.inputs],
            "outputs": [_spec(graph, n) for n in graph.outputs],
            "passes": records,
            "ops": dict(sorted(graph.op_counts().items())),
            "source": {
                "name": _source_name(model),
                "sha256": _sha256(proto, model),
                "format": "onnx",
                "opset": graph.opset,
            },
            "compile_seconds": round(compile_seconds, 3),
            "verification": {"status": "skipped"},
        }
        artifact = Artifact(tmp, manifest)
        if verify:
            report = _verify(artifact, _fixed_proto(proto, graph), verify_inputs, rtol, atol)
            manifest["verification"] = report
            say(_verification_line(report))
            if not report["ok"] and not keep_unverified:
                bad = report["first_mismatch"]
                detail = bad.get("reason") or (
                    f"max |diff| {bad['max_abs_diff']:.3g}, "
                    f"{bad['mismatched']} element(s) out of tolerance"
                )
                raise VerificationError(
                    f"artifact disagrees with onnxruntime on output {bad['name']!r}: {detail} "
                    f"(rtol={rtol}, atol={atol}); no artifact written "
                    "(--keep-unverified writes it anyway)"
                )
        append_manifest(tmp, manifest)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return Artifact(out_path, manifest)


def _build(mod, spec: TargetSpec):  # noqa: ANN001, ANN202
    import tvm

    target = tvm.target.Target(spec.tvm)
    phases = spec.module.phases(target)

    @tvm.transform.module_pass(opt_level=0, name=f"graphopt_{spec.name}_pipeline")
    def pipeline(m, _ctx):  # noqa: ANN001, ANN202
        with target:
            return tvm.transform.Sequential([p for ps in phases.values() for p in ps])(m)

    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def _verify(artifact: Artifact, proto: onnx.ModelProto, inputs, rtol: float, atol: float) -> dict:  # noqa: ANN001
    source = "user" if inputs is not None else "random(seed=0)"
    if inputs is None:
        inputs = random_inputs(artifact.input_specs, seed=0)
    check_inputs(artifact.input_specs, inputs)
    try:
        expected = onnxruntime_reference(proto)(inputs)
    except Exception as exc:  # onnxruntime refuses some valid models (e.g. RNN layout=1)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(
            f"onnxruntime cannot run this model, so graphopt cannot verify it: {msg}; "
            "--no-verify compiles without the check"
        ) from None
    report = compare(artifact.run(inputs), expected, rtol, atol)
    report.update(reference="onnxruntime", inputs=source)
    return report


def _verification_line(report: dict) -> str:
    worst = max((o.get("max_abs_diff", float("inf")) for o in report["outputs"]), default=0.0)
    status = "passed" if report["ok"] else "FAILED"
    return (
        f"verification {status} against {report['reference']} "
        f"({report['inputs']} inputs, max |diff| {worst:.3g}, rtol={report['rtol']}, "
        f"atol={report['atol']})"
    )


def _spec(graph: Graph, name: str) -> dict:
    v = graph.values[name]
    return {"name": name, "shape": [int(d) for d in v.shape], "dtype": v.dtype}


def _source_name(model) -> str:  # noqa: ANN001
    return Path(model).name if isinstance(model, str | os.PathLike) else "<ModelProto>"


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


_ = graph_to_onnx  # re-exported for dumps by callers of prepare()
