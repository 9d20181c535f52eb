"""Fold the weight transforms of a whole model with one LLVM build, not one per kernel.

After LegalizeOps, every weight transform (a packed conv's OIHW -> OIHW[x]i[y]o layout, a
Winograd weight transform, a packed GEMM's column panels, a BatchNorm scale folded into a
weight) is a ``call_tir`` whose arguments are constants. Relax's ``FoldConstant`` builds
and runs each such PrimFunc on its own: a DenseNet-121 has ~300 of them, and the builds
took 26 s of its 100 s compile on a 2-core Zen 3 (0.09 s of fixed cost each: the TIR
pipeline and an LLVM module per function).

``FoldConstantCalls()`` does the same folding with one build per round: it collects every
``call_tir`` of constants (arguments that are constants, or variables bound to
constants), builds their PrimFuncs as one host module, runs each call, and puts the
results in as constants; a second round folds what the first made foldable (a transform
of a transformed weight). The PrimFuncs nobody calls any more are then dropped, and
``FoldConstant`` runs after it for what this pass leaves (calls with a symbolic shape,
tuple outputs, Relax ops on constants).

Where: in the CPU pipeline's legalize phase, right before ``FoldConstant``
(``graphopt/targets/_cpu.py``). The functions run on the host whatever the target (an
ARM compile folds its weights on the x86 machine), as ``FoldConstant`` does.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

__all__ = ["FoldConstantCalls"]

# Rounds of folding (each one build): a transform of a transformed weight needs two.
_MAX_ROUNDS = 4


def _static_tensor(expr) -> tuple[list[int], str] | None:  # noqa: ANN001
    """(shape, dtype) of a tensor-valued expression with a known shape, else None."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or getattr(ty, "shape", None) is None:
        return None
    shape = getattr(ty.shape, "values", None)
    if shape is None or any(not isinstance(d, tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape], str(ty.dtype)


def _make_mutator(results: list | None):  # noqa: ANN202
    """A mutator over the foldable calls, in visiting order: with ``results`` None it only
    records them (``.found``: (PrimFunc's GlobalVar, constant args, out shape, dtype)); with
    ``results`` it replaces the i-th with ``results[i]``. Both passes see the same module,
    so the i-th call is the same call."""

    @relax.expr_functor.mutator
    class Fold(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule) -> None:
            super().__init__(mod)
            self.found = []

        def constant(self, expr):  # noqa: ANN001, ANN202
            if isinstance(expr, tvm.ir.expr.Constant):
                return expr
            if isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                # a constant this round put in was no constant when the calls were found
                if isinstance(bound, tvm.ir.expr.Constant) and not any(
                    bound.same_as(r) for r in results or ()
                ):
                    return bound
            return None

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not call.op.same_as(tvm.ir.Op.get("relax.call_tir")) or len(call.args) != 2:
                return call
            gvar, args = call.args
            out = _static_tensor(call)
            if not isinstance(args, relax.Tuple) or out is None:
                return call
            consts = [self.constant(a) for a in args.fields]
            if any(c is None for c in consts):
                return call
            index = len(self.found)
            self.found.append((gvar, consts, *out))
            if results is None:
                return call
            return results[index]

    return Fold


def _run_calls(mod: tvm.IRModule, found: list) -> list:
    """Build the calls' PrimFuncs as one host module, run each call, return constants."""
    funcs = {}
    for gvar, *_ in found:
        name = gvar.name_hint
        funcs[name] = mod[gvar].with_attr("global_symbol", name)
    lib = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target("llvm"))
    device = tvm.cpu()
    results = []
    for gvar, consts, shape, dtype in found:
        out = tvm.runtime.empty(shape, dtype, device)
        lib[gvar.name_hint](*[c.value for c in consts], out)
        results.append(relax.const(out))
    return results


def FoldConstantCalls() -> tvm.transform.Pass:  # noqa: N802 - a pass, named like TVM's
    """Fold every ``call_tir`` of constants, one host build per round (module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="graphopt.FoldConstantCalls")
    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: ANN001
        folded = False
        for _ in range(_MAX_ROUNDS):
            entries = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
            finder = _make_mutator(None)(mod)
            for _gv, func in entries:
                finder.visit_expr(func)
            if not finder.found:
                break
            results = _run_calls(mod, finder.found)
            rewriter = _make_mutator(results)(mod)
            for gv, func in entries:
                mod[gv] = rewriter.visit_expr(func)
            folded = True
        if folded:
            mod = relax.transform.DeadCodeElimination()(mod)
        return mod

    return apply
