"""The CUDA target: NVIDIA GPUs, kernels compiled ahead of time by nvcc for one SM arch.

The pass lists mirror TVM's ``relax/backend/cuda/pipeline.py`` phase by phase; the
schedule rules are dlight's plus graphopt's conv rule (``_gpu_schedules.py``). The default
layout is NHWC with OHWI weights (``LAYOUTS``, :mod:`graphopt.targets._layout`): a dense
conv is then an implicit GEMM whose reduction (kh, kw, ci) is contiguous in both operands,
as dlight's Matmul rule (and cuDNN, CUTLASS, tensor cores) want it, and consecutive
threads of a depthwise conv read consecutive channels (coalesced loads).

How device code reaches the artifact: TVM writes the kernels as CUDA C++ source.
``KeepCUDASource`` has TVM keep that source (rather than JIT-compiling it for whatever
GPU the compiling machine has) and stamps the requested arch into it; ``export`` compiles
it with nvcc into a fatbin holding SASS for that arch plus its PTX (so newer GPUs can JIT
it), and packs the fatbin into the shared library in place of the source. The artifact
then loads with the TVM runtime alone: no nvcc, NVRTC or Python on the GPU machine.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

from graphopt.errors import ArtifactError, TargetError
from graphopt.targets import _layout
from graphopt.targets._contract import Target
from graphopt.targets._phases import dataflow_lower_passes, finalize_passes
from graphopt.targets._runner import VMRunner

__all__ = [
    "NAME",
    "DESCRIPTION",
    "OPTIONS",
    "DEFAULT_ARCH",
    "LAYOUTS",
    "DEFAULT_LAYOUT",
    "tvm_target",
    "accepts",
    "check_tvm_dict",
    "features",
    "phases",
    "export",
    "load",
    "local_arch",
    "nvcc_path",
    "fatbin_entries",
]

NAME = "cuda"
DESCRIPTION = "NVIDIA GPU via CUDA; kernels compiled by nvcc for one SM architecture"
# Graph-pass options this target chooses (TargetSpec.pass_defaults):
# TVM's GPU rules cannot schedule the fused RNNStep kernel's multi-gate epilogue, and the
# whole-layer RNNSequence kernel is a CPU loop nest (no thread bindings)
PASS_DEFAULTS = {"expand-rnn": {"fuse_steps": False, "sequence": False}}
DEFAULT_ARCH = "sm_80"  # A100: its SASS also runs on sm_86/89, its PTX JITs on newer GPUs
OPTIONS = {
    "arch": f"CUDA SM architecture, e.g. sm_80, sm_90 (default: this machine's GPU, "
    f"else {DEFAULT_ARCH})"
}
LAYOUTS = _layout.table(_layout.NHWC_GPU, _layout.NCHW)  # default first
DEFAULT_LAYOUT = next(iter(LAYOUTS))
_ARCH_RE = re.compile(r"^sm_(\d)(\d+)([af]?)$")
_ARCH_MARK = "// graphopt-cuda-arch: "
_FATBIN_MAGIC = 0xBA55ED50
_NVCC_FLAGS = ["-O3", "--use_fast_math", "-w", "--no-compress"]


# ---- the toolkit and the GPU -------------------------------------------------------


def nvcc_path() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME or /usr/local/cuda; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(Path(root, "bin", "nvcc"), os.X_OK):
            return str(Path(root, "bin", "nvcc"))
    return None


def _require_nvcc(what: str) -> str:
    nvcc = nvcc_path()
    if nvcc is None:
        raise TargetError(
            f"{what} needs nvcc from the CUDA toolkit, and none is on PATH, $CUDA_HOME/bin "
            "or /usr/local/cuda/bin: install the CUDA toolkit or put its bin/ on PATH"
        )
    return nvcc


@functools.cache
def _nvcc_archs(nvcc: str) -> tuple[str, ...]:
    try:
        out = subprocess.run(
            [nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise TargetError(f"cannot ask {nvcc} for its GPU architectures: {exc}") from None
    return tuple(a for a in out.split() if a.startswith("sm_"))


def _cuda_runtime() -> None:
    """Make TVM's CUDA runtime available. A full TVM registers it when it loads its backends;
    a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, what a deployment host may have) does not,
    so load the ``libtvm_runtime_cuda`` beside ``libtvm_runtime`` ourselves. Without a
    driver (no ``libcuda``) the load fails and CUDA stays unavailable."""
    import ctypes

    import tvm

    if tvm.runtime.enabled("cuda"):
        return
    for folder in tvm.libinfo.package_lib_paths():
        lib = Path(folder) / "libtvm_runtime_cuda.so"
        if lib.is_file():
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
            return


def local_arch() -> str | None:
    """``sm_XY`` of GPU 0 when this machine has a CUDA GPU (and driver), else None."""
    import tvm

    try:
        _cuda_runtime()
        dev = tvm.cuda(0)
        if not dev.exist:
            return None
        return "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:  # no driver, or a runtime built without CUDA
        return None


def _check_arch(arch: str) -> str:
    if not isinstance(arch, str) or not _ARCH_RE.match(arch):
        raise TargetError(f"CUDA arch must look like sm_80 or sm_90a, got {arch!r}")
    known = _nvcc_archs(_require_nvcc(f"CUDA target {arch}"))
    base = arch.rstrip("af")
    if arch not in known and base not in known:
        raise TargetError(f"nvcc does not know CUDA arch {arch!r}; it supports {', '.join(known)}")
    return arch


# ---- the target ---------------------------------------------------------------------


def tvm_target(arch: str | None = None) -> dict:
    """TVM target dict for ``arch`` (default: the local GPU's, else :data:`DEFAULT_ARCH`)."""
    return {"kind": "cuda", "arch": _check_arch(arch or local_arch() or DEFAULT_ARCH)}


def accepts(tvm_dict: dict) -> bool:
    return tvm_dict.get("kind") == "cuda"


def check_tvm_dict(tvm_dict: dict) -> dict:
    import tvm

    checked = dict(tvm_dict)
    checked["arch"] = _check_arch(checked.get("arch") or local_arch() or DEFAULT_ARCH)
    try:
        tvm.target.Target(checked)
    except Exception as exc:
        raise TargetError(f"TVM refuses target {checked}: {str(exc).splitlines()[0]}") from None
    return checked


def features(tvm_dict: dict) -> list[str]:
    """What the artifact's device code holds: SASS for the arch, PTX for newer GPUs."""
    arch = str(tvm_dict.get("arch", DEFAULT_ARCH))
    return [f"sass:{arch}", f"ptx:compute_{arch[3:]}"]


def _target_arch(target) -> str:  # noqa: ANN001 - tvm.target.Target
    return str(target.attrs.get("arch", "")) or DEFAULT_ARCH


def phases(
    target,  # noqa: ANN001 - tvm.target.Target
    layout: str | None = None,
    extra_schedule_passes: Sequence = (),
) -> dict[str, list]:
    """Relax passes per phase; see TVM's relax/backend/cuda/pipeline.py for the originals.

    ``layout``: a name from ``LAYOUTS`` (default ``DEFAULT_LAYOUT``);
    ``extra_schedule_passes`` run first in the schedule phase.
    """
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from graphopt.targets import _gpu_schedules as gpu

    return {
        # Sorting/sampling ops map to library kernels before legalization.
        "library_dispatch": [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()],
        # Convs move to the chosen layout while still Relax ops, so ConvertLayout can carry
        # it through elementwise ops and pools to the graph's edges; before LegalizeOps.
        "layout": _layout.choose(NAME, LAYOUTS, layout).passes(target),
        # Ops become TIR; FoldConstant precomputes weight transforms once, at compile time;
        # FuseOps groups elementwise tails with their producer so each group is one kernel.
        "legalize": [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ],
        # After FuseTIR, so epilogues are scheduled with their producer. The first rule
        # that fits a kernel wins; then every kernel must be bound to GPU threads.
        "schedule": [
            *extra_schedule_passes,
            dl.ApplyDefaultSchedule(*gpu.default_rules()),
            gpu.RequireThreadBinding(),
        ],
        "dataflow_lower": dataflow_lower_passes(),
        "finalize": finalize_passes(
            # only with relax.backend.use_cuda_graph
            after_planning=[relax.transform.RewriteCUDAGraph()],
            # Anywhere before codegen (which follows the Relax pipeline); last, so a
            # pipeline that fails earlier changes nothing in the process.
            last=[KeepCUDASource()],
        ),
    }


def KeepCUDASource():  # noqa: ANN201, N802 - a pass, named like TVM's
    """Make TVM's CUDA codegen keep kernel source, its arch stamped in, for ``export``.

    TVM's codegen JIT-compiles kernels when its CUDA runtime is loaded (a GPU machine),
    for that machine's GPU and through NVRTC; graphopt compiles them in ``export``, for
    the requested arch. ``TVM_COMPILE_FORCE_FALLBACK`` tells the codegen to keep the
    source; ``export`` restores the variable. The postproc hook is the one place that
    sees the device target next to the source, so it writes the arch into it.
    """
    import tvm
    import tvm_ffi

    @tvm.transform.module_pass(opt_level=0, name="KeepCUDASource")
    def keep_source(mod, _ctx):  # noqa: ANN001, ANN202
        _Env.force_fallback()
        previous = tvm_ffi.get_global_func("tvm_callback_cuda_postproc", allow_missing=True)
        if previous is None or not getattr(previous, "_graphopt", False):
            tvm_ffi.register_global_func("tvm_callback_cuda_postproc", _stamp_arch, override=True)
        return mod

    return keep_source


def _stamp_arch(code: str, target) -> str:  # noqa: ANN001 - tvm.target.Target
    return f"{_ARCH_MARK}{_target_arch(target)}\n{code}"


_stamp_arch._graphopt = True  # type: ignore[attr-defined]


class _Env:
    """``TVM_COMPILE_FORCE_FALLBACK`` set for a compile, restored by ``export``."""

    _NAME = "TVM_COMPILE_FORCE_FALLBACK"
    _saved: list[str | None] = []

    @classmethod
    def force_fallback(cls) -> None:
        if not cls._saved:
            cls._saved.append(os.environ.get(cls._NAME))
        os.environ[cls._NAME] = "1"

    @classmethod
    def restore(cls) -> None:
        if cls._saved:
            old = cls._saved.pop()
            if old is None:
                os.environ.pop(cls._NAME, None)
            else:
                os.environ[cls._NAME] = old


# ---- export: CUDA source -> nvcc fatbin -> packed into the shared library -----------


def _cuda_modules(mod) -> list:  # noqa: ANN001 - tvm runtime Module
    found, stack = [], list(mod.imports)
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            found.append(m)
        stack.extend(m.imports)
    return found


def _compile_fatbin(nvcc: str, source: str, workdir: Path, index: int) -> tuple[bytes, str]:
    first = source.split("\n", 1)[0]
    if not first.startswith(_ARCH_MARK):
        raise TargetError(
            "the CUDA kernels carry no target arch: compile them with graphopt's cuda "
            "target phases (its KeepCUDASource pass) before exporting"
        )
    arch = first[len(_ARCH_MARK) :].strip()
    number = arch[3:]
    cu, fatbin = workdir / f"kernels{index}.cu", workdir / f"kernels{index}.fatbin"
    cu.write_text(source)
    cmd = [
        nvcc,
        "--fatbin",
        *_NVCC_FLAGS,
        "-gencode",
        f"arch=compute_{number},code=[sm_{number},compute_{number}]",
        "-o",
        str(fatbin),
        str(cu),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise TargetError(
            f"nvcc failed compiling the CUDA kernels for {arch} (source kept at {cu}): "
            + " | ".join(tail)
        )
    return fatbin.read_bytes(), arch


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _swap_payload(blob: bytes, source: str, fatbin: bytes) -> bytes:
    """Replace one CUDA module's source with ``fatbin`` in TVM's packed-imports blob.

    Layout (``CUDAModuleNode::SaveToBytes``, TVM 0.27): each module is its kind string,
    then its payload length, then the payload: fmt string, function table, code bytes.
    Every string and byte field is a little-endian u64 length and the bytes; the blob
    itself starts with its length.
    """
    code = source.encode()
    head, tail = _u64(4) + b"cuda", _u64(len(code)) + code
    end = blob.find(tail)
    start = blob.rfind(head, 0, end) if end >= 0 else -1
    # The kind and the fmt are both "cuda"; the module starts where the payload that
    # follows the kind ends exactly after the source.
    while start >= 0:
        payload_at = start + len(head) + 8
        size = struct.unpack_from("<Q", blob, start + len(head))[0]
        if payload_at + size == end + len(tail) and blob.startswith(head, payload_at):
            break
        start = blob.rfind(head, 0, start)
    if start < 0:
        raise TargetError(
            "cannot find the CUDA kernels in TVM's packed module (has its format changed?); "
            "graphopt's cuda export is written for TVM 0.27"
        )
    fmap = blob[payload_at + len(head) : end]
    payload = _u64(6) + b"fatbin" + fmap + _u64(len(fatbin)) + fatbin
    body = blob[8:start] + head + _u64(len(payload)) + payload + blob[end + len(tail) :]
    return _u64(len(body)) + body


_ASM = """\
  .section .rodata
  .balign 64
  .globl {sym}
  .type {sym}, @object
{sym}:
  .incbin "{path}"
  .size {sym}, . - {sym}
  .section .note.GNU-stack,"",@progbits
"""


def export(executable, path: Path) -> None:  # noqa: ANN001 - tvm VMExecutable
    """Compile the kernels with nvcc and write the shared library to ``path``."""
    _Env.restore()
    nvcc = _require_nvcc("exporting a CUDA artifact")
    import tvm

    pack = tvm.get_global_func("runtime.ModulePackImportsToTensor")

    def pack_imports(mod, is_system_lib, prefix, workspace) -> str:  # noqa: ANN001
        if is_system_lib:
            raise TargetError("the cuda target does not build system libraries")
        workdir = Path(workspace)
        blob = pack(mod).numpy().tobytes()
        for i, dev in enumerate(_cuda_modules(mod)):
            source = dev.inspect_source("cuda") or dev.inspect_source("")
            fatbin, _arch = _compile_fatbin(nvcc, source, workdir, i)
            blob = _swap_payload(blob, source, fatbin)
        data = workdir / "devc.bin"
        data.write_bytes(blob)
        asm = workdir / "devc.S"
        sym = f"{prefix}__tvm_ffi__library_bin"
        asm.write_text(_ASM.format(sym=sym, path=str(data).replace('"', '\\"')))
        return str(asm)

    executable.mod.export_library(str(path), fpack_imports=pack_imports)


def fatbin_entries(data: bytes) -> list[tuple[str, str]]:
    """``[(kind, arch)]`` of every fatbin found in ``data``: kind "ptx" or "sass"."""
    entries = []
    magic = struct.pack("<I", _FATBIN_MAGIC)
    at = data.find(magic)
    while at >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, at)
        off, end = at + header, at + header + size
        while off + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
            arch = struct.unpack_from("<I", data, off + 28)[0]
            name = {1: "ptx", 2: "sass"}.get(kind, f"kind{kind}")
            entries.append((name, f"sm_{arch}"))
            off += entry_header + payload
        at = data.find(magic, max(end, at + 4))
    return entries


# ---- load -------------------------------------------------------------------------


def cannot_run_here(tvm_dict: dict) -> str | None:
    """Why an artifact for ``tvm_dict`` cannot run on this machine (None when it can)."""
    here = local_arch()
    if here is None:
        return "this machine has no CUDA GPU"
    built, have = _ARCH_RE.match(str(tvm_dict.get("arch", ""))), _ARCH_RE.match(here)
    if built and have and (int(built[1]), int(built[2])) > (int(have[1]), int(have[2])):
        return f"this GPU is {here}, older than {tvm_dict['arch']}"
    return None


def load(path: Path, manifest: dict):  # noqa: ANN201 - returns a runner
    """Load a CUDA artifact into Relax VMs on GPU 0, after checking that this machine's
    GPU runs the arch its ``manifest`` records."""
    import tvm

    arch = str(manifest.get("target", {}).get("tvm", {}).get("arch", "unknown arch"))
    here = local_arch()
    if here is None:
        raise ArtifactError(
            f"{path} is a CUDA artifact ({arch}) and this machine has no CUDA GPU "
            "(or no NVIDIA driver): run it on a machine with an NVIDIA GPU"
        )
    built, have = _ARCH_RE.match(arch), _ARCH_RE.match(here)
    if built and have and (int(built[1]), int(built[2])) > (int(have[1]), int(have[2])):
        raise ArtifactError(
            f"{path} is a CUDA artifact for {arch} and this GPU "
            f"({tvm.cuda(0).device_name}) is {here}: recompile with --arch {here}"
        )
    return VMRunner.open(path, tvm.cuda(0))


TARGET = Target(
    name=NAME,
    description=DESCRIPTION,
    options=OPTIONS,
    layouts=LAYOUTS,
    tvm_target=tvm_target,
    accepts=accepts,
    check_tvm_dict=check_tvm_dict,
    phases=phases,
    export=export,
    load=load,
    features=features,
    cannot_run_here=cannot_run_here,
)
