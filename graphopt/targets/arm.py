"""The ARM target: aarch64 Linux with NEON, cross-compiled on any host.

Artifacts link with the aarch64 cross toolchain (Debian ``g++-aarch64-linux-gnu``). On an
aarch64 host they run natively; on x86 they run under QEMU user-mode emulation
(Debian ``qemu-user``) through graphopt's small C++ runner, cross-built against the
aarch64 TVM runtime from the ``apache-tvm``/``apache-tvm-ffi`` PyPI wheels (see
:mod:`graphopt.targets._emulation`). The Relax pipeline is the CPU one x86 uses too
(:mod:`graphopt.targets._cpu`); vector widths come from the target. The default layout
is NHWC (``LAYOUTS``), the one ARM's own libraries (Compute Library, XNNPACK) use:
channels innermost, so a conv's register tile reads contiguous input channels and
NEON-wide weight blocks (:mod:`graphopt.targets._cpu_nhwc`). Not yet timed on a device
(emulated latencies mean nothing); ``--layout nchwc`` compiles the x86 default instead.

``precision="fp16"`` needs ``fullfp16`` (ARMv8.2-A FP16; the default ``generic`` CPU
lacks it and is refused, naming the attributes to add). With ``fp16fml`` too (FEAT_FHM:
``+fp16fml`` in mattr, or a CPU with it such as neoverse-v1) dense NHWC convs and
matmuls compute with ``fmlal`` (:mod:`graphopt.targets._fp16_arm`); with ``fullfp16``
alone they convert their fp16 operands to float32 in the inner loop (the same numbers,
more instructions). QEMU 7.2's default CPU has FHM, so both verify under emulation.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Sequence
from pathlib import Path

from graphopt.errors import TargetError
from graphopt.targets import _cpu, _layout, _link
from graphopt.targets._contract import Target
from graphopt.targets._emulation import EmulatedRunner

NAME = "arm"
DESCRIPTION = "aarch64 Linux with NEON via LLVM, cross-compiled; runs under qemu-user on x86"
# Graph-pass options this target chooses (TargetSpec.pass_defaults):
# one graphopt::RNNStep kernel per recurrent step (scheduled by targets/_gemv.py)
# The fused recurrent-step kernel (expand-rnn fuse_steps, targets/_gemv.py) stays off: on
# 2 cores it measured 5% slower than the plain expansion (LSTM classifier T=128 2.90 vs
# 2.74 ms, CRNN 0.84 vs 0.79 ms; AMD EPYC, quiet), and slower still at T=512.
# A whole recurrent layer is one graphopt::RNNSequence kernel instead (expand-rnn
# sequence, lower/_rnn_sequence.py): the time loop inside one call.
PASS_DEFAULTS = {"expand-rnn": {"fuse_steps": False, "sequence": True}}
OPTIONS = {
    "cpu": "LLVM CPU name, e.g. cortex-a72, cortex-a76, neoverse-n1 (default: generic)",
    "triple": "target triple (default: aarch64-linux-gnu)",
}
DEFAULT_TRIPLE = "aarch64-linux-gnu"
CROSS_CXX = "aarch64-linux-gnu-g++"
_ARM_MACHINES = ("aarch64", "arm64")
LAYOUTS = _layout.table(_layout.NHWC_CPU, _layout.NCHWC, _layout.NCHW)  # default first
DEFAULT_LAYOUT = next(iter(LAYOUTS))


def tvm_target(cpu: str | None = None, triple: str | None = None) -> dict:
    from tvm.target import codegen

    triple = triple or DEFAULT_TRIPLE
    if not triple.startswith(("aarch64", "arm64")):
        raise TargetError(f"target arm is aarch64 only; triple {triple!r} is not")
    cpu = cpu or "generic"
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        raise TargetError(f"LLVM does not know ARM CPU {cpu!r} (try cortex-a72, neoverse-n1)")
    return {"kind": "llvm", "mtriple": triple, "mcpu": cpu, "mattr": ["+neon"]}


def accepts(tvm_dict: dict) -> bool:
    triple = str(tvm_dict.get("mtriple", ""))
    return tvm_dict.get("kind") == "llvm" and triple.startswith(("aarch64", "arm64"))


def phases(
    target,  # noqa: ANN001 - tvm.target.Target
    layout: str | None = None,
    extra_schedule_passes: Sequence = (),
) -> dict[str, list]:
    """The CPU pipeline (:func:`graphopt.targets._cpu.cpu_phases`) in ``layout`` (default
    ``DEFAULT_LAYOUT``); NEON widths follow from ``target``."""
    return _cpu.cpu_phases(target, _layout.choose(NAME, LAYOUTS, layout), extra_schedule_passes)


def cross_compiler() -> str:
    path = shutil.which(CROSS_CXX)
    if path is None:
        raise TargetError(
            f"the aarch64 cross toolchain is missing ({CROSS_CXX} not found): "
            "apt-get install g++-aarch64-linux-gnu"
        )
    return path


def export(executable, path: Path) -> None:  # noqa: ANN001 - tvm VMExecutable
    from tvm.support import cc

    _link.export(executable, path, fcompile=cc.cross_compiler(cross_compiler()))


def load(path: Path, _manifest: dict | None = None):  # noqa: ANN201 - returns a runner
    """Native on aarch64; elsewhere under qemu-user (or a clear error saying how)."""
    if platform.machine().lower() in _ARM_MACHINES:
        return _cpu.load_native(path)
    return EmulatedRunner(Path(path))


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
    cross_compiler=cross_compiler,
    tunable=True,
)
