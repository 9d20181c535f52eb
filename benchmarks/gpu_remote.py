"""CUDA artifacts built here, checked on a GPU machine that has only the TVM runtime.

    python benchmarks/gpu_remote.py build DIR [--arch sm_90] [--models ...] [--precision fp16]
    python benchmarks/gpu_remote.py run DIR [--repeat 50]          # on the GPU machine

``build`` (this machine: graphopt, TVM's compiler and nvcc, no GPU needed) compiles each
model for CUDA into ``DIR/<name>.so`` (verification off: there is no GPU to run it on) and
writes ``DIR/<name>.npz``: seeded inputs (``in:<name>``) and onnxruntime's fp32 outputs on
the CPU (``ref:<i>``); the ONNX file too where it is small, so ``run`` can time torch eager
on the same model. ``run`` (the GPU machine) needs numpy and TVM's *runtime* alone
(``TVM_USE_RUNTIME_LIB=1`` works): it never imports graphopt, reads each artifact's manifest
from the file's tail, loads the library with ``tvm.runtime.load_module`` as a deployment
would, runs it on GPU 0, compares with the reference at the manifest's precision's
tolerance, and times it (median, inputs on the device). With torch on CUDA there, it also
times torch eager on the ONNX model (``benchmarks/_onnx_torch.py``). Exit status 1 when any
artifact is wrong or fails to load.

``benchmarks/gpu_check.py`` is the one-machine version (compile and run on the GPU host).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MAGIC = b"\x00GRAPHOPT-MANIFEST-v1"  # graphopt.artifact.MAGIC; run must not import graphopt
_ONNX_CARRY_BYTES = 8 << 20  # ONNX files up to this size travel for the torch timing
# (rtol, atol) per precision: fp32 as graphopt's verification; lower types as their epsilon
_DEFAULT_MODELS = "small_cnn,conv_variants,pool_variants,mlp_head,mobilenetv2,lstm_classifier"
TOLERANCE = {"fp32": (1e-3, 1e-4), "bf16": (5e-2, 5e-2), "fp16": (1e-2, 1e-2)}


def _models(names: list[str]) -> dict:
    """name -> ONNX ModelProto: zoo names, public-model names, or torch-zoo RNNs."""
    import onnx

    from graphopt import zoo, zoo_torch

    out = {}
    for name in names:
        if name in zoo.ZOO:
            out[name] = zoo.build(name)
            continue
        if name in _RNNS:
            out[name] = _rnn_onnx(getattr(zoo_torch, _RNNS[name][0]), _RNNS[name][1])
            continue

        sys.path.insert(0, str(HERE))
        from _public_models import MODELS, export_onnx

        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}: a zoo or benchmarks/_public_models name")
        out[name] = onnx.load(export_onnx(name))
    return out


# torch-zoo recurrent models: name -> (class in graphopt.zoo_torch, example token ids shape)
_RNNS = {"lstm_classifier": ("LSTMClassifier", (1, 32)), "gru_tagger": ("GRUTagger", (1, 32))}


def _rnn_onnx(cls, shape: tuple):  # noqa: ANN001, ANN202 - torch class -> ModelProto
    import io

    import onnx
    import torch

    torch.manual_seed(0)
    module = cls().eval()
    tokens = torch.randint(0, 100, shape)
    buf = io.BytesIO()
    torch.onnx.export(module, (tokens,), buf, opset_version=17, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def build(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    import graphopt
    from graphopt.targets import TargetSpec

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    spec = TargetSpec("cuda", {"kind": "cuda", "arch": args.arch}) if args.arch != "x86" else "x86"
    kwargs = {} if args.precision == "fp32" else {"precision": args.precision}
    for name, model in _models(args.models.split(",")).items():
        start = time.perf_counter()
        art = graphopt.compile(model, spec, folder / f"{name}.so", verify=False, **kwargs)
        inputs = art.random_inputs(seed=0)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = sess.run(None, inputs)
        arrays = {f"in:{k}": v for k, v in inputs.items()}
        arrays.update({f"ref:{i}": r for i, r in enumerate(ref)})
        np.savez(folder / f"{name}.npz", **arrays)
        data = model.SerializeToString()
        if len(data) <= _ONNX_CARRY_BYTES:
            (folder / f"{name}.onnx").write_bytes(data)
        print(f"built {name} in {time.perf_counter() - start:.1f} s", flush=True)


def read_manifest(path: Path) -> dict:
    """The JSON graphopt appends after the library (see graphopt/artifact.py)."""
    data = path.read_bytes()
    if not data.endswith(MAGIC):
        raise ValueError(f"{path} is not a graphopt artifact")
    end = len(data) - len(MAGIC) - 8
    n = int.from_bytes(data[end : end + 8], "little")
    return json.loads(data[end - n : end])


def _timed(fn, sync, repeat: int) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _torch_ms(onnx_path: Path, inputs: dict, repeat: int) -> str:
    try:
        import onnx
        import torch

        sys.path.insert(0, str(HERE))
        from _onnx_torch import Unsupported
        from _onnx_torch import build as torch_build
    except ImportError as exc:
        return f"n/a ({exc.name} missing)"
    if not torch.cuda.is_available() or not onnx_path.exists():
        return "n/a"
    try:
        fn = torch_build(onnx.load(onnx_path), device="cuda")
    except Unsupported:
        return "n/a (op)"
    feed = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}
    with torch.no_grad():
        return f"{_timed(lambda: fn(**feed), torch.cuda.synchronize, repeat):.3f}"


def _device(kind: str):  # noqa: ANN202 - a tvm Device
    """GPU 0 (loading TVM's CUDA runtime library by hand where a runtime-only TVM did not),
    or the CPU for a dry run of an x86 build."""
    import ctypes

    import tvm

    if kind == "cpu":
        return tvm.cpu(0)
    if not tvm.runtime.enabled("cuda"):
        lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        if lib.exists():
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return tvm.cuda(0)


def run_one(path: Path, dev, repeat: int) -> dict:  # noqa: ANN001
    import tvm
    from tvm.runtime.vm import VirtualMachine

    manifest = read_manifest(path)
    data = np.load(path.with_suffix(".npz"))
    inputs = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
    refs = [data[f"ref:{i}"] for i in range(sum(k.startswith("ref:") for k in data.files))]
    vm = VirtualMachine(tvm.runtime.load_module(str(path)), dev)
    names = [i["name"] for i in manifest["inputs"]]
    args = [tvm.runtime.tensor(inputs[n], dev) for n in names]
    main = vm["main"]
    out = main(*args)
    outs = list(out) if not hasattr(out, "numpy") else [out]
    got = [o.numpy() for o in outs]
    precision = manifest.get("precision", "fp32")
    rtol, atol = TOLERANCE[precision]
    if len(got) != len(refs):
        raise ValueError(f"{len(got)} outputs, the reference has {len(refs)}")
    pairs = list(zip(got, refs, strict=True))
    diff = max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in pairs)

    def bound(r: np.ndarray) -> float:
        return atol if precision == "fp32" else atol * max(1.0, float(np.abs(r).max()))

    ok = all(np.allclose(g, r, rtol=rtol, atol=bound(r)) for g, r in pairs)
    ms = _timed(lambda: main(*args), dev.sync, repeat)
    return {
        "precision": precision,
        "max_diff": diff,
        "ok": ok,
        "ms": ms,
        "torch_ms": _torch_ms(path.with_suffix(".onnx"), inputs, repeat),
    }


def run(args: argparse.Namespace) -> None:
    import tvm

    dev = _device(args.device)
    if not dev.exist:
        print(f"error: no {args.device} device visible to the TVM runtime here", file=sys.stderr)
        sys.exit(2)
    name = dev.device_name if args.device == "cuda" else "CPU"
    print(f"# {name}, TVM {tvm.__version__} runtime")
    print(
        f"batch 1, median of {args.repeat} runs, inputs on the device, reference: "
        "onnxruntime fp32 on the build machine's CPU\n"
    )
    print("| model | precision | max abs diff | within tolerance | graphopt ms | torch eager ms |")
    print("|---|---|---:|---|---:|---:|")
    failed = 0
    for path in sorted(Path(args.dir).glob("*.so")):
        try:
            r = run_one(path, dev, args.repeat)
        except Exception as exc:  # noqa: BLE001 - report every model, then fail
            failed += 1
            print(f"| {path.stem} | FAILED: {type(exc).__name__}: {str(exc)[:300]} | | | | |")
            continue
        failed += not r["ok"]
        print(
            f"| {path.stem} | {r['precision']} | {r['max_diff']:.3g} | "
            f"{'yes' if r['ok'] else 'NO'} | {r['ms']:.3f} | {r['torch_ms']} |",
            flush=True,
        )
    sys.exit(1 if failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile CUDA artifacts and references here")
    b.add_argument("dir")
    b.add_argument("--arch", default="sm_90", help="a CUDA arch, or x86 for a CPU dry run")
    b.add_argument("--models", default=_DEFAULT_MODELS)
    b.add_argument("--precision", default="fp32", choices=sorted(TOLERANCE))
    r = sub.add_parser("run", help="run and time the artifacts on this machine's GPU")
    r.add_argument("dir")
    r.add_argument("--repeat", type=int, default=50)
    r.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: dry run")
    args = parser.parse_args()
    build(args) if args.cmd == "build" else run(args)


if __name__ == "__main__":
    main()
