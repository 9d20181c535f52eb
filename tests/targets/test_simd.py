"""The SIMD facts every channel block and register tile is sized from."""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")

from graphopt.targets import _simd  # noqa: E402


def _x86(cpu: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})


@pytest.mark.parametrize(
    ("cpu", "lanes", "registers"),
    [
        ("haswell", 8, 16),  # AVX2
        ("znver3", 8, 16),  # AVX2 (LLVM's llvm_get_vector_width says 512 for it)
        ("x86-64-v3", 8, 16),
        ("x86-64", 4, 16),  # SSE2 only
        ("skylake-avx512", 16, 32),
        ("znver4", 16, 32),
        ("sapphirerapids", 16, 32),
    ],
)
def test_x86_width_and_registers_come_from_the_cpu_features(cpu, lanes, registers) -> None:
    target = _x86(cpu)
    assert _simd.vector_lanes(target) == lanes
    assert _simd.vector_lanes(target, 16) == 2 * lanes
    assert _simd.vector_registers(target) == registers


def test_aarch64_neon_is_four_lanes_and_32_registers() -> None:
    target = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}
    )
    assert _simd.vector_lanes(target) == 4
    assert _simd.vector_registers(target) == 32
