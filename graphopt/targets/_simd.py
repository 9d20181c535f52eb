"""The SIMD registers of a CPU target: their width and their number.

Every register tile and every packed channel block is sized from these two facts, so they
come from the target's CPU features, not from LLVM's ``llvm_get_vector_width``: in TVM
0.27 that answers 512 bits for *every* x86 CPU (``haswell``, ``znver3`` and ``x86-64``
included), which made an AVX2 machine run 16-lane blocks, two ymm registers per "vector",
and spill its register tiles.
"""

from __future__ import annotations

import tvm
from tvm.target import codegen

__all__ = ["fma_lanes", "vector_bits", "vector_lanes", "vector_registers"]

_ARM_TRIPLES = ("aarch64", "arm64")
# LLVM CPU names whose AVX-512 FMAs run at AVX2's rate: Zen 4 executes each 512-bit
# instruction as two 256-bit halves. (Intel's client cores with one 512-bit FMA port are
# left out: a KVM guest on a Xeon with two was seen reporting a model LLVM names
# rocketlake.)
_HALF_RATE_512 = ("znver4",)


def _is_x86(target: tvm.target.Target) -> bool:
    triple = str(target.attrs.get("mtriple", ""))
    return target.kind.name == "llvm" and (not triple or triple.startswith(("x86", "i686", "i386")))


def vector_bits(target: tvm.target.Target) -> int:
    """Bits of one SIMD register: 512 with AVX-512, 256 with AVX/AVX2, 128 with SSE or
    NEON (x86 from the CPU's features; elsewhere LLVM's answer; 256 where LLVM has none,
    as for a CUDA target, whose legalizations only need a block size)."""
    if _is_x86(target):
        features = {str(f) for f in codegen.llvm_get_cpu_features(target)}
        return 512 if "avx512f" in features else 256 if "avx" in features else 128
    width = int(codegen.llvm_get_vector_width(target))
    return width if width > 0 else 256


def vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    """Lanes of ``dtype_bits`` in one SIMD register of ``target`` (float32: 16 with
    AVX-512, 8 with AVX2, 4 with NEON); at least 4."""
    return max(vector_bits(target) // dtype_bits, 4)


def fma_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of the FMAs ``target`` retires per instruction slot, for rooflines
    (FLOPs against bytes): :func:`vector_lanes`, but 8 on an AVX-512 CPU named in
    ``_HALF_RATE_512``, whose FMAs run at AVX2's rate."""
    lanes = vector_lanes(target)
    if lanes > 8 and _is_x86(target) and str(target.attrs.get("mcpu", "")) in _HALF_RATE_512:
        return 8
    return lanes


def vector_registers(target: tvm.target.Target) -> int:
    """SIMD registers of ``target``: 32 with AVX-512 and on aarch64 (NEON), 16 with AVX2.

    A register tile sized for 32 registers spills on an AVX2 CPU (16 ymm): every
    accumulator update then goes through the stack."""
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(_ARM_TRIPLES) or vector_bits(target) >= 512:
        return 32
    return 16
