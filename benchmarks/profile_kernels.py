"""Per-kernel time of a zoo model compiled for x86: where the milliseconds go.

    python benchmarks/profile_kernels.py resnet18 [--layout nhwc] [--top 25] [--repeat 50]

Runs the x86 pipeline up to (and including) the default schedules, then builds and times
every PrimFunc on its own with random inputs (TVM's time_evaluator), multiplied by how
many times the model's main function calls it. The sum approximates the model's latency
without the VM's per-call overhead; the table says which rule scheduled each kernel.
"""

from __future__ import annotations

import argparse

import numpy as np
import tvm
from tvm import relax, tirx

from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import resolve
from graphopt.targets._runner import use_all_cores
from graphopt.zoo import build


def scheduled_module(
    name: str, layout: str | None = None
) -> tuple[tvm.IRModule, tvm.target.Target]:
    _, graph, _ = prepare(build(name))
    spec = resolve("x86")
    target = tvm.target.Target(spec.tvm)
    phases = spec.target.phases(target, layout)
    seq = [p for key in ("library_dispatch", "layout", "legalize", "schedule") for p in phases[key]]
    with target:
        mod = tvm.transform.Sequential(seq)(to_relax(graph))
    return mod, target


def _calls(mod: tvm.IRModule) -> dict[str, tuple[int, list]]:
    """kernel name -> (calls from main, [(shape, dtype)] of its args then its outputs)."""
    found: dict[str, tuple[int, list]] = {}
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            op = getattr(call, "op", None)
            if not (isinstance(call, relax.Call) and getattr(op, "name", "") == "relax.call_tir"):
                continue
            name = call.args[0].name_hint
            types = [a.ty for a in call.args[1].fields] + [binding.var.ty]
            sig = []
            for ty in types:
                for t in getattr(ty, "fields", [ty]):
                    sig.append(([int(d) for d in t.shape.values], str(t.dtype)))
            n = found.get(name, (0, sig))[0]
            found[name] = (n + 1, sig)
    return found


def _args(sig: list, dev) -> list:  # noqa: ANN001
    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(rng.standard_normal(s).astype(d), dev) for s, d in sig]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--layout", help="x86 layout (default: the target's)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    print(f"TVM threads: {use_all_cores()}")
    mod, target = scheduled_module(args.model, args.layout)
    calls = _calls(mod)
    dev = tvm.cpu()
    rows = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or gvar.name_hint not in calls:
            continue
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
        f = lib.jit().time_evaluator("main", dev, number=args.repeat, repeat=3, min_repeat_ms=20)
        n, sig = calls[gvar.name_hint]
        ms = min(f(*_args(sig, dev)).results) * 1e3
        rule = str(func.attrs.get("graphopt.schedule_rule", "-")) if func.attrs else "-"
        rows.append((ms * n, ms, n, gvar.name_hint, rule))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    layout = args.layout or "default layout"
    print(f"# {args.model} ({layout}): {len(rows)} kernels, sum {total:.3f} ms")
    print("| total ms | % | ms/call | calls | kernel | rule |")
    print("|---:|---:|---:|---:|---|---|")
    for t, ms, n, name, rule in rows[: args.top]:
        print(f"| {t:.3f} | {100 * t / total:.1f} | {ms:.4f} | {n} | {name} | {rule} |")


if __name__ == "__main__":
    main()
