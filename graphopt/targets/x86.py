"""The x86-64 CPU target (LLVM), for the host CPU unless told otherwise.

The pass lists mirror TVM's ``relax/backend/cpu_generic/pipeline.py`` phase by phase.
``LAYOUTS`` names the activation layouts this target compiles, its default first
(:mod:`graphopt.targets._layout`): packed NCHW[x]c; NHWC (as fast on ResNet-18 with
AVX-512) and plain NCHW (TOPI's convs, slow: for comparison) on request (``--layout``).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

from graphopt.errors import ArtifactError, TargetError
from graphopt.targets import _cpu, _layout, _link
from graphopt.targets._contract import Target

NAME = "x86"
DESCRIPTION = "x86-64 Linux CPU via LLVM; the host CPU and its features are detected"
# Graph-pass options this target chooses (TargetSpec.pass_defaults):
# one graphopt::RNNStep kernel per recurrent step (scheduled by targets/_gemv.py)
# The fused recurrent-step kernel (expand-rnn fuse_steps, targets/_gemv.py) stays off: on
# 2 cores it measured 5% slower than the plain expansion (LSTM classifier T=128 2.90 vs
# 2.74 ms, CRNN 0.84 vs 0.79 ms; AMD EPYC, quiet), and slower still at T=512.
# A whole recurrent layer is one graphopt::RNNSequence kernel instead (expand-rnn
# sequence, lower/_rnn_sequence.py): the time loop inside one call.
PASS_DEFAULTS = {"expand-rnn": {"fuse_steps": False, "sequence": True}}
OPTIONS = {"cpu": "LLVM CPU name, e.g. skylake-avx512, znver4 (default: this host's CPU)"}
_X86_MACHINES = ("x86_64", "amd64")
LAYOUTS = _layout.table(_layout.NCHWC, _layout.NHWC_CPU, _layout.NCHW)  # default first
DEFAULT_LAYOUT = next(iter(LAYOUTS))


host_cpu = _cpu.host_cpu


def tvm_target(cpu: str | None = None) -> dict:
    """The TVM target for x86 CPU ``cpu`` (an LLVM name); None: this host, LLVM's name
    for it plus, in ``mattr``, the SIMD features /proc/cpuinfo and that name disagree on
    (:func:`graphopt.targets._cpu.host_mattr`)."""
    from tvm.target import codegen

    if cpu is None:
        if platform.machine().lower() not in _X86_MACHINES:
            raise TargetError(
                f"target x86 needs --cpu when compiling on a {platform.machine()} host"
            )
        return _cpu.host_x86_target()
    if not codegen.llvm_is_valid_cpu(cpu, "x86_64-linux-gnu"):
        raise TargetError(
            f"LLVM does not know x86 CPU {cpu!r} (try e.g. x86-64-v3, skylake-avx512)"
        )
    return _cpu.x86_tvm_dict(cpu)


def accepts(tvm_dict: dict) -> bool:
    triple = str(tvm_dict.get("mtriple", "x86_64"))
    return tvm_dict.get("kind") == "llvm" and triple.startswith(("x86_64", "i686", "i386"))


def phases(
    target,  # noqa: ANN001 - tvm.target.Target
    layout: str | None = None,
    extra_schedule_passes: Sequence = (),
) -> dict[str, list]:
    """Relax passes per phase (:func:`graphopt.targets._cpu.cpu_phases`, after TVM's
    cpu_generic pipeline) in ``layout``, a name from ``LAYOUTS`` (default
    ``DEFAULT_LAYOUT``); ``extra_schedule_passes`` first in the schedule phase."""
    return _cpu.cpu_phases(target, _layout.choose(NAME, LAYOUTS, layout), extra_schedule_passes)


def export(executable, path: Path) -> None:  # noqa: ANN001 - tvm VMExecutable
    _link.export(executable, path)


def load(path: Path, _manifest: dict | None = None):  # noqa: ANN201 - returns a runner
    """Load an x86 artifact into Relax VMs on this host's CPU."""
    if platform.machine().lower() not in _X86_MACHINES:
        raise ArtifactError(
            f"{path} is an x86 artifact and this host is {platform.machine()}: "
            "run it on an x86-64 machine"
        )
    return _cpu.load_native(path)


TARGET = Target(
    name=NAME,
    description=DESCRIPTION,
    options=OPTIONS,
    layouts=LAYOUTS,
    tvm_target=tvm_target,
    accepts=accepts,
    check_tvm_dict=_cpu.check_tvm_dict,
    phases=phases,
    export=export,
    load=load,
    features=_cpu.features,
    tunable=True,
    keeps_fp32=_cpu.keeps_fp32,
)
