"""The ARM target: aarch64 Linux with NEON, cross-compiled on any host.

Artifacts link with the aarch64 cross toolchain (Debian ``g++-aarch64-linux-gnu``). On an
aarch64 host they run natively; on x86 they run under QEMU user-mode emulation
(Debian ``qemu-user``) through graphopt's small C++ runner, cross-built against the
aarch64 TVM runtime from the ``apache-tvm``/``apache-tvm-ffi`` PyPI wheels (see
:mod:`graphopt.targets._emulation`). The Relax pipeline is the CPU one (x86's phases);
vector widths come from the target. The default layout is NHWC (``LAYOUTS``), the one
ARM's own libraries (Compute Library, XNNPACK) use: channels innermost, so a conv's
register tile reads contiguous input channels and NEON-wide weight blocks
(:mod:`graphopt.targets._cpu_nhwc`). Not yet timed on a device (emulated latencies mean
nothing); ``--layout nchwc`` compiles the x86 default instead.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

from graphopt.errors import TargetError
from graphopt.targets import _layout

NAME = "arm"
DESCRIPTION = "aarch64 Linux with NEON via LLVM, cross-compiled; runs under qemu-user on x86"
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


def check_tvm_dict(tvm_dict: dict) -> dict:
    from graphopt.targets import x86

    return x86.check_tvm_dict(tvm_dict)


def phases(
    target,  # noqa: ANN001 - tvm.target.Target
    layout: str | None = None,
    tuning_db=None,  # noqa: ANN001
    tuning_report=None,  # noqa: ANN001
) -> dict[str, list]:
    """The CPU pipeline (see x86.phases) in ``layout`` (default ``DEFAULT_LAYOUT``);
    NEON widths follow from ``target``."""
    from graphopt.targets import x86

    return x86.cpu_phases(target, _layout.choose(NAME, LAYOUTS, layout), tuning_db, tuning_report)


def features(tvm_dict: dict) -> list[str]:
    from graphopt.targets import x86

    return x86.features(tvm_dict)


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

    executable.export_library(str(path), fcompile=cc.cross_compiler(cross_compiler()))


def load(path: Path):  # noqa: ANN201 - returns a runner
    """Native on aarch64; elsewhere under qemu-user (or a clear error saying how)."""
    if platform.machine().lower() in _ARM_MACHINES:
        from graphopt.targets import x86

        return x86.load_native(path)
    from graphopt.targets._emulation import EmulatedRunner

    return EmulatedRunner(Path(path))
