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
    StaticPlanBlockMemory (CUDA graphs), ``last`` after everything."""
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
