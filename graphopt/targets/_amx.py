"""x86 AMX bf16 kernels: ``tdpbf16ps`` tiles on CPUs with ``amx_bf16`` (Sapphire Rapids on).

``tdpbf16ps tmm0, tmm1, tmm2`` adds to a 16x16 float32 tile ``C``, for each ``m, n``,
``sum_k A[m, 2k] * B[k, 2n] + A[m, 2k+1] * B[k, 2n+1]`` (k < 16; bf16 products, float32
sums): ``A`` is 16 rows of 32 bf16 (64 bytes), ``B`` 16 rows of 16 bf16 *pairs* -- the
weight re-laid out ``K x N -> N/16 x K/2 x 16 x 2``, the layout ``_bf16`` also uses for
``vdpbf16ps`` (one 16-column block is then 1 KiB per 32 reduction steps, row stride 64
bytes); FoldConstant does the re-layout once, at compile time.

What runs where:

- *legalization*: a bf16 matmul ``x (..., K) @ w (K, N)`` with ``M % 16 == 0`` (M: the
  rows of ``x``, an N-D ``x`` reshaped to 2-D), ``K % 32 == 0``, ``N % 16 == 0``
  (:func:`legalize_matmul`), and a dense unpadded 1x1 packed conv of any
  stride as a GEMM (:func:`legalize_conv2d`: output pixels to rows, zero rows up to a
  whole tile, the same matmul, rows back to NCHW16c in the kernel that also runs the
  conv's epilogue), on a target where AMX is on (:func:`amx_enabled`), become
  :func:`matmul_amx_te` (anchor ``graphopt.kernel = matmul_amx``); a dense KxK conv
  (not 1x1) of any stride, undilated, with input channels a multiple of 32 and output
  channels of 16, becomes :func:`conv_amx_te` (anchor ``conv_amx``): one GEMM per tap on
  the padded input's rows (see "KxK convs" below and :class:`Taps`); everything else
  goes to the wrapped legalization (``_bf16``'s ``vdpbf16ps``, which keeps the RGB stem,
  grouped and depthwise convs, or fp32).
- *schedule* (:func:`rule_matmul_amx`, rule ``matmul_amx``; :func:`rule_conv_amx`, rule
  ``conv_amx``): one block of 2x2 output tiles (32x32; 1 where M or N has an odd number
  of tiles) per parallel iteration, its float32 accumulator a ``local`` buffer, zeroed,
  then the whole reduction (a conv's: every tap) as one tensorized step
  (:func:`tile_intrin`, :func:`tile_conv_intrin`: one intrinsic per K, block and taps),
  then the fused epilogue reading it back, vectorized.
- *the tile step's body*: a call to ``graphopt_amx_bf16_gemm_{mt}x{nt}``
  (:func:`tile_ll`, LLVM IR linked with ``pragma_import_llvm`` and inlined): the first
  call in a process asks Linux for the tile state
  (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, without which the first tile
  instruction raises SIGILL; done in the kernel itself so that an artifact loaded by
  plain TVM runtime works), then ``ldtilecfg`` (every tile 16 rows x 64 bytes),
  ``tileloadd`` of the C tiles, ``K/32`` steps of ``tileloadd`` A and B tiles and
  ``tdpbf16ps`` per C tile (2x2: 4 loads for 4 products, all 8 tile registers), then
  ``tilestored`` and ``tilerelease``; a conv's call runs the steps of each tap in turn,
  its A rows :meth:`Taps.offset` further on. Where Linux refuses the tile state (a CPU without
  AMX, an old kernel, a thread's too small ``sigaltstack``) the call returns 1 without
  touching a tile and the intrinsic's body computes the block with plain loops, so an
  AMX artifact never raises SIGILL: it is slow, not wrong, where AMX is missing. TVM's
  AMX helpers (``runtime.amx_init``, ``runtime.amx_tileconfig``, the AMX int8
  intrinsics) are not in this TVM build, hence the IR.

Written on machines without AMX (AMD Zen 4; qemu 7.2 raises SIGILL; Intel SDE cannot be
downloaded), so the tests run all but the six tile instructions on any x86 host. First
run on real AMX on 2026-12-03 (a KVM Xeon with ``amx_bf16``): the probe passed, and
ResNet-18 and ResNet-50 built in bf16 verified against onnxruntime (max |diff| as
OpenVINO's bf16), the tile kernels at 0.7-3.2 TFLOP/s on 2 cores
(``benchmarks/RESULTS.md``, "Lower precision"). The tests:

- the tests assemble the kernels for ``sapphirerapids`` and check the instructions;
- the real kernels run, tile instructions in the binary: on a host without AMX Linux
  refuses the tile state, so the permission request, the refusal and the plain-loop
  path run for real (on an AMX host the tiles do);
- everything around the instruction (weight re-layout, tiling, the tensorize match, the
  epilogue) also runs with :func:`emulated_tiles`: the same intrinsic description with
  a body of plain TIR loops computing exactly what ``tdpbf16ps`` computes;
- :func:`tile_ll`'s IR itself (config bytes, addresses, strides, steps, the C loads and
  stores) runs in the tests with each tile intrinsic replaced by a software stand-in
  written from the SDM's pseudo-code, and the tile state taken as granted;
- on the user's machine, when the host has ``amx_bf16``, :func:`amx_probe` asks for the
  tile state and runs the kernels of every tile block and two conv tap loops
  (:func:`check_kernels`) once per
  process *in a subprocess* (a SIGILL cannot kill the caller) against numpy; on any
  failure it prints one warning line and the AVX512-BF16 kernels of ``_bf16`` are used
  instead. ``GRAPHOPT_AMX=0`` turns AMX off. The probe costs a few seconds, once per
  process, at the first bf16 matmul or conv legalized for an AMX target. A target
  compiled on a host without AMX (cross-compiling for ``sapphirerapids``) gets AMX
  without a probe.

Not done: the RGB stem (3 input channels; a tile row is 32) and grouped/depthwise convs
stay on ``vdpbf16ps``; matmul M/N tails (such shapes take ``vdpbf16ps``); the conv's row
copy and write-back are kernels of their own (fused with the neighbours' casts and
epilogues); keeping the tile config across calls and B tiles across row blocks. Those
are the next steps for speed: on the Xeon, ResNet-50's write-back kernels (with the
residual add and ReLU) took 3.9 of its 14.9 ms, the tile kernels 9.4.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax, s_tir, te, topi
from tvm.s_tir import TensorIntrin
from tvm.s_tir.schedule import ScheduleError
from tvm.script import tirx as T

from graphopt.targets._bf16 import pair_matrix, paired_matmul_te, static_shape
from graphopt.targets._cpu import host_cpu_flags, host_x86_target
from graphopt.targets._cpu_schedules import (
    _inline_epilogue,
    _inline_spatial_intermediates,
    _other_root_blocks,
    _root_blocks,
    _schedule_others,
)

__all__ = [
    "RULES",
    "Taps",
    "WRAP_LEGALIZE",
    "amx_enabled",
    "amx_probe",
    "build_matmul",
    "check_kernels",
    "conv_amx_te",
    "emulated_tiles",
    "host_has_amx",
    "legalize_conv2d",
    "legalize_matmul",
    "matmul_amx_te",
    "probe_main",
    "request_tile_state",
    "rule_conv_amx",
    "rule_matmul_amx",
    "run_conv",
    "run_matmul",
    "run_probe",
    "target_has_amx",
    "tile_conv_intrin",
    "tile_ll",
    "tile_intrin",
]

_ANNOTATION = "graphopt.kernel"
_NCHWC = re.compile(r"^NCHW(\d+)c$")
_OIHWIO = re.compile(r"^OIHW(\d+)i(\d+)o$")
_TILE = 16  # rows of a tile; float32 columns of the C tile
_TAPS = "graphopt.amx_taps"  # a conv_amx block's Taps
_K_STEP = 32  # bf16 reduction elements per tdpbf16ps (64-byte rows)

_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18
_MAX_BLOCK = 2  # output tiles per call along M and along N: 2x2 uses all 8 tile registers


def _config(tiles: int) -> str:
    """ldtilecfg's 64 bytes as an LLVM string: palette 1; tiles 0..tiles-1 each 16 rows
    x 64 bytes (colsb: little-endian u16 at bytes 16+2i; rows: u8 at byte 48+i)."""
    cfg = bytes([1] + [0] * 15 + [64, 0] * tiles + [0] * (32 - 2 * tiles))
    cfg += bytes([_TILE] * tiles + [0] * (16 - tiles))
    assert len(cfg) == 64
    return "".join(f"\\{b:02X}" for b in cfg)


def tile_ll(mt: int, nt: int) -> str:
    """LLVM IR of ``graphopt_amx_bf16_gemm_{mt}x{nt}(c, ldc, a, lda, b, ldb, steps, taps,
    kw, wq, stride, prow)``: ``C (16mt x 16nt f32, row stride ldc bytes) += A (16mt x 32
    steps bf16, stride lda) B`` (nt blocks ``ldb`` bytes apart, each ``taps * steps`` x
    1 KiB: 16 pair rows of 64 bytes per step), for each of ``taps`` conv taps (a matmul:
    1): tap ``t`` reads A :meth:`Taps.offset` rows further on (the conv's input rows)
    and the B steps after the previous taps'. Tiles: C
    ``i*nt+j``, then A ``i``, then B ``j``; each step loads mt A and nt B tiles for mt*nt
    ``tdpbf16ps``. The first call in a process asks Linux for the tile state; each call
    loads the config and releases the tiles at the end."""
    name = f"{mt}x{nt}"
    tc = {(i, j): i * nt + j for i in range(mt) for j in range(nt)}
    ta = {i: mt * nt + i for i in range(mt)}
    tb = {j: mt * nt + mt + j for j in range(nt)}
    lines = []
    for (i, j), t in tc.items():
        lines += [
            f"  %crow{t} = mul i64 %ldc, {16 * i}",
            f"  %coff{t} = add i64 %crow{t}, {64 * j}",
            f"  %pc{t} = getelementptr i8, ptr %c, i64 %coff{t}",
            f"  call void @llvm.x86.tileloadd64(i8 {t}, ptr %pc{t}, i64 %ldc)",
        ]
    load_c = "\n".join(lines)
    lines = ["  %u = add i64 %u0, %s", "  %as = shl i64 %s, 6", "  %ao = add i64 %as, %tao"]
    lines.append("  %bo = shl i64 %u, 10")
    for i, t in ta.items():
        lines += [
            f"  %arow{i} = mul i64 %lda, {16 * i}",
            f"  %aoff{i} = add i64 %arow{i}, %ao",
            f"  %pa{i} = getelementptr i8, ptr %a, i64 %aoff{i}",
            f"  call void @llvm.x86.tileloadd64(i8 {t}, ptr %pa{i}, i64 %lda)",
        ]
    for j, t in tb.items():
        lines += [
            f"  %bblk{j} = mul i64 %ldb, {j}",
            f"  %boff{j} = add i64 %bblk{j}, %bo",
            f"  %pb{j} = getelementptr i8, ptr %b, i64 %boff{j}",
            f"  call void @llvm.x86.tileloadd64(i8 {t}, ptr %pb{j}, i64 64)",
        ]
    for (i, j), t in tc.items():
        lines.append(f"  call void @llvm.x86.tdpbf16ps(i8 {t}, i8 {ta[i]}, i8 {tb[j]})")
    step = "\n".join(lines)
    store_c = "\n".join(
        f"  call void @llvm.x86.tilestored64(i8 {t}, ptr %pc{t}, i64 %ldc)" for t in tc.values()
    )
    return f"""
@graphopt_amx_tiles = internal global i32 0 ; 0: not asked yet, 1: granted, 2: refused
@graphopt_amx_cfg_{name} = internal constant [64 x i8] c"{_config(len(tc) + mt + nt)}", align 64

define internal i32 @graphopt_amx_bf16_gemm_{name}(ptr %c, i64 %ldc, ptr %a, i64 %lda, ptr %b,
                                                 i64 %ldb, i64 %steps, i64 %taps, i64 %kw,
                                                 i64 %wq, i64 %stride, i64 %prow) alwaysinline {{
entry:
  %state = load atomic i32, ptr @graphopt_amx_tiles monotonic, align 4
  switch i32 %state, label %refused [ i32 0, label %ask
                                       i32 1, label %tiles ]
ask:
  ; arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18): once per process
  ; (a repeat by a racing thread is harmless); refused without AMX or kernel support
  %r = call i64 asm sideeffect "syscall",
         "={{rax}},{{rax}},{{rdi}},{{rsi}},~{{rcx}},~{{r11}},~{{memory}}"(i64 158, i64 4131, i64 18)
  %granted = icmp eq i64 %r, 0
  %now = select i1 %granted, i32 1, i32 2
  store atomic i32 %now, ptr @graphopt_amx_tiles monotonic, align 4
  br i1 %granted, label %tiles, label %refused
refused:
  ret i32 1 ; the caller computes the block without tiles
tiles:
  call void @llvm.x86.ldtilecfg(ptr @graphopt_amx_cfg_{name})
{load_c}
  br label %tap
tap:
  %t = phi i64 [ 0, %tiles ], [ %tnext, %tapped ]
  %u0 = mul i64 %t, %steps ; B steps before this tap's
  %ty = udiv i64 %t, %kw
  %tx = urem i64 %t, %kw
  %py = urem i64 %ty, %stride
  %px = urem i64 %tx, %stride
  %pys = mul i64 %py, %stride
  %phase = add i64 %pys, %px
  %prows = mul i64 %phase, %prow
  %qy = udiv i64 %ty, %stride
  %qx = udiv i64 %tx, %stride
  %tyw = mul i64 %qy, %wq
  %tin = add i64 %tyw, %qx
  %trow = add i64 %prows, %tin
  %tao = mul i64 %trow, %lda ; A rows further on for this tap (Taps.offset), in bytes
  br label %step
step:
  %s = phi i64 [ 0, %tap ], [ %next, %step ]
{step}
  %next = add i64 %s, 1
  %more = icmp ult i64 %next, %steps
  br i1 %more, label %step, label %tapped
tapped:
  %tnext = add i64 %t, 1
  %tmore = icmp ult i64 %tnext, %taps
  br i1 %tmore, label %tap, label %done
done:
{store_c}
  call void @llvm.x86.tilerelease()
  ret i32 0
}}
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilerelease()
"""


# --- where AMX is on ----------------------------------------------------------------------
_EMULATE = False  # emulated_tiles(): tile steps as plain TIR loops (tests on non-AMX hosts)


@contextlib.contextmanager
def emulated_tiles() -> Iterator[None]:
    """Within: AMX kernels tensorize to plain TIR loops computing what ``tdpbf16ps``
    computes (no tile instruction), so their numerics run on any x86 CPU; and AMX is
    taken on targets with amx-bf16 without the host probe."""
    global _EMULATE
    before, _EMULATE = _EMULATE, True
    try:
        yield
    finally:
        _EMULATE = before


def target_has_amx(target: tvm.target.Target | None) -> bool:
    """Whether LLVM may emit AMX bf16 tile instructions for ``target``."""
    if target is None or target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    found = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    return {"amx-bf16", "amx-tile"} <= found


@functools.cache
def host_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has AMX bf16 (the ``amx_bf16`` flag; read once)."""
    return "amx_bf16" in (host_cpu_flags(cpuinfo) or ())


def amx_enabled(target: tvm.target.Target | None) -> bool:
    """AMX kernels for ``target``: it has amx-bf16, ``GRAPHOPT_AMX`` is not ``0``, and,
    when this host has AMX (so the artifact may run here), the probe passed. A target
    compiled on a host without AMX is a cross-compile: no probe."""
    if os.environ.get("GRAPHOPT_AMX", "1").strip() == "0" or not target_has_amx(target):
        return False
    if _EMULATE or not host_has_amx():
        return True
    return amx_probe()


@functools.cache
def amx_probe() -> bool:
    """Whether AMX kernels run correctly on this host: False when /proc/cpuinfo has no
    ``amx_bf16``; else, once per process, the tile state granted to this process
    (:func:`request_tile_state`) and :func:`run_probe`; on failure one warning line on
    stderr (the callers then use the AVX512-BF16 kernels)."""
    if not host_has_amx():
        return False
    refused = request_tile_state()  # in this process too: its threads' signal stacks count
    ok, why = (False, refused) if refused else run_probe()
    if not ok:
        print(
            f"graphopt: warning: AMX probe failed ({why}); using AVX512-BF16 kernels",
            file=sys.stderr,
        )
    return ok


def run_probe(timeout_s: float = 300.0, env: dict | None = None) -> tuple[bool, str]:
    """``(ok, why)`` of :func:`probe_main` in a fresh Python process."""
    cmd = [sys.executable, "-c", "from graphopt.targets._amx import probe_main; probe_main()"]
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[2])  # this graphopt, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter and module
            cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, type(exc).__name__
    if done.returncode == 0 and done.stdout.strip().endswith("AMX OK"):
        return True, "ok"
    if done.returncode < 0:
        return False, f"killed by signal {-done.returncode}"
    tail = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["?"])[-1]
    return False, f"exit {done.returncode}: {tail[:200]}"


# The probe's shapes (M, K, N): every tile block the rule makes (2x2, 1x1, 2x1, 1x2), the
# first in several parallel tasks (each worker thread's first call asks for the tiles).
_PROBE_SHAPES = ((64, 96, 64), (48, 64, 48), (32, 32, 48), (48, 64, 32))


def probe_main() -> None:
    """The probe itself (run in a subprocess): Linux grants the tile state, and
    :func:`check_kernels` on this host; prints ``AMX OK``."""
    fail = os.environ.get("GRAPHOPT_AMX_PROBE_FAIL")  # tests: a probe that fails
    if fail == "sigill":
        os.kill(os.getpid(), signal.SIGILL)
    if fail:
        raise SystemExit("forced failure (GRAPHOPT_AMX_PROBE_FAIL)")
    refused = request_tile_state()
    if refused:
        raise SystemExit(refused)
    check_kernels(tvm.target.Target(host_x86_target()))  # with /proc/cpuinfo's features
    print("AMX OK")


def request_tile_state() -> str | None:
    """Ask Linux for the AMX tile state in this process (what the kernels do on their
    first call); None when granted, else why not. Refused on a CPU without AMX, a
    kernel before 5.16, or when a thread's ``sigaltstack`` is too small for tile state."""
    libc = ctypes.CDLL(None, use_errno=True)
    args = (_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    if libc.syscall(*(ctypes.c_long(a) for a in args)) == 0:
        return None
    return f"Linux refused the AMX tile state: {os.strerror(ctypes.get_errno())}"


# The probe's convs (kh, kw, stride) on a padded 9x11 map, 64 -> 48 channels: the tap
# loop at stride 1 and across phase maps.
_PROBE_CONVS = ((3, 3, 1), (3, 3, 2))


def check_kernels(target: tvm.target.Target) -> None:
    """Build and run small bf16 matmuls through the AMX rule for ``target`` on this
    host, one per tile block, and the tap loops of :data:`_PROBE_CONVS`, against numpy;
    SystemExit naming the first mismatch."""
    rng = np.random.default_rng(0)
    for m, k, n in _PROBE_SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        got = run_matmul(build_matmul(target, (m, k, n)), x, w)
        ref = _bf16_round(x) @ _bf16_round(w)
        if not np.allclose(got, ref, rtol=1e-3, atol=1e-3):
            err = np.abs(got - ref).max()
            raise SystemExit(f"AMX {m}x{k}x{n} differs from numpy by {err:.3g}")
    for kh, kw, stride in _PROBE_CONVS:
        got, ref = run_conv(target, kh, kw, stride, rng)
        if not np.allclose(got, ref, rtol=1e-3, atol=1e-3):
            err = np.abs(got - ref).max()
            raise SystemExit(f"AMX {kh}x{kw} conv, stride {stride}, differs by {err:.3g}")


def run_conv(target: tvm.target.Target, kh: int, kw: int, stride: int, rng) -> tuple:  # noqa: ANN001
    """A :func:`conv_amx_te` kernel (64 -> 48 channels on a 9x11 map padded by 1)
    scheduled by :func:`rule_conv_amx`, built for ``target`` and run here on random
    rows: ``(got, numpy's)``, the sums of each tap's rows times its weights."""
    c, o = 64, 48
    taps, _, _, _, wide, count = _tap_grid([1, 0, 9, 11, 0], (1, 1, 1, 1), kh, kw, stride)
    rows = te.placeholder((count, c), "bfloat16", name="rows")
    weight = te.placeholder((o // _TILE, kh * kw, c // 2, _TILE, 2), "bfloat16", name="w")
    func = te.create_prim_func([rows, weight, conv_amx_te(rows, weight, wide, *taps)])
    sch = rule_conv_amx(func, target)
    if sch is None:
        raise RuntimeError("rule_conv_amx declined its own kernel")
    lib = tvm.compile(sch.mod, target=target)
    x = rng.standard_normal((count, c)).astype(np.float32)
    w = rng.standard_normal((kh * kw, c, o)).astype(np.float32)
    pairs = w.reshape(kh * kw, c // 2, 2, o // _TILE, _TILE).transpose(3, 0, 1, 4, 2)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((wide, o), np.float32), dev)
    lib["main"](_bf16_tensor(x, dev), _bf16_tensor(np.ascontiguousarray(pairs), dev), out)
    xb, wb = _bf16_round(x), _bf16_round(w)
    ref = sum(xb[taps.offset(t) : taps.offset(t) + wide] @ wb[t] for t in range(kh * kw))
    return out.numpy(), ref


def _bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 (round to nearest even) -> float32, as TVM's cast does."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def build_matmul(target: tvm.target.Target, shape: tuple[int, int, int]):  # noqa: ANN201
    """A PrimFunc ``out = x(bf16) @ w_pairs(bf16)`` (float32 out) scheduled by
    :func:`rule_matmul_amx`, built for ``target`` (the probe's and the tests' kernel)."""
    m, k, n = shape
    x = te.placeholder((m, k), "bfloat16", name="x")
    w = te.placeholder((n // _TILE, k // 2, _TILE, 2), "bfloat16", name="w")
    func = te.create_prim_func([x, w, matmul_amx_te(x, w)])
    sch = rule_matmul_amx(func, target)
    if sch is None:
        raise RuntimeError("rule_matmul_amx declined its own kernel")
    return tvm.compile(sch.mod, target=target)


def run_matmul(lib, x: np.ndarray, w: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """Run :func:`build_matmul`'s kernel on float32 ``x`` (M,K), ``w`` (K,N)."""
    dev = tvm.cpu()
    pairs = w.reshape(w.shape[0] // 2, 2, w.shape[1] // _TILE, _TILE).transpose(2, 0, 3, 1)
    xs = _bf16_tensor(x, dev)
    ws = _bf16_tensor(np.ascontiguousarray(pairs), dev)
    out = tvm.runtime.tensor(np.zeros((x.shape[0], w.shape[1]), np.float32), dev)
    lib["main"](xs, ws, out)
    return out.numpy()


def _bf16_tensor(a: np.ndarray, dev):  # noqa: ANN001, ANN202
    import ml_dtypes

    return tvm.runtime.tensor(a.astype(ml_dtypes.bfloat16), dev)


# --- the tile step ------------------------------------------------------------------------
def _tile_desc(k: int, mt: int, nt: int):  # noqa: ANN202
    rows, cols = _TILE * mt, _TILE * nt

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (rows, k), "bfloat16", offset_factor=1)
        B = T.match_buffer(b, (nt, k // 2, _TILE, 2), "bfloat16", offset_factor=1)
        C = T.match_buffer(c, (rows, cols), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:rows, 0:k], B[0:nt, 0 : k // 2, 0:_TILE, 0:2])
            T.writes(C[0:rows, 0:cols])
            for i, j, kk, p in T.grid(rows, cols, k // 2, 2):
                with T.sblock("update"):
                    vi, vj, vk, vp = T.axis.remap("SSRR", [i, j, kk, p])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk * 2 + vp], "float32") * T.cast(
                        B[vj // _TILE, vk, vj % _TILE, vp], "float32"
                    )

    return desc


def _tile_impl(k: int, mt: int, nt: int, emulated: bool):  # noqa: ANN202
    """The tile step: a call of :func:`tile_ll`'s function (its plain-loop body where
    Linux refuses the tiles), or, ``emulated``, only the loops: per 32-deep step, per
    output tile, ``tdpbf16ps``'s sums (bf16 products, float32 sums, the even product
    first)."""
    rows, cols = _TILE * mt, _TILE * nt
    func = f"graphopt_amx_bf16_gemm_{mt}x{nt}"

    @T.macro
    def sums(A, B, C) -> None:  # noqa: ANN001
        for s, i, j, kk in T.grid(k // _K_STEP, rows, cols, _K_STEP // 2):
            C[i, j] = (
                C[i, j]
                + T.cast(A[i, s * _K_STEP + kk * 2], "float32")
                * T.cast(B[j // _TILE, s * 16 + kk, j % _TILE, 0], "float32")
                + T.cast(A[i, s * _K_STEP + kk * 2 + 1], "float32")
                * T.cast(B[j // _TILE, s * 16 + kk, j % _TILE, 1], "float32")
            )

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        lda = T.int32()
        ldc = T.int32()
        A = T.match_buffer(a, (rows, k), "bfloat16", offset_factor=1, strides=[lda, 1])
        B = T.match_buffer(b, (nt, k // 2, _TILE, 2), "bfloat16", offset_factor=1)
        C = T.match_buffer(
            c, (rows, cols), "float32", offset_factor=1, scope="local", strides=[ldc, 1]
        )
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:rows, 0:k], B[0:nt, 0 : k // 2, 0:_TILE, 0:2])
            T.writes(C[0:rows, 0:cols])
            if emulated:  # (a Python bool: the parser keeps one branch)
                sums(A, B, C)
            else:
                refused = T.call_extern(
                    "int32",
                    func,
                    T.address_of(C[0, 0]),
                    T.int64(4) * T.Cast("int64", ldc),
                    T.address_of(A[0, 0]),
                    T.int64(2) * T.Cast("int64", lda),
                    T.address_of(B[0, 0, 0, 0]),
                    T.int64(k * _TILE * 2),  # bytes from one 16-column block to the next
                    T.int64(k // _K_STEP),
                    *_ONE_TAP,
                )
                if refused != 0:  # no tile permission (no AMX here): the same sums, slowly
                    sums(A, B, C)

    return impl


def tile_intrin(k: int, mt: int = 1, nt: int = 1, emulated: bool = False) -> str:
    """The tensor intrinsic for ``mt`` x ``nt`` output tiles (16x16 each) over a
    reduction of ``k`` (a multiple of 32): registered on first use; ``emulated``: the
    plain-loop body."""
    name = f"graphopt_amx_bf16_{mt}x{nt}_k{k}" + ("_emulated" if emulated else "")
    if TensorIntrin.get(name, allow_missing=True) is None:
        body = _tile_impl(k, mt, nt, emulated)
        TensorIntrin.register(name, _tile_desc(k, mt, nt), body)
    return name


class Taps(NamedTuple):
    """A conv's taps on its input rows: a ``kh x kw`` kernel of stride ``s``; the padded
    input as ``s * s`` phase maps (phase ``(py, px)``: padded pixels ``(y*s + py, x*s +
    px)``), each ``wq`` pixels wide, one row per pixel, ``prow`` rows per phase. Output
    pixel (oy, ox) is row ``q = oy * wq + ox`` (one image after another, ``wq - ow``
    spare columns per row), and tap ``t`` of it is row ``q + offset(t)`` of the rows."""

    kh: int
    kw: int
    s: int
    wq: int
    prow: int

    def offset(self, t):  # noqa: ANN001, ANN201 - int or PrimExpr
        """Rows from an output pixel's row to its tap ``t``'s input row."""
        y, x = t // self.kw, t % self.kw
        if self.s == 1:
            return y * self.wq + x
        phase = y % self.s * self.s + x % self.s
        return phase * self.prow + y // self.s * self.wq + x // self.s

    @property
    def reach(self) -> int:
        """How many more input rows than output rows a block reads, as TVM's region
        analysis bounds it (each term of :meth:`offset` at its own largest: a little
        past the largest offset for a stride; the rows hold it, ``s * s * prow``)."""
        t = tvm.tirx.Var("t", "int32")
        analyzer = tvm.sym.Analyzer()
        analyzer.bind(t, tvm.ir.Range(0, self.kh * self.kw))
        return int(analyzer.const_int_bound(self.offset(t)).max_value)

    @property
    def args(self) -> tuple:
        """The tile step's tap arguments (:func:`tile_ll`)."""
        taps = self.kh * self.kw
        return tuple(T.int64(v) for v in (taps, self.kw, self.wq, self.s, self.prow))


_ONE_TAP = Taps(1, 1, 1, 0, 0).args  # a matmul's


def _tile_conv_desc(k: int, mt: int, nt: int, taps: Taps):  # noqa: ANN202
    """A conv's tile step: the matmul's over every tap, tap ``t`` reading A
    ``taps.offset(t)`` rows further on and its own B steps (B: ``[nt, kh*kw, k/2, 16,
    2]``)."""
    rows, cols, nt_ = _TILE * mt, _TILE * nt, taps.kh * taps.kw
    arows = rows + taps.reach

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (arows, k), "bfloat16", offset_factor=1)
        B = T.match_buffer(b, (nt, nt_, k // 2, _TILE, 2), "bfloat16", offset_factor=1)
        C = T.match_buffer(c, (rows, cols), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:arows, 0:k], B[0:nt, 0:nt_, 0 : k // 2, 0:_TILE, 0:2])
            T.writes(C[0:rows, 0:cols])
            for i, j, t, kk, p in T.grid(rows, cols, nt_, k // 2, 2):
                with T.sblock("update"):
                    vi, vj, vt, vk, vp = T.axis.remap("SSRRR", [i, j, t, kk, p])
                    C[vi, vj] = C[vi, vj] + T.cast(
                        A[vi + taps.offset(vt), vk * 2 + vp], "float32"
                    ) * T.cast(B[vj // _TILE, vt, vk, vj % _TILE, vp], "float32")

    return desc


def _tile_conv_impl(k: int, mt: int, nt: int, taps: Taps, emulated: bool):  # noqa: ANN202
    """The conv tile step: one call of :func:`tile_ll`'s function over every tap (its
    plain-loop body where Linux refuses the tiles), or, ``emulated``, only the loops."""
    rows, cols, nt_ = _TILE * mt, _TILE * nt, taps.kh * taps.kw
    arows = rows + taps.reach
    func = f"graphopt_amx_bf16_gemm_{mt}x{nt}"

    @T.macro
    def sums(A, B, C) -> None:  # noqa: ANN001 - tdpbf16ps's, per tap and 32-deep step
        for t, s, i, j, kk in T.grid(nt_, k // _K_STEP, rows, cols, _K_STEP // 2):
            C[i, j] = (
                C[i, j]
                + T.cast(A[i + taps.offset(t), s * _K_STEP + kk * 2], "float32")
                * T.cast(B[j // _TILE, t, s * 16 + kk, j % _TILE, 0], "float32")
                + T.cast(A[i + taps.offset(t), s * _K_STEP + kk * 2 + 1], "float32")
                * T.cast(B[j // _TILE, t, s * 16 + kk, j % _TILE, 1], "float32")
            )

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        lda = T.int32()
        ldc = T.int32()
        A = T.match_buffer(a, (arows, k), "bfloat16", offset_factor=1, strides=[lda, 1])
        B = T.match_buffer(b, (nt, nt_, k // 2, _TILE, 2), "bfloat16", offset_factor=1)
        C = T.match_buffer(
            c, (rows, cols), "float32", offset_factor=1, scope="local", strides=[ldc, 1]
        )
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:arows, 0:k], B[0:nt, 0:nt_, 0 : k // 2, 0:_TILE, 0:2])
            T.writes(C[0:rows, 0:cols])
            if emulated:  # (a Python bool: the parser keeps one branch)
                sums(A, B, C)
            else:
                refused = T.call_extern(
                    "int32",
                    func,
                    T.address_of(C[0, 0]),
                    T.int64(4) * T.Cast("int64", ldc),
                    T.address_of(A[0, 0]),
                    T.int64(2) * T.Cast("int64", lda),
                    T.address_of(B[0, 0, 0, 0, 0]),
                    T.int64(nt_ * k * _TILE * 2),  # bytes from one column block to the next
                    T.int64(k // _K_STEP),
                    *taps.args,
                )
                if refused != 0:  # no tile permission (no AMX here): the same sums, slowly
                    sums(A, B, C)

    return impl


def tile_conv_intrin(k: int, mt: int, nt: int, taps: Taps, emulated: bool = False) -> str:
    """The tensor intrinsic for a conv's ``mt`` x ``nt`` output tiles over ``taps`` and
    ``k`` input channels (a multiple of 32): registered on first use."""
    shape = "_".join(str(v) for v in taps)
    name = f"graphopt_amx_bf16_conv_{mt}x{nt}_k{k}_t{shape}" + ("_emulated" if emulated else "")
    if TensorIntrin.get(name, allow_missing=True) is None:
        body = _tile_conv_impl(k, mt, nt, taps, emulated)
        TensorIntrin.register(name, _tile_conv_desc(k, mt, nt, taps), body)
    return name


# --- legalization -------------------------------------------------------------------------
def matmul_amx_te(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """out[m, n] = sum x[m, 2k+j] * w[n/16, k, n%16, j], float32 sums (``_bf16``'s compute,
    annotated for :func:`rule_matmul_amx`)."""
    return paired_matmul_te(x, w, "matmul_amx")


def _amx_matmul_ok(call: relax.Call) -> bool:
    x, w = call.args[0], call.args[1]
    xs, ws = static_shape(x), static_shape(w)
    return bool(
        xs is not None
        and ws is not None
        and len(xs) >= 2
        and len(ws) == 2
        and str(x.ty.dtype) == "bfloat16"
        and str(w.ty.dtype) == "bfloat16"
        and str(call.attrs.out_dtype) == "float32"
        and int(np.prod(xs[:-1])) % _TILE == 0
        and xs[-1] % _K_STEP == 0
        and ws[1] % _TILE == 0
        and amx_enabled(tvm.target.Target.current(allow_none=True))
    )


def legalize_matmul(fallback):  # noqa: ANN001, ANN201
    """A matmul legalization: bf16 ``x (..., K) @ w (K, N)`` with the rows of ``x`` (all
    but its last axis) a multiple of 16, K of 32 and N of 16, on a target where
    :func:`amx_enabled`, through :func:`matmul_amx_te` (an N-D ``x`` reshaped to 2-D and
    the result back: reshapes of whole tensors, which Relax makes views); any other
    through ``fallback`` (the AVX512-BF16 or fp32 legalization)."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _amx_matmul_ok(call):
            return fallback(bb, call)
        x, w = call.args[0], call.args[1]
        xs, (k, n) = static_shape(x), static_shape(w)
        pairs = bb.emit_te(pair_matrix, w, primfunc_name_hint="weight_pairs")
        if len(xs) == 2:
            return bb.call_te(matmul_amx_te, x, pairs, primfunc_name_hint="matmul_amx")
        rows = bb.emit_te(topi.reshape, x, (int(np.prod(xs[:-1])), k), primfunc_name_hint="reshape")
        out = bb.emit_te(matmul_amx_te, rows, pairs, primfunc_name_hint="matmul_amx")
        return bb.call_te(topi.reshape, out, (*xs[:-1], n), primfunc_name_hint="reshape")

    return legalize


def _conv_rows(data: te.Tensor, stride: tuple[int, int]) -> te.Tensor:
    """NCHW[bi]c -> (P, C): one row per output pixel of a 1x1 conv with ``stride``, the
    GEMM's A; P is N*OH*OW rounded up to 16 (zero rows: a whole last tile)."""
    n, co, h, w, bi = (int(d) for d in data.shape)
    sh, sw = stride
    oh, ow = (h - 1) // sh + 1, (w - 1) // sw + 1
    pixels = n * oh * ow
    zero = tvm.tirx.const(0, data.dtype)

    def row(p, k):  # noqa: ANN001, ANN202
        q = tvm.tirx.min(p, pixels - 1)
        value = data[q // (oh * ow), k // bi, q // ow % oh * sh, q % ow * sw, k % bi]
        return tvm.tirx.if_then_else(p < pixels, value, zero) if pixels % _TILE else value

    return te.compute((-(-pixels // _TILE) * _TILE, co * bi), row, name="conv_rows")


def _conv_weight_pairs(weight: te.Tensor) -> te.Tensor:
    """OIHW[bi]i[bo]o (1x1) -> [O/16, I/2, 16, 2]: the matmul's pair layout (a constant:
    folded at compile time)."""
    oo, io, _, _, bi, bo = (int(d) for d in weight.shape)
    return te.compute(
        (oo * bo // _TILE, io * bi // 2, _TILE, 2),
        lambda co, k, c, j: weight[
            (co * _TILE + c) // bo, (2 * k + j) // bi, 0, 0, (2 * k + j) % bi, (co * _TILE + c) % bo
        ],
        name="weight_pairs",
    )


def _conv_unrows(out: te.Tensor, shape: tuple) -> te.Tensor:
    """(P, O) -> NCHW[16]c, the first N*OH*OW rows (fuses with the conv's epilogue)."""
    n, oo, h, w, bo = shape
    return te.compute(
        shape,
        lambda b, co, y, x, c: out[(b * h + y) * w + x, co * bo + c],
        name="conv_unrows",
    )


def _output_pixels(data_shape: list[int], strides) -> int:  # noqa: ANN001
    n, _, h, w, _ = data_shape
    sh, sw = (int(v) for v in strides)
    return n * ((h - 1) // sh + 1) * ((w - 1) // sw + 1)


def _dense_bf16_conv(call: relax.Call) -> tuple[list[int], list[int]] | None:
    """``(data shape, weight shape)`` of a conv both AMX paths could take: packed
    NCHW[b]c in and out, static shapes, dense, bf16 operands with float32 sums, input
    channels a multiple of 32 and output channels of 16; else None."""
    a = call.attrs
    data_m, out_m = _NCHWC.match(str(a.data_layout)), _NCHWC.match(str(a.out_layout))
    kern_m = _OIHWIO.match(str(a.kernel_layout))
    ds, ws = static_shape(call.args[0]), static_shape(call.args[1])
    ok = bool(
        data_m
        and out_m
        and kern_m
        and ds is not None
        and ws is not None
        and int(a.groups) == 1
        and str(call.args[0].ty.dtype) == "bfloat16"
        and str(call.args[1].ty.dtype) == "bfloat16"
        and str(a.out_dtype) == "float32"
        and int(kern_m.group(2)) == int(out_m.group(1))
        and (ws[0] * ws[5]) % _TILE == 0
        and (ds[1] * ds[4]) % _K_STEP == 0
    )
    return (ds, ws) if ok else None


def _amx_conv_ok(call: relax.Call) -> bool:
    shapes = _dense_bf16_conv(call)
    if shapes is None:
        return False
    ds, ws = shapes
    return bool(
        ws[2:4] == [1, 1]
        and all(int(v) == 0 for v in call.attrs.padding)
        and _output_pixels(ds, call.attrs.strides) >= _TILE
        and amx_enabled(tvm.target.Target.current(allow_none=True))
    )


def legalize_conv2d(fallback):  # noqa: ANN001, ANN201
    """A conv2d legalization: dense unpadded 1x1 packed bf16 convs (any stride; at least
    16 output pixels, input channels a multiple of 32, 16-channel output blocks), on a
    target where :func:`amx_enabled`, as a GEMM: output pixels to rows
    (:func:`_conv_rows`, zero rows up to a whole tile), the AMX matmul, rows back to
    NCHW16c (:func:`_conv_unrows`, fused with the epilogue); any other conv through
    ``fallback`` (3x3 convs: ``_bf16``'s vdpbf16ps kernel)."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _amx_conv_ok(call):
            return fallback(bb, call)
        n, _, h, w, _ = static_shape(call.args[0])
        ws = static_shape(call.args[1])
        sh, sw = (int(v) for v in call.attrs.strides)
        stride = (sh, sw)
        rows = bb.emit_te(_conv_rows, call.args[0], stride, primfunc_name_hint="conv_rows")
        pairs = bb.emit_te(_conv_weight_pairs, call.args[1], primfunc_name_hint="weight_pairs")
        out = bb.emit_te(matmul_amx_te, rows, pairs, primfunc_name_hint="matmul_amx")
        shape = (n, ws[0], (h - 1) // sh + 1, (w - 1) // sw + 1, ws[5])
        return bb.call_te(_conv_unrows, out, shape, primfunc_name_hint="conv_unrows")

    def legalize_or_taps(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        return _legalize_taps(bb, call) if _amx_taps_ok(call) else legalize(bb, call)

    return legalize_or_taps


# --- KxK convs: every tap a GEMM on the padded input's rows ---------------------------------
# A conv is, per tap (y, x), a GEMM of the input shifted by (y, x). On the padded input
# flattened to one row per pixel (its channels contiguous), output pixel (oy, ox),
# computed at row q = oy * wp + ox, reads tap (y, x) at row q + y * wp + x: 16
# consecutive q are one A tile for every tap, at a fixed row offset (:class:`Taps`). The
# output is computed on the padded width (``wp - ow`` spare columns per row, dropped on
# write-back: 4-14% more products on 56..14-wide maps, 31% at 7) and the input is copied
# once, not ``kh * kw`` times as im2col would. A stride-s conv reads its input as s*s
# phase maps (every s-th pixel from each of s*s starts), on which each tap is stride 1.


def _tap_grid(shape: list[int], pads: tuple[int, ...], kh: int, kw: int, s: int) -> tuple:
    """``(taps, oh, ow, hq, wide, rows)``: the :class:`Taps`, the output map, the phase
    maps' height, the computed rows (up to the last output pixel, whole 2-tile blocks)
    and the input rows (every phase's)."""
    n, _, h, w, _ = shape
    pt, pl, pb, pr = pads
    hp, wp = h + pt + pb, w + pl + pr
    oh, ow = (hp - kh) // s + 1, (wp - kw) // s + 1
    hq, wq = -(-hp // s), -(-wp // s)
    last = (n - 1) * hq * wq + (oh - 1) * wq + ow
    wide = -(-last // (2 * _TILE)) * 2 * _TILE
    prow = wide + (kh - 1) // s * wq + (kw - 1) // s  # the rows a phase is read at
    return Taps(kh, kw, s, wq, prow), oh, ow, hq, wide, s * s * prow


def _conv_tap_rows(data: te.Tensor, pads: tuple[int, ...], kh: int, kw: int, s: int) -> te.Tensor:
    """NCHW[bi]c -> (rows, C): the zero-padded input, one row per pixel of each phase map
    (all images in turn), zero rows after the last."""
    n, _, h, w, bi = (int(d) for d in data.shape)
    taps, _, _, hq, _, rows = _tap_grid([n, 0, h, w, bi], pads, kh, kw, s)
    wq, prow = taps.wq, taps.prow
    pt, pl = pads[0], pads[1]
    c = int(data.shape[1]) * bi
    zero = tvm.tirx.const(0, data.dtype)

    def row(r, k):  # noqa: ANN001, ANN202
        phase, p = r // prow, r % prow
        b = p // (hq * wq)
        y = p // wq % hq * s + phase // s - pt
        x = p % wq * s + phase % s - pl
        inside = tvm.tirx.all(b < n, y >= 0, y < h, x >= 0, x < w)
        value = data[
            tvm.tirx.min(b, n - 1),
            k // bi,
            tvm.tirx.max(tvm.tirx.min(y, h - 1), 0),
            tvm.tirx.max(tvm.tirx.min(x, w - 1), 0),
            k % bi,
        ]
        return tvm.tirx.if_then_else(inside, value, zero)

    return te.compute((rows, c), row, name="conv_tap_rows")


def _conv_tap_weight(weight: te.Tensor) -> te.Tensor:
    """OIHW[bi]i[bo]o -> [O/16, kh*kw, I/2, 16, 2]: per 16 output channels, every tap's
    pair layout in turn (one column block's B steps for all taps are contiguous)."""
    oo, io, kh, kw, bi, bo = (int(d) for d in weight.shape)
    return te.compute(
        (oo * bo // _TILE, kh * kw, io * bi // 2, _TILE, 2),
        lambda co, t, k, c, j: weight[
            (co * _TILE + c) // bo,
            (2 * k + j) // bi,
            t // kw,
            t % kw,
            (2 * k + j) % bi,
            (co * _TILE + c) % bo,
        ],
        name="tap_weight",
    )


def conv_amx_te(rows: te.Tensor, weight: te.Tensor, wide: int, *tap_fields: int) -> te.Tensor:
    """out[q, n] = sum over taps t and channel pairs k, j of rows[q + taps.offset(t),
    2k+j] * weight[n/16, t, k, n%16, j], float32 sums, ``taps`` = ``Taps(*tap_fields)``
    (plain ints: emit_te would turn a Taps into a tuple; anchor ``conv_amx``, for
    :func:`rule_conv_amx`; ``taps`` in the block's annotations). One tap axis, not two:
    a 1-wide kernel axis would be a unit loop, which schedules drop."""
    taps = Taps(*tap_fields)
    _, count, kp, _, _ = (int(d) for d in weight.shape)
    rt = te.reduce_axis((0, count), "rt")
    rk, rj = te.reduce_axis((0, kp), "rk"), te.reduce_axis((0, 2), "rj")
    return te.compute(
        (wide, int(weight.shape[0]) * _TILE),
        lambda i, j: te.sum(
            rows[i + taps.offset(rt), rk * 2 + rj].astype("float32")
            * weight[j // _TILE, rt, rk, j % _TILE, rj].astype("float32"),
            axis=[rt, rk, rj],
        ),
        name="conv_amx",
        attrs={_ANNOTATION: "conv_amx", _TAPS: list(taps)},
    )


def _conv_tap_unrows(out: te.Tensor, shape: tuple, hq: int, wq: int) -> te.Tensor:
    """(wide, O) -> NCHW[bo]c: the rows of real output pixels (fuses with the epilogue)."""
    _, _, _, _, bo = shape
    return te.compute(
        shape,
        lambda b, co, y, x, c: out[b * hq * wq + y * wq + x, co * bo + c],
        name="conv_unrows",
    )


def _amx_taps_ok(call: relax.Call) -> bool:
    shapes = _dense_bf16_conv(call)
    if shapes is None:
        return False
    ds, ws = shapes
    if ws[2:4] == [1, 1]:
        return False  # unpadded: the 1x1 GEMM (any stride); padded: one tap, a unit loop
    a = call.attrs
    sh, sw = (int(v) for v in a.strides)
    _, oh, ow, _, _, _ = _tap_grid(ds, tuple(int(v) for v in a.padding), ws[2], ws[3], sh)
    return bool(
        sh == sw
        and all(int(v) == 1 for v in a.dilation)
        and oh * ow >= _TILE
        and amx_enabled(tvm.target.Target.current(allow_none=True))
    )


def _legalize_taps(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    ds, ws = static_shape(call.args[0]), static_shape(call.args[1])
    kh, kw, s = ws[2], ws[3], int(call.attrs.strides[0])
    pads = tuple(int(v) for v in call.attrs.padding)
    taps, oh, ow, hq, wide, _ = _tap_grid(ds, pads, kh, kw, s)
    data = call.args[0]
    rows = bb.emit_te(_conv_tap_rows, data, pads, kh, kw, s, primfunc_name_hint="conv_rows")
    weight = bb.emit_te(_conv_tap_weight, call.args[1], primfunc_name_hint="tap_weight")
    out = bb.emit_te(conv_amx_te, rows, weight, wide, *taps, primfunc_name_hint="conv_amx")
    shape = (ds[0], ws[0], oh, ow, ws[5])
    return bb.call_te(_conv_tap_unrows, out, shape, hq, taps.wq, primfunc_name_hint="conv_unrows")


# --- schedule rule ------------------------------------------------------------------------
def _anchor(sch: s_tir.Schedule, kind: str):  # noqa: ANN202
    found = [
        b for b in _root_blocks(sch) if str(sch.get(b).annotations.get(_ANNOTATION, "")) == kind
    ]
    return found[0] if len(found) == 1 else None


def _extent(sch: s_tir.Schedule, loop) -> int:  # noqa: ANN001
    return int(sch.get(loop).extent)


def _block(tiles: int) -> int:
    """Output tiles per call along one axis: 2 where they divide, else 1."""
    return _MAX_BLOCK if tiles % _MAX_BLOCK == 0 else 1


def rule_matmul_amx(func, target: tvm.target.Target):  # noqa: ANN001, ANN201
    """An AMX bf16 matmul (a 1x1 conv's too) plus its epilogue: see :func:`_tiles_rule`."""
    return _tiles_rule(func, target, "matmul_amx")


def rule_conv_amx(func, target: tvm.target.Target):  # noqa: ANN001, ANN201
    """An AMX bf16 KxK conv on its padded rows plus its epilogue: see :func:`_tiles_rule`."""
    return _tiles_rule(func, target, "conv_amx")


def _tiles_rule(func, target: tvm.target.Target, kind: str):  # noqa: ANN001, ANN202
    """A block of up to 2x2 output tiles per parallel iteration; its float32 accumulator
    (a ``local`` buffer) zeroed, the whole reduction (every tap of a conv) one tile step
    (:func:`tile_intrin`, :func:`tile_conv_intrin`), the epilogue vectorized on write-back."""
    if not (_EMULATE or target_has_amx(target)):
        return None
    sch = s_tir.Schedule(func)
    mm = _anchor(sch, kind)
    if mm is None:
        return None
    dom = [int(iv.dom.extent) for iv in sch.get(mm).iter_vars]
    k = dom[-2] * 2
    _inline_spatial_intermediates(sch, keep=[mm])
    out = sch.cache_write(mm, 0, "local")
    _inline_epilogue(sch, out)
    others = _other_root_blocks(sch, [mm, out])
    loops = sch.get_loops(out)
    if len(loops) != 2 or _extent(sch, loops[0]) % _TILE or _extent(sch, loops[1]) % _TILE:
        return None
    mt, nt = (_block(_extent(sch, lp) // _TILE) for lp in loops)
    mo, mi = sch.split(loops[0], [None, _TILE * mt])
    no, ni = sch.split(loops[1], [None, _TILE * nt])
    sch.reorder(mo, no, mi, ni)
    tile = sch.fuse(mo, no)
    sch.parallel(tile)
    sch.vectorize(sch.split(ni, [None, _TILE])[1])
    sch.compute_at(mm, tile)
    first = sch.get_loops(mm)[1]
    init = sch.decompose_reduction(mm, first)
    sch.vectorize(sch.split(sch.get_loops(init)[-1], [None, _TILE])[1])
    emulated = _EMULATE
    if not emulated:
        sch.annotate(tile, "pragma_import_llvm", tile_ll(mt, nt))
    if kind == "conv_amx":
        taps = Taps(*(int(v) for v in sch.get(mm).annotations[_TAPS]))
        intrin = tile_conv_intrin(k, mt, nt, taps, emulated)
    else:
        intrin = tile_intrin(k, mt, nt, emulated)
    try:
        sch.tensorize(sch.get_loops(mm)[1], intrin)
    except (ScheduleError, ValueError, RuntimeError):
        return None
    return _schedule_others(sch, others, _TILE)


# The legalization graphopt.targets._cpu layers over _bf16's (outermost: tried first).
WRAP_LEGALIZE = {"relax.nn.conv2d": legalize_conv2d, "relax.matmul": legalize_matmul}

# Ordered, first fit wins; before _bf16's and the fp32 rules.
RULES = [("matmul_amx", rule_matmul_amx), ("conv_amx", rule_conv_amx)]
