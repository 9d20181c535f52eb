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


@pytest.mark.parametrize(
    ("cpu", "fma"),
    [
        ("znver3", 8),
        ("znver4", 8),  # AVX-512 registers, each FMA run as two 256-bit halves
        ("znver5", 16),  # full-width AVX-512
        ("skylake-avx512", 16),
        ("sapphirerapids", 16),
        ("x86-64", 4),
    ],
)
def test_fma_lanes_count_what_the_fma_units_retire(cpu: str, fma: int) -> None:
    assert _simd.fma_lanes(_x86(cpu)) == fma


def test_aarch64_neon_is_four_lanes_and_32_registers() -> None:
    target = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}
    )
    assert _simd.vector_lanes(target) == 4
    assert _simd.vector_registers(target) == 32


# --- the host target follows /proc/cpuinfo, not only the CPU model LLVM names -------------
# A KVM guest seen here: a Xeon with AMX and AVX512-BF16 that reports model 167, which
# LLVM names rocketlake (no avx512bf16, no AMX); its flags, as /proc/cpuinfo lists them.
_VM_FLAGS = set(
    "sse4_2 avx avx2 fma f16c avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni "
    "avx512_bf16 avx512_fp16 avx_vnni amx_tile amx_bf16 amx_int8".split()
)


def test_features_the_cpu_name_lacks_are_added_from_cpuinfo() -> None:
    from graphopt.targets import _amx, _bf16, _cpu

    mattr = _cpu.host_mattr("rocketlake", _VM_FLAGS)
    assert sorted(mattr) == sorted(
        ["+avx512bf16", "+avx512fp16", "+avxvnni", "+amx-tile", "+amx-bf16", "+amx-int8"]
    )
    plain = _x86("rocketlake")
    fixed = tvm.target.Target({**dict(plain.export()), "mattr": mattr})
    assert not _bf16.has_avx512_bf16(plain) and not _amx.target_has_amx(plain)
    assert _bf16.has_avx512_bf16(fixed) and _amx.target_has_amx(fixed)


def test_features_the_host_lacks_are_taken_away() -> None:
    from graphopt.targets import _cpu

    avx2_only = {"sse4_2", "avx", "avx2", "fma", "f16c"}  # a guest with AVX-512 masked off
    mattr = _cpu.host_mattr("skylake-avx512", avx2_only)
    assert "-avx512f" in mattr and not any(m.startswith("+") for m in mattr)
    target = tvm.target.Target(
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512", "mattr": mattr}
    )
    assert _simd.vector_lanes(target) == 8  # AVX2 blocks: AVX-512 code would not run


def test_a_cpu_name_that_matches_its_flags_adds_nothing() -> None:
    from graphopt.targets import _cpu

    assert _cpu.host_mattr("sapphirerapids", _VM_FLAGS | {"avx512_vbmi", "amx_fp16"}) in (
        [],
        ["+amx-fp16"],  # LLVM versions differ on whether sapphirerapids has amx-fp16
    )
    assert _cpu.host_mattr("rocketlake", None) == []  # no /proc/cpuinfo: LLVM's name alone


def test_the_default_x86_target_carries_the_hosts_features(monkeypatch) -> None:
    import platform

    from graphopt.targets import _cpu, x86

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the default x86 target is this host's only on an x86 host")
    monkeypatch.setattr(_cpu, "host_cpu", lambda: "rocketlake")
    monkeypatch.setattr(_cpu, "host_cpu_flags", lambda *a: _VM_FLAGS)
    assert "+amx-bf16" in x86.tvm_target()["mattr"]
    assert "mattr" not in x86.tvm_target("rocketlake")  # a named CPU is taken as named
    monkeypatch.setattr(_cpu, "host_cpu_flags", lambda *a: None)
    assert x86.tvm_target() == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "rocketlake"}
