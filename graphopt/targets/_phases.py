"""Relax phases every target shares, as in TVM's ``relax/backend/*/pipeline.py``.

Targets differ in dispatch, legalization and scheduling; lowering the dataflow to VM
code and finalizing memory are the same everywhere, so they live here once.
"""

from __future__ import annotations

__all__ = ["dataflow_lower_passes", "finalize_passes"]


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
