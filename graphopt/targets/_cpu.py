"""The CPU pipeline and helpers x86 and ARM share (LLVM targets).

Both compile through the same Relax phases with graphopt's packed-NCHWc and NHWC conv
schedules; vector widths follow from the TVM target (AVX-512, AVX2, NEON).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from graphopt.errors import TargetError
from graphopt.targets._layout import Layout
from graphopt.targets._phases import dataflow_lower_passes, finalize_passes
from graphopt.targets._runner import VMRunner, use_all_cores

__all__ = [
    "cpu_phases",
    "features",
    "host_cpu",
    "host_cpu_flags",
    "host_mattr",
    "host_x86_target",
    "llvm_features",
    "x86_tvm_dict",
    "check_tvm_dict",
    "load_native",
    "after_trace",
    "kernel_modules",
    "keeps_fp32",
    "legalize_map",
    "schedule_rules",
]

# Kernel modules layered over the fp32 packed/NHWC rules, the first listed first. Each
# defines ``WRAP_LEGALIZE`` ({Relax op: wrap(fallback) -> legalization}: it takes the
# calls it has kernels for and passes the rest to ``fallback``) and ``RULES`` (schedule
# rules that take only their own kernels, tried before the fp32 ones). AMX before
# AVX512-BF16: both take bf16 kernels, AMX only on a CPU that has it. Optionally
# ``TUNABLE`` ({rule name: (schedule(sch, target, decisions, plan), plans, default
# first)}): the rules' choices as graphopt's tuning search space (tuning/_space.py); and
# ``AFTER_TRACE`` (functions of a scheduled kernel's Schedule): what its default schedule
# puts into the nest outside the trace, for a tuning record's replay (:func:`after_trace`).
KERNEL_MODULES = ("_amx", "_bf16", "_fp16_arm", "_conv3d", "_winograd", "_gemm")
# The kernel modules that define ``keeps_fp32(call, precision)``: True for a conv/matmul
# the module computes faster in float32 than in ``precision`` (see :func:`keeps_fp32`).
KEEPS_FP32_MODULES = ("_winograd", "_bf16")


def host_cpu() -> str:
    """LLVM's name for this host's CPU (``znver4``, ``sapphirerapids``)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The feature flags the kernel lists for this CPU (its first ``flags`` line), or None
    where there is no such file (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


# /proc/cpuinfo flag -> LLVM feature, for the SIMD features graphopt's kernels use. A
# virtual machine may report a CPU model older than the features it passes through (seen:
# a Xeon with AMX and AVX512-BF16 that reports model 167, which LLVM names rocketlake);
# LLVM's name for the host then misses them, and the reverse can happen too.
_CPUINFO_TO_LLVM = {
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512vnni",
    "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16",
    "avx_vnni": "avxvnni",
    "amx_tile": "amx-tile",
    "amx_bf16": "amx-bf16",
    "amx_int8": "amx-int8",
    "amx_fp16": "amx-fp16",
}


def x86_tvm_dict(cpu: str) -> dict:
    """The TVM target dict of x86-64 Linux CPU ``cpu`` (an LLVM name)."""
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu}


def host_x86_target() -> dict:
    """The TVM target for this x86 host: LLVM's name for its CPU and, in ``mattr``, the
    features :func:`host_mattr` reconciles (no ``mattr`` where there are none)."""
    cpu = host_cpu()
    mattr = host_mattr(cpu, host_cpu_flags())
    return {**x86_tvm_dict(cpu), "mattr": mattr} if mattr else x86_tvm_dict(cpu)


def host_mattr(cpu: str, flags: set[str] | None) -> list[str]:
    """What x86 CPU ``cpu`` (LLVM's name for this host) needs in ``mattr`` to match the
    host's ``/proc/cpuinfo`` ``flags``: ``+f`` for a SIMD feature the host has and the
    name lacks, ``-f`` for one the name implies and the host lacks (its code would not
    run here). Empty where they agree, or where there are no flags (not Linux)."""
    if flags is None:
        return []
    named = llvm_features(x86_tvm_dict(cpu))
    mattr = []
    for flag, feature in _CPUINFO_TO_LLVM.items():
        if flag in flags and feature not in named:
            mattr.append(f"+{feature}")
        elif flag not in flags and feature in named:
            mattr.append(f"-{feature}")
    return mattr


def llvm_features(tvm_dict: dict) -> set[str]:
    """Every feature LLVM enables for this target (its CPU's and ``mattr``'s)."""
    import tvm
    from tvm.target import codegen

    return {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(dict(tvm_dict)))}


def features(tvm_dict: dict) -> list[str]:
    """The SIMD features LLVM enables for this target (what the manifest records)."""
    wanted = ("avx", "fma", "sse4", "neon", "sve", "asimd", "dotprod", "fp16", "fullfp16", "bf16")
    wanted += ("i8mm", "amx")
    return sorted(f for f in llvm_features(tvm_dict) if f.startswith(wanted))


def check_tvm_dict(tvm_dict: dict) -> dict:
    import tvm

    try:
        tvm.target.Target(dict(tvm_dict))
    except Exception as exc:
        raise TargetError(f"TVM refuses target {tvm_dict}: {str(exc).splitlines()[0]}") from None
    return dict(tvm_dict)


def kernel_modules() -> list:
    """The :data:`KERNEL_MODULES`, imported (they import TVM: not at graphopt's import)."""
    return [importlib.import_module(f"graphopt.targets.{name}") for name in KERNEL_MODULES]


def after_trace(sch) -> None:  # noqa: ANN001 - an s_tir.Schedule
    """Apply to ``sch`` (a kernel scheduled by replaying a tuning record's trace) the
    ``AFTER_TRACE`` steps of the fp32 rules (``_cpu_schedules``) and of the kernel
    modules: each finds its own kernels in the nest (the streamed dense convs' prefetch,
    ``_cpu_schedules.prefetch_streamed``; the Winograd products',
    ``_winograd.prefetch_products``) and leaves any other alone."""
    base = importlib.import_module("graphopt.targets._cpu_schedules")
    for module in (base, *kernel_modules()):
        for step in getattr(module, "AFTER_TRACE", ()):
            step(sch)


def keeps_fp32(call, precision: str) -> bool:  # noqa: ANN001 - a relax.Call
    """Whether a kernel module computes Relax ``call`` faster in float32 than in
    ``precision`` (the Target's ``keeps_fp32``; asked by the precision pass under the
    pipeline's target)."""
    modules = [importlib.import_module(f"graphopt.targets.{n}") for n in KEEPS_FP32_MODULES]
    return any(m.keeps_fp32(call, precision) for m in modules)


def legalize_map() -> dict:
    """LegalizeOps' customize map: the fp32 rules' legalizations, each wrapped by the
    kernel modules' (the first module outermost)."""
    import tvm

    from graphopt.targets import _cpu_nhwc, _cpu_schedules

    legalize = {**_cpu_schedules.LEGALIZE, **_cpu_nhwc.LEGALIZE}
    for module in reversed(kernel_modules()):
        for op, wrap in module.WRAP_LEGALIZE.items():
            fallback = legalize.get(op) or tvm.ir.Op.get(op).get_attr("FLegalize")
            legalize[op] = wrap(fallback)
    return legalize


def schedule_rules() -> list:
    """The default schedule rules in order (first fitting rule wins): the kernel
    modules', then the NHWC conv rules (they take only their own annotated convs), then
    the packed-NCHWc and generic ones."""
    from graphopt.targets import _cpu_nhwc, _cpu_schedules

    rules = [rule for module in kernel_modules() for rule in module.RULES]
    return [*rules, *_cpu_nhwc.RULES, *_cpu_schedules.RULES]


def cpu_phases(
    target,  # noqa: ANN001 - tvm.target.Target
    layout: Layout,
    extra_schedule_passes: Sequence = (),
) -> dict[str, list]:
    """The CPU pipeline (x86 and ARM) with ``layout``'s passes in its layout phase and
    ``extra_schedule_passes`` (a tuning database's) first in its schedule phase."""
    from tvm import relax

    # TVM-built schedule rules: imported when a pipeline is built, so that importing
    # graphopt (the IR, the passes) does not import TVM.
    from graphopt.targets import _cpu_schedules, _fold, _fuse_dwpw

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
            relax.transform.LegalizeOps(legalize_map()),
            relax.transform.AnnotateTIROpPattern(),
            _fold.FoldConstantCalls(),  # the weight transforms, one build per round
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            _fuse_dwpw.FuseDepthwisePointwise(),  # a depthwise conv into its 1x1 reader
            relax.transform.FuseTIR(),
        ],
        # Default schedules (first fitting rule wins, :func:`schedule_rules`) on the fused
        # kernels; after FuseTIR so epilogues are scheduled with their producer. A tuning
        # database first (it marks its kernels scheduled, so the defaults skip them).
        "schedule": [
            *extra_schedule_passes,
            _cpu_schedules.ApplyCPUSchedules(rules=schedule_rules()),
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
