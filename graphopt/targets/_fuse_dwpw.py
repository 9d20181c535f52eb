"""A depthwise conv and the 1x1 conv that reads it, fused into one kernel.

MobileNet's inverted residual block is a 1x1 expansion, a 3x3 depthwise conv and a 1x1
projection. Unfused, the depthwise conv writes its whole output (six times the block's
channels: MobileNetV2's 56x56x144 map is 1.8 MB) and the projection reads it back, from
the other core's cache for the half another thread wrote. Fused, each thread computes one
row of the depthwise output for all its channels (a few KB, in L1) and the projection's
row from it at once (:func:`graphopt.targets._cpu_schedules.schedule_depthwise_pointwise`).

``FuseDepthwisePointwise()`` runs between FuseOps and FuseTIR (``graphopt/targets/_cpu.py``):
where a fused group anchored by a packed depthwise conv (``depthwise_conv2d_nchwc`` plus
elementwise ops on its output) is read only by a group anchored by a packed dense 1x1
conv of stride 1 (plus its epilogue, a residual add included), the two become one
Primitive function; FuseTIR then makes it one PrimFunc, which the schedule rule
recognizes by its two anchors. Maps of fewer than ``MIN_ROWS`` rows stay apart: the
fused kernel's threads share the rows, and a 7-row map leaves two threads 4 and 3.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx

from graphopt.targets import _cpu_schedules

__all__ = ["MIN_ROWS", "FuseDepthwisePointwise"]

# The fewest output rows a fused kernel takes (its threads share the rows): MobileNetV2's
# 14x14 block on a 2-core Xeon, fused against apart, 0.92-0.99x the time alone; its 7x7
# block 1.12x (4 rows against 3).
MIN_ROWS = 7

_ELEMENTWISE = 1  # op_pattern: kElemWise 0, kBroadcast 1


def _call_tir(expr) -> bool:  # noqa: ANN001
    return isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.call_tir"))


def _kernels(func: tirx.PrimFunc) -> list[str]:
    """The graphopt kernel annotations of a PrimFunc's root blocks (the schedule rules')."""
    try:
        sch = s_tir.Schedule(func)
    except (tvm.error.TVMError, ValueError):  # no blocks to schedule: no conv of ours
        return []
    kinds = (_cpu_schedules._annotation(sch, b) for b in _cpu_schedules._root_blocks(sch))
    return [k for k in kinds if k is not None]


def _shape(expr) -> list[int] | None:  # noqa: ANN001
    """A float32 tensor's static shape; None for another dtype or a symbolic shape (the
    lower-precision rules schedule bf16/fp16 convs one at a time)."""
    ty = getattr(expr, "ty", None)
    if str(getattr(ty, "dtype", "")) != "float32":
        return None
    values = getattr(getattr(ty, "shape", None), "values", None)
    if values is None or any(not isinstance(d, tirx.IntImm) for d in values):
        return None
    return [int(d) for d in values]


def _bindings(func: relax.Function) -> list | None:
    """A fused function's bindings: one dataflow block of call_tir with a tuple of
    arguments, returning the last one's variable; else None."""
    body = func.body
    if not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1:
        return None
    bindings = list(body.blocks[0].bindings)
    if not bindings or not body.body.same_as(bindings[-1].var):
        return None
    for b in bindings:
        value = b.value
        if not (
            _call_tir(value) and len(value.args) == 2 and isinstance(value.args[1], relax.Tuple)
        ):
            return None
    return bindings


def _depthwise_group(mod: tvm.IRModule, func: relax.Function) -> bool:
    """A depthwise conv of at least MIN_ROWS output rows, then elementwise ops on its map."""
    bindings = _bindings(func)
    if bindings is None or _shape(bindings[0].value) is None:
        return False
    if _kernels(mod[bindings[0].value.args[0]]) != ["depthwise_conv2d_nchwc"]:
        return False
    shape = _shape(bindings[0].value)
    if shape[2] < MIN_ROWS:
        return False
    for b in bindings[1:]:
        prim = mod[b.value.args[0]]
        pattern = prim.attrs.get("op_pattern") if prim.attrs is not None else None
        if pattern is None or int(pattern) > _ELEMENTWISE or _shape(b.value) != shape:
            return False
    return True


def _pointwise_input(mod: tvm.IRModule, func: relax.Function) -> int | None:
    """The parameter index of a pointwise group's conv input: a group whose first call
    is a dense packed 1x1 conv of stride 1, no padding, on one of the group's parameters."""
    bindings = _bindings(func)
    if bindings is None:
        return None
    conv = bindings[0].value
    prim = mod[conv.args[0]]
    if _kernels(prim) != ["conv2d_nchwc"]:
        return None
    data, weight = prim.params[:2]  # buffer parameters, shaped
    out = _shape(conv)
    if [int(d) for d in weight.shape[2:4]] != [1, 1] or out is None:
        return None
    if [int(d) for d in data.shape[2:4]] != out[2:4]:
        return None  # a strided 1x1 conv
    arg = conv.args[1].fields[0]
    for i, param in enumerate(func.params):
        if param.same_as(arg):
            return i
    return None


def _merged(dw: relax.Function, pw: relax.Function, index: int) -> relax.Function:
    """One Primitive function computing ``dw`` and feeding its result to ``pw``'s
    parameter ``index``: parameters ``dw``'s, then ``pw``'s but that one."""
    params, remap = [], []

    def fresh(var):  # noqa: ANN001, ANN202
        new = relax.Var(var.name, var.ty)
        remap.append((var, new))
        return new

    def lookup(expr):  # noqa: ANN001, ANN202
        return next((new for old, new in remap if old.same_as(expr)), expr)

    params = [fresh(p) for p in dw.params]
    params += [fresh(p) for i, p in enumerate(pw.params) if i != index]
    bindings = []
    for func in (dw, pw):
        if func is pw:
            remap.append((pw.params[index], bindings[-1].var))
        for b in func.body.blocks[0].bindings:
            call = b.value
            args = relax.Tuple([lookup(a) for a in call.args[1].fields])
            value = relax.Call(call.op, [call.args[0], args], call.attrs, call.ty_args)
            var = relax.DataflowVar(b.var.name, b.var.ty)
            remap.append((b.var, var))
            bindings.append(relax.VarBinding(var, value))
    out = relax.Var("gv", bindings[-1].var.ty)
    bindings[-1] = relax.VarBinding(out, bindings[-1].value)
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], out)
    return relax.Function(params, body, pw.ret_ty, True, pw.attrs)


def _callee(mod: tvm.IRModule, value) -> relax.Function | None:  # noqa: ANN001
    """The fused (Primitive) function a binding's value calls, if it calls one."""
    op = getattr(value, "op", None)
    if not isinstance(op, tvm.ir.GlobalVar) or op.name_hint not in mod.global_var_map_:
        return None
    func = mod[op]
    return func if isinstance(func, relax.Function) and _primitive(func) else None


def _uses(func: relax.Function) -> dict:
    counts: dict = {}

    def visit(expr) -> None:  # noqa: ANN001
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def _fuse(
    mod: tvm.IRModule, bb: relax.BlockBuilder, main: relax.Function, made: dict
) -> relax.Function | None:
    """``main`` with each depthwise group read only by a pointwise group replaced, with
    that group, by one call of their merged function (new ones added to ``made``); None
    when nothing fused."""
    uses = _uses(main)
    blocks, fused = [], False
    for block in main.body.blocks:
        bindings: list = []
        for b in block.bindings:
            value = b.value
            callee = _callee(mod, value)
            if callee is not None and isinstance(b, relax.VarBinding):
                index = _pointwise_input(mod, callee)
                arg = value.args[index] if index is not None else None
                prev = next((p for p in bindings if arg is not None and p.var.same_as(arg)), None)
                source = _callee(mod, prev.value) if prev is not None else None
                if source is not None and uses.get(arg, 0) == 1 and _depthwise_group(mod, source):
                    dw, pw = prev.value.op.name_hint, value.op.name_hint
                    if (dw, pw, index) not in made:
                        name = f"{dw}_{pw.removeprefix('fused_')}"
                        merged = bb.normalize(_merged(source, callee, index))
                        made[(dw, pw, index)] = bb.add_func(merged, name)
                    gvar = made[(dw, pw, index)]
                    args = [*prev.value.args, *(a for i, a in enumerate(value.args) if i != index)]
                    bindings.remove(prev)
                    bindings.append(relax.VarBinding(b.var, relax.Call(gvar, args)))
                    fused = True
                    continue
            bindings.append(b)
        kind = relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else relax.BindingBlock
        blocks.append(kind(bindings))
    if not fused:
        return None
    body = relax.SeqExpr(blocks, main.body.body)
    return relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs)


def FuseDepthwisePointwise() -> tvm.transform.Pass:  # noqa: N802 - a pass, named like TVM's
    """Merge each depthwise group read only by a 1x1 conv group (module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="graphopt.FuseDepthwisePointwise")
    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: ANN001
        made: dict = {}
        bb = relax.BlockBuilder(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function) and not _primitive(func):
                new = _fuse(mod, bb, func, made)
                if new is not None:
                    bb.update_func(gvar, bb.normalize(new))
        if not made:
            return mod
        mod = bb.get()
        return relax.transform.DeadCodeElimination()(mod)

    return apply


def _primitive(func: relax.Function) -> bool:
    return func.attrs is not None and "Primitive" in func.attrs
