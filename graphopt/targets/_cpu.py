"""The CPU pipeline and helpers x86 and ARM share (LLVM targets).

Both compile through the same Relax phases with graphopt's packed-NCHWc and NHWC conv
schedules; vector widths follow from the TVM target (AVX-512, AVX2, NEON).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from graphopt.errors import TargetError
from graphopt.targets._layout import Layout
from graphopt.targets._phases import dataflow_lower_passes, finalize_passes
from graphopt.targets._runner import VMRunner, use_all_cores

__all__ = ["cpu_phases", "features", "check_tvm_dict", "load_native"]


def features(tvm_dict: dict) -> list[str]:
    """The SIMD features LLVM enables for this target (what the manifest records)."""
    import tvm
    from tvm.target import codegen

    found = codegen.llvm_get_cpu_features(tvm.target.Target(tvm_dict))
    wanted = ("avx", "fma", "sse4", "neon", "sve", "asimd", "dotprod", "fp16", "fullfp16", "bf16")
    wanted += ("i8mm", "amx")
    return sorted(str(f) for f in found if str(f).startswith(wanted))


def check_tvm_dict(tvm_dict: dict) -> dict:
    import tvm

    try:
        tvm.target.Target(dict(tvm_dict))
    except Exception as exc:
        raise TargetError(f"TVM refuses target {tvm_dict}: {str(exc).splitlines()[0]}") from None
    return dict(tvm_dict)


def cpu_phases(
    target,  # noqa: ANN001 - tvm.target.Target
    layout: Layout,
    extra_schedule_passes: Sequence = (),
) -> dict[str, list]:
    """The CPU pipeline (x86 and ARM) with ``layout``'s passes in its layout phase and
    ``extra_schedule_passes`` (a tuning database's) first in its schedule phase."""
    import tvm
    from tvm import relax

    # TVM-built schedule rules: imported when a pipeline is built, so that importing
    # graphopt (the IR, the passes) does not import TVM.
    from graphopt.targets import _bf16, _cpu_nhwc, _cpu_schedules

    nhwc, cpu = _cpu_nhwc, _cpu_schedules
    legalize = {**cpu.LEGALIZE, **nhwc.LEGALIZE}
    default_matmul = tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")
    # bf16 convs/matmuls (``--precision bf16``) on AVX512-BF16 first, the rest as before
    legalize["relax.nn.conv2d"] = _bf16.legalize_conv2d(legalize["relax.nn.conv2d"])
    legalize["relax.matmul"] = _bf16.legalize_matmul(legalize.get("relax.matmul", default_matmul))
    return {
        # Sorting/sampling ops map to library implementations before legalization.
        "library_dispatch": [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()],
        # Convs move to the chosen layout while still Relax ops, so ConvertLayout can carry
        # it through elementwise ops and pools to the graph's edges; before LegalizeOps.
        "layout": layout.passes(target),
        # Ops become TIR (packed and NHWC convs through graphopt's own TE computes);
        # FoldConstant then transforms weights and sees through weight reshapes once, at
        # compile time; FuseOps groups elementwise tails with their producer so each group
        # is one kernel.
        "legalize": [
            relax.transform.LegalizeOps(legalize),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ],
        # Default schedules (first fitting rule wins) on the fused kernels; after FuseTIR
        # so epilogues are scheduled with their producer. The NHWC conv rules first: they
        # take only their own annotated convs, whatever the layout.
        # A tuning database first (it marks its kernels scheduled, so the defaults skip them).
        # The bf16 rules (vdpbf16ps) before all: they take only bf16 kernels.
        "schedule": [
            *extra_schedule_passes,
            cpu.ApplyCPUSchedules(rules=[*_bf16.RULES, *nhwc.RULES, *cpu.RULES]),
        ],
        "dataflow_lower": dataflow_lower_passes(),
        "finalize": finalize_passes(),
    }


def load_native(path: Path):  # noqa: ANN201 - returns a runner
    """Load an artifact built for this host's own architecture into CPU Relax VMs (any
    file name: :func:`graphopt.targets._runner.load_library`)."""
    import tvm

    use_all_cores()
    return VMRunner.open(path, tvm.cpu())
