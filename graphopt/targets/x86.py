"""The x86-64 CPU target (LLVM), for the host CPU unless told otherwise.

The pass lists mirror TVM's ``relax/backend/cpu_generic/pipeline.py`` phase by phase.
``LAYOUTS`` names the activation layouts this target compiles, its default first
(:mod:`graphopt.targets._layout`): packed NCHW[x]c; NHWC (as fast on ResNet-18 with
AVX-512) and plain NCHW (TOPI's convs, slow: for comparison) on request (``--layout``).
"""

from __future__ import annotations

import platform
from pathlib import Path

from graphopt.errors import ArtifactError, TargetError
from graphopt.targets import _layout
from graphopt.targets._layout import Layout
from graphopt.targets._phases import dataflow_lower_passes, finalize_passes

NAME = "x86"
DESCRIPTION = "x86-64 Linux CPU via LLVM; the host CPU and its features are detected"
OPTIONS = {"cpu": "LLVM CPU name, e.g. skylake-avx512, znver4 (default: this host's CPU)"}
_X86_MACHINES = ("x86_64", "amd64")
LAYOUTS = _layout.table(_layout.NCHWC, _layout.NHWC_CPU, _layout.NCHW)  # default first
DEFAULT_LAYOUT = next(iter(LAYOUTS))


def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def tvm_target(cpu: str | None = None) -> dict:
    from tvm.target import codegen

    if cpu is None:
        if platform.machine().lower() not in _X86_MACHINES:
            raise TargetError(
                f"target x86 needs --cpu when compiling on a {platform.machine()} host"
            )
        cpu = host_cpu()
    if not codegen.llvm_is_valid_cpu(cpu, "x86_64-linux-gnu"):
        raise TargetError(
            f"LLVM does not know x86 CPU {cpu!r} (try e.g. x86-64-v3, skylake-avx512)"
        )
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu}


def features(tvm_dict: dict) -> list[str]:
    """The SIMD features LLVM enables for this target (what the manifest records)."""
    import tvm
    from tvm.target import codegen

    found = codegen.llvm_get_cpu_features(tvm.target.Target(tvm_dict))
    wanted = ("avx", "fma", "sse4", "neon", "sve", "asimd", "dotprod", "fp16", "bf16", "i8mm")
    return sorted(str(f) for f in found if str(f).startswith(wanted))


def accepts(tvm_dict: dict) -> bool:
    triple = str(tvm_dict.get("mtriple", "x86_64"))
    return tvm_dict.get("kind") == "llvm" and triple.startswith(("x86_64", "i686", "i386"))


def check_tvm_dict(tvm_dict: dict) -> dict:
    import tvm

    try:
        tvm.target.Target(dict(tvm_dict))
    except Exception as exc:
        raise TargetError(f"TVM refuses target {tvm_dict}: {str(exc).splitlines()[0]}") from None
    return dict(tvm_dict)


def phases(
    target,  # noqa: ANN001 - tvm.target.Target
    layout: str | None = None,
    tuning_db=None,  # noqa: ANN001
    tuning_report=None,  # noqa: ANN001
) -> dict[str, list]:
    """Relax passes per phase; see TVM's cpu_generic pipeline for the originals.

    ``target``: a tvm.target.Target. ``layout``: a name from ``LAYOUTS`` (default
    ``DEFAULT_LAYOUT``). ``tuning_db``: an open ``graphopt.tuning.TuningDatabase`` whose
    records schedule the kernels they cover (``tuning_report`` gets which ones); the
    default schedules take the rest.
    """
    chosen = _layout.choose(NAME, LAYOUTS, layout)
    return cpu_phases(target, chosen, tuning_db, tuning_report)


def cpu_phases(target, layout: Layout, tuning_db=None, tuning_report=None) -> dict[str, list]:  # noqa: ANN001
    """The CPU pipeline (x86 and ARM) with ``layout``'s passes in its layout phase."""
    from tvm import relax

    from graphopt.targets import _cpu_nhwc as nhwc
    from graphopt.targets import _cpu_schedules as cpu

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
            relax.transform.LegalizeOps({**cpu.LEGALIZE, **nhwc.LEGALIZE}),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ],
        # Default schedules (first fitting rule wins) on the fused kernels; after FuseTIR
        # so epilogues are scheduled with their producer. The NHWC conv rule first: it
        # takes only its own annotated convs, whatever the layout.
        # A tuning database first (it marks its kernels scheduled, so the defaults skip them).
        "schedule": _tuned(tuning_db, tuning_report)
        + [cpu.ApplyCPUSchedules(rules=[nhwc.RULE, *cpu.RULES])],
        "dataflow_lower": dataflow_lower_passes(),
        "finalize": finalize_passes(),
    }


def _tuned(tuning_db, report) -> list:  # noqa: ANN001
    if tuning_db is None:
        return []
    from graphopt.tuning import ApplyTuningDatabase

    return [ApplyTuningDatabase(tuning_db, report)]


def export(executable, path: Path) -> None:  # noqa: ANN001 - tvm VMExecutable
    executable.export_library(str(path))


def load(path: Path):  # noqa: ANN201 - returns a runner
    """Load an x86 artifact into a Relax VM on this host's CPU."""
    if platform.machine().lower() not in _X86_MACHINES:
        raise ArtifactError(
            f"{path} is an x86 artifact and this host is {platform.machine()}: "
            "run it on an x86-64 machine"
        )
    return load_native(path)


def load_native(path: Path):  # noqa: ANN201 - returns a runner
    """Load an artifact built for this host's own architecture into CPU Relax VMs (any
    file name: :func:`graphopt.targets._runner.load_library`)."""
    import tvm

    from graphopt.targets._runner import VMRunner, use_all_cores

    use_all_cores()
    return VMRunner.open(path, tvm.cpu())
