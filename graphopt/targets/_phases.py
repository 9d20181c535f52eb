"""Relax phases every target shares, as in TVM's ``relax/backend/*/pipeline.py``.

Targets differ in dispatch, legalization and scheduling; lowering the dataflow to VM
code and finalizing memory are the same everywhere, so they live here once.
"""

from __future__ import annotations

__all__ = ["dataflow_lower_passes", "finalize_passes", "schedule_unscheduled"]


def dataflow_lower_passes() -> list:
    from tvm import relax

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]


def finalize_passes(after_planning: list | None = None, last: list | None = None) -> list:
    """Memory planning and VM lowering; ``after_planning`` runs right after
    StaticPlanBlockMemory (CUDA graphs), ``last`` after everything.

    Tried and left out (2-core Zen 3, 2026-12-06): a planner of graphopt's own before
    TVM's, handing each new tensor the storage released *last* instead of TVM's
    first-released among equal sizes (a ``std::multimap``'s first entry), so that a
    kernel would write into a map still in cache rather than pay a read from memory for
    each line it writes. It planned the same tensors by the same rules (kernel arguments
    only, through reshapes and views; the function's result left to TVM) and matched
    TVM's numbers, but ResNet-50 did not run faster: whole-model calls over six
    alternating profile runs, LIFO/TVM 0.87-1.08 (median about 1.02), and 1.000 over 31
    paired artifact rounds against an A/A of 0.982. In the VM's quiet phases the outputs'
    in-model cost it aimed at was not there to win (ResNet-50's 56x56 downsample ran
    0.585 ms in the model against 0.571 alone)."""
    from tvm import relax

    return [
        relax.transform.StaticPlanBlockMemory(),
        *(after_planning or []),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
        *(last or []),
    ]


def schedule_unscheduled(name: str, schedule_one):  # noqa: ANN001, ANN201 - returns a tvm Pass
    """A module pass that offers every PrimFunc not yet scheduled to ``schedule_one``.

    ``schedule_one(gvar, func)`` returns ``(rule name, scheduled PrimFunc)`` or None to
    leave the kernel for a later pass. What it schedules is marked ``tirx.is_scheduled``
    (so later schedule passes skip it) and records the rule in ``graphopt.schedule_rule``.
    The tuning database and the default CPU schedules are two such passes, in that order.
    """
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name=name)
    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: ANN001
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                continue
            result = schedule_one(gvar, func)
            if result is not None:
                rule, new = result
                updates[gvar] = new.with_attr("tirx.is_scheduled", True).with_attr(
                    "graphopt.schedule_rule", rule
                )
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return apply
