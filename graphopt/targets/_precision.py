"""Lower precision: convs and matmuls in bf16/fp16 with fp32 accumulation, the rest fp32.

``LowerPrecision(dtype)`` is a Relax pass. For every conv (1-D, 2-D, 3-D, transposed)
and matmul whose second operand is a weight (a constant, possibly behind layout
transforms, transposes, reshapes, casts, slices, splits, gathers with constant indices or
concats of constants: what FoldConstant folds), or a matmul whose *first* operand is one,
and whose operands are float32:

    y = conv(x, w)  ->  y = conv(astype(x, dtype), astype(w, dtype), out_dtype=float32)

The weight's ``astype`` acts on a constant, so the FoldConstant after LegalizeOps
converts every weight once, at compile time. Each product is computed from the
lower-precision operands and summed in float32 (the TE computes cast every term to
``out_dtype`` before the sum), so rounding enters once per operand, not per partial
sum. Everything else (normalizations, softmax, reductions, RNN state updates, the
model's inputs and outputs, activation x activation matmuls such as attention scores)
stays float32.

Why not ``relax.transform.ToMixedPrecision``: it is written for fp16 only, and it keeps
the elementwise ops that follow a conv in fp16 too (its "follow" class), so activations
would be stored and added in fp16; it also makes graphopt's packed-NCHWc conv pass
(float32 convs only) give up. This pass converts exactly the operators the issue names.

Recurrent layers: ``expand-rnn`` turns LSTM/GRU/RNN into one input-projection MatMul per
direction and one recurrent MatMul per step (weights packed in column blocks, constants),
so both run in the lower type with float32 sums while the gates and the cell/hidden state
updates stay float32. The fused step kernel (``expand-rnn{fuse_steps=true}``,
``graphopt::RNNStep``, :mod:`graphopt.targets._gemv`) is one TIR function with its
recurrent product inside; it stays float32 (only its input projection is lowered).

A target may keep calls in float32 where it computes them faster so (``keep``, the
Target's ``keeps_fp32``): x86 without AMX keeps the 3x3 convs Winograd F(4x4, 3x3) takes
(:func:`graphopt.targets._winograd.keeps_fp32`), and every x86 bf16 build keeps an RGB
stem conv (:func:`graphopt.targets._bf16.keeps_fp32`). Keeping is never less accurate.

Put it after the layout phase (so convs are already packed) and before LegalizeOps.

``refusal(tvm_dict, precision)`` says why a target cannot compute in a precision (one
line naming the missing feature), or None. ``PRECISIONS`` names the choices.
"""

from __future__ import annotations

import re

from graphopt.targets._cpu import host_cpu as _host_cpu
from graphopt.targets._cpu import host_cpu_flags as _cpuinfo_flags
from graphopt.targets._cpu import llvm_features as _llvm_features

__all__ = ["PRECISIONS", "DTYPES", "LowerPrecision", "refusal", "lowered_ops"]

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

_CONVS = ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d")
_CONV_T = ("relax.nn.conv1d_transpose", "relax.nn.conv2d_transpose")
# ops between a constant and its use that keep it a weight (folded at compile time)
_WEIGHT_PATH = {
    "relax.layout_transform",
    "relax.permute_dims",
    "relax.reshape",
    "relax.astype",
    "relax.expand_dims",
    "relax.squeeze",
    "relax.flatten",
    "relax.broadcast_to",
    "relax.strided_slice",  # a recurrent node's gate or direction block of its weights
    "relax.split",  # (through a TupleGetItem)
}
# ops whose every operand must be a weight: a gather with constant indices, a concat
_WEIGHT_ALL = {"relax.take", "relax.concat"}
_MAX_DEPTH = 8


def _dtype(expr) -> str:  # noqa: ANN001
    return str(getattr(expr.ty, "dtype", ""))


def _lowered_call(call, lx, lw):  # noqa: ANN001, ANN202
    """``call`` (a conv or matmul) on ``lx``, ``lw`` with a float32 result."""
    from tvm import relax

    name = call.op.name
    if name == "relax.matmul":
        return relax.op.matmul(lx, lw, out_dtype="float32")
    a = call.attrs
    common = {
        "strides": a.strides,
        "padding": a.padding,
        "dilation": a.dilation,
        "groups": a.groups,
        "data_layout": a.data_layout,
        "kernel_layout": a.kernel_layout,
        "out_layout": a.out_layout,
        "out_dtype": "float32",
    }
    if name in _CONV_T:
        common["output_padding"] = a.output_padding
    op = getattr(relax.op.nn, name.split(".")[-1])
    return op(lx, lw, **common)


def _mutator(mod, precision: str, keep=None):  # noqa: ANN001, ANN202
    """The Relax mutator converting ``mod``'s convs/weight matmuls to ``precision``, but
    those ``keep(call, precision)`` keeps in float32. Built here, not at import: ``import
    graphopt`` must not load TVM."""
    dtype = DTYPES[precision]
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Lower(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule) -> None:
            super().__init__(mod)
            self.count = 0

        def is_weight(self, expr, depth: int = 0) -> bool:  # noqa: ANN001
            """A constant, or ops FoldConstant folds (``_WEIGHT_PATH``, ``_WEIGHT_ALL``)
            on constants (a shape counts as one)."""
            if isinstance(expr, tvm.ir.expr.Constant | relax.ShapeExpr):
                return True
            if depth > _MAX_DEPTH:
                return False
            if isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                return bound is not None and self.is_weight(bound, depth + 1)
            if isinstance(expr, relax.TupleGetItem):
                return self.is_weight(expr.tuple_value, depth + 1)
            if isinstance(expr, relax.Tuple):
                return all(self.is_weight(f, depth + 1) for f in expr.fields)
            if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
                if expr.op.name in _WEIGHT_PATH and expr.args:
                    return self.is_weight(expr.args[0], depth + 1)
                if expr.op.name in _WEIGHT_ALL and expr.args:
                    return all(self.is_weight(a, depth + 1) for a in expr.args)
            return False

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or len(call.args) < 2:
                return call
            if call.op.name not in (*_CONVS, *_CONV_T, "relax.matmul"):
                return call
            x, w = call.args[0], call.args[1]
            if _dtype(x) != "float32" or _dtype(w) != "float32":
                return call
            if not self.is_weight(w) and not (
                call.op.name == "relax.matmul" and self.is_weight(x)  # weight @ activation
            ):
                return call
            if keep is not None and keep(call, precision):
                return call
            self.count += 1
            return _lowered_call(call, relax.op.astype(x, dtype), relax.op.astype(w, dtype))

    return Lower(mod)


def LowerPrecision(precision: str, keep=None):  # noqa: ANN001, ANN201, N802 - a pass, named like TVM's
    """Convs and weight matmuls in ``precision`` ("bf16", "fp16") with fp32 accumulation,
    but those ``keep(call, precision)`` (the Target's ``keeps_fp32``) keeps in float32;
    "fp32" is the identity. Put after the layout phase, before LegalizeOps."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=f"graphopt.LowerPrecision.{precision}")
    def lower(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: ANN001
        if precision == "fp32":
            return mod
        mutator = _mutator(mod, precision, keep)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.get()

    return lower


def lowered_ops(mod, precision: str) -> int:  # noqa: ANN001
    """How many convs/matmuls :func:`LowerPrecision` converts in Relax module ``mod``."""
    from tvm import relax

    if precision == "fp32":
        return 0
    mutator = _mutator(mod, precision)
    for _gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.visit_expr(func)
    return mutator.count


# --- which targets compute in which precision -------------------------------------------
_SM = re.compile(r"^sm_(\d+)")


def _x86_refusal(tvm_dict: dict, precision: str) -> str | None:
    cpu = tvm_dict.get("mcpu", "")
    feats = _llvm_features(tvm_dict)
    flags = _cpuinfo_flags() if cpu == _host_cpu() else None  # the host: what it really has
    if precision == "bf16":
        have = {"avx512bf16", "amxbf16"} & feats
        if flags is not None:
            have = {"avx512_bf16", "amx_bf16"} & flags
        if not have:
            where = "this CPU (/proc/cpuinfo)" if flags is not None else f"x86 CPU {cpu!r}"
            return f"precision bf16 needs avx512_bf16 or amx_bf16, and {where} has neither"
        return None
    ok = "avx512fp16" in feats if flags is None else "avx512fp16" in flags
    if not ok:
        return (
            f"precision fp16 on x86 needs avx512fp16, which x86 CPU {cpu!r} lacks "
            "(try --precision bf16)"
        )
    return None


def _arm_refusal(tvm_dict: dict, precision: str) -> str | None:
    feats = _llvm_features(tvm_dict)
    attrs = {str(a) for a in tvm_dict.get("mattr", [])}
    if precision == "fp16" and "fullfp16" not in feats and "+fullfp16" not in attrs:
        return (
            f"precision fp16 on ARM needs +fullfp16 (ARMv8.2-A FP16 arithmetic), which CPU "
            f"{tvm_dict.get('mcpu', 'generic')!r} lacks; add +fullfp16,+fp16fml to mattr "
            "(fp16fml: the FMLAL kernels) or choose a CPU with both, e.g. neoverse-v1"
        )
    if precision == "bf16" and "bf16" not in feats and "+bf16" not in attrs:
        return "precision bf16 on ARM needs +bf16 (ARMv8.6-A BFloat16); add it to mattr"
    return None


def _cuda_refusal(tvm_dict: dict, precision: str) -> str | None:
    arch = str(tvm_dict.get("arch", ""))
    m = _SM.match(arch)
    sm = int(m.group(1)) if m else 0
    need = {"fp16": 70, "bf16": 80}[precision]
    if sm < need:
        # bf16: sm_80 is where CUDA has bf16 arithmetic; TVM 0.27's tensor-core
        # intrinsics (wmma) are fp16/int8 only, so bf16 kernels run on the CUDA cores
        kind = "fp16 tensor cores" if precision == "fp16" else "bf16 arithmetic"
        return f"precision {precision} on CUDA needs {kind} (sm_{need}+); arch is {arch or '?'}"
    return None


def refusal(tvm_dict: dict, precision: str) -> str | None:
    """One line saying why ``tvm_dict``'s target cannot compute in ``precision``, or None."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
    if precision == "fp32":
        return None
    kind = tvm_dict.get("kind")
    triple = str(tvm_dict.get("mtriple", ""))
    if kind == "cuda":
        return _cuda_refusal(tvm_dict, precision)
    if kind == "llvm" and triple.startswith(("aarch64", "arm")):
        return _arm_refusal(tvm_dict, precision)
    if kind == "llvm":
        return _x86_refusal(tvm_dict, precision)
    return f"precision {precision} is not supported for target kind {kind!r}"
