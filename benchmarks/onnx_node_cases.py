"""Run ONNX's own backend node cases through graphopt (or TVM's ONNX importer, or
onnxruntime) and print how many pass, how many are refused at compile time, how many
give wrong numbers and how many fail at run time.

    python benchmarks/onnx_node_cases.py                    # the CNN/RNN op slice
    python benchmarks/onnx_node_cases.py --all              # every node case
    python benchmarks/onnx_node_cases.py --ops Resize Pad -v
    python benchmarks/onnx_node_cases.py --engine tvm       # TVM 0.27's own importer

The cases come from ``onnx.backend.test.case.node.collect_testcases()`` (onnx's wheel
ships no test data). Each case runs in a worker process with a time limit, so a crash
or a hang counts against that case only. ``--json FILE`` writes every case's outcome.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import sys
import time
import warnings

# The op under test of each case is its model's first non-Constant node.
CNN_RNN_OPS = (
    "Conv ConvTranspose BatchNormalization InstanceNormalization LRN Relu LeakyRelu PRelu "
    "Elu Selu Sigmoid HardSigmoid HardSwish Tanh Softplus Clip MaxPool AveragePool "
    "GlobalAveragePool GlobalMaxPool Gemm MatMul Add Mul Concat Flatten Reshape Transpose "
    "Softmax LogSoftmax Pad Resize LSTM GRU RNN"
).split()

OUTCOMES = ("pass", "refused", "wrong", "runtime-error", "crash", "timeout")


def op_under_test(case) -> str:
    for node in case.model.graph.node:
        if node.op_type != "Constant":
            return node.op_type
    return "Constant"


def _cases(ops: set[str] | None, names: set[str] | None):
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    picked = []
    for case in cases:
        if names is not None and case.name not in names:
            continue
        if ops is not None and op_under_test(case) not in ops:
            continue
        picked.append(case)
    return picked


def _compare(expected, got, rtol, atol) -> str | None:
    import numpy as np

    if len(expected) != len(got):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        e, g = np.asarray(e), np.asarray(g)
        if e.shape != g.shape:
            return f"output {i}: shape {g.shape}, expected {e.shape}"
        if e.dtype.kind in "OUS":
            if not np.array_equal(e, g):
                return f"output {i}: values differ"
            continue
        if e.dtype.kind in "biu" or e.dtype == bool:
            if g.dtype != e.dtype or not np.array_equal(e, g):
                return f"output {i}: values differ ({g.dtype} vs {e.dtype})"
            continue
        try:
            np.testing.assert_allclose(
                g.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True
            )
        except AssertionError as exc:
            return f"output {i}: " + str(exc).strip().splitlines()[0]
    return None


def _run_graphopt(model, inputs):
    import graphopt
    from graphopt.errors import GraphoptError

    try:
        art = graphopt.compile(model, target="x86", verify=False)
    except GraphoptError as exc:
        return "refused", str(exc).splitlines()[0] if str(exc) else type(exc).__name__, None
    names = [s["name"] for s in art.input_specs]
    feed = dict(zip(names, inputs, strict=False))
    try:
        out = art.run(feed)
    except Exception as exc:  # noqa: BLE001 - classify, do not stop the sweep
        return "runtime-error", f"{type(exc).__name__}: {str(exc).splitlines()[0:1]}", None
    finally:
        art.close()
    return None, None, list(out.values())


def _run_tvm(model, inputs):
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(model, keep_params_in_input=False)
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = relax.transform.LegalizeOps()(mod)
        ex = tvm.compile(mod, target="llvm")
    except Exception as exc:  # noqa: BLE001
        return "refused", f"{type(exc).__name__}: {str(exc)[:200]}", None
    try:
        vm = relax.VirtualMachine(ex, tvm.cpu())
        out = vm["main"](*[tvm.runtime.tensor(np.asarray(x)) for x in inputs])
        outs = [out] if not isinstance(out, tvm.ir.Array | list | tuple) else list(out)
        return None, None, [o.numpy() for o in outs]
    except Exception as exc:  # noqa: BLE001
        return "runtime-error", f"{type(exc).__name__}: {str(exc)[:200]}", None


def _run_ort(model, inputs):
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return "refused", f"{type(exc).__name__}: {str(exc)[:200]}", None
    names = [i.name for i in sess.get_inputs()]
    try:
        return None, None, sess.run(None, dict(zip(names, inputs, strict=False)))
    except Exception as exc:  # noqa: BLE001
        return "runtime-error", f"{type(exc).__name__}: {str(exc)[:200]}", None


ENGINES = {"graphopt": _run_graphopt, "tvm": _run_tvm, "ort": _run_ort}


def _worker(engine, model_bytes, data_sets, tolerances, queue):
    import onnx

    os.environ.setdefault("TVM_NUM_THREADS", "1")
    model = onnx.load_from_string(model_bytes)
    results = []
    for inputs, expected in data_sets:
        # some cases give TensorProtos (float8, bfloat16 data) rather than arrays
        inputs = [
            onnx.numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x for x in inputs
        ]
        outcome, detail, got = ENGINES[engine](model, inputs)
        if outcome is None:
            detail = _compare(list(expected), got, *tolerances)
            outcome = "wrong" if detail else "pass"
        results.append((outcome, detail))
        if outcome != "pass":
            break
    queue.put(results[-1])


def run_case(engine: str, case, timeout: float) -> tuple[str, str | None]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args = (engine, case.model.SerializeToString(), case.data_sets, (case.rtol, case.atol), queue)
    proc = ctx.Process(target=_worker, args=args)
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty: the worker died or hung
        result = None
    else:
        proc.join(10)
        return result
    if proc.is_alive():
        proc.kill()
        proc.join()
        return "timeout", f"over {timeout:.0f} s"
    proc.join()
    return "crash", f"worker exit code {proc.exitcode}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="every node case, not the CNN/RNN slice")
    p.add_argument("--ops", nargs="*", help="only cases whose op under test is one of these")
    p.add_argument("--names", nargs="*", help="only these case names")
    p.add_argument("--engine", choices=sorted(ENGINES), default="graphopt")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", help="write every case's outcome to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case not passing")
    args = p.parse_args(argv)

    ops = set(args.ops) if args.ops else (None if args.all or args.names else set(CNN_RNN_OPS))
    cases = _cases(ops, set(args.names) if args.names else None)
    op_of = {c.name: op_under_test(c) for c in cases}
    started = time.monotonic()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outcomes = dict(
            zip(
                [c.name for c in cases],
                pool.map(lambda c: run_case(args.engine, c, args.timeout), cases),
                strict=True,
            )
        )
    counts = collections.Counter(o for o, _ in outcomes.values())
    if args.verbose:
        for name, (outcome, detail) in sorted(outcomes.items()):
            if outcome != "pass":
                print(f"{outcome:14} {op_of[name]:22} {name}: {detail}")
    per_op = collections.defaultdict(collections.Counter)
    for name, (outcome, _) in outcomes.items():
        per_op[op_of[name]][outcome] += 1
    failing = sorted(
        (
            (sum(c.values()) - c["pass"], op)
            for op, c in per_op.items()
            if c["pass"] < sum(c.values())
        ),
        reverse=True,
    )
    print("ops with failing cases:", ", ".join(f"{op} {n}" for n, op in failing[:40]))
    total = len(cases)
    print(
        f"{args.engine}: {counts['pass']}/{total} pass "
        f"({100 * counts['pass'] / max(total, 1):.1f}%); "
        + ", ".join(f"{k} {counts[k]}" for k in OUTCOMES[1:])
        + f"; {time.monotonic() - started:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {n: {"op": op_of[n], "outcome": o, "detail": d} for n, (o, d) in outcomes.items()},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
