"""AMX bf16 kernels (graphopt/targets/_amx.py).

The development machine has no AMX, so: the kernels are assembled for sapphirerapids
and their instructions checked; the real kernels run here (Linux refuses the tile state,
so each block takes its plain-loop path); the tile step's own LLVM IR runs with software
stand-ins for the six tile instructions (and a broken address is caught); the tile step
emulated in TIR runs through graphopt.compile against onnxruntime; the probe's refusal,
a SIGILL'd child and a forced failure each fall back with one warning line. On an AMX
machine the same tests run the real tile instructions (and the probe).
"""

from __future__ import annotations

import contextlib
import os
import re
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import helper

import graphopt
from graphopt.errors import VerificationError
from graphopt.lower import to_relax
from graphopt.prepare import prepare
from graphopt.targets import _amx, _precision, build, resolve
from graphopt.targets._bf16 import has_avx512_bf16
from graphopt.verify import PRECISION_TOLERANCES
from tests.conftest import make_model

SPR = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}
# This host's CPU told it has AMX: AMX legalization and rule apply; run only emulated.
HOST_AMX = {
    "kind": "llvm",
    "mtriple": "x86_64-linux-gnu",
    "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
    "mattr": ["+amx-tile", "+amx-bf16"],
}
no_amx_here = pytest.mark.skipif(_amx.host_has_amx(), reason="this CPU has AMX")
TILE_OPS = ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease")


@pytest.fixture(autouse=True)
def _fresh_probe():
    _amx.amx_probe.cache_clear()
    yield
    _amx.amx_probe.cache_clear()


def _asm(lib) -> str:  # noqa: ANN001
    mods = [lib.mod, *lib.mod.imports] if hasattr(lib, "mod") else [lib]
    return "".join(m.inspect_source("asm") for m in mods if m.kind == "llvm")


def _gemm_model(m: int, k: int, n: int):
    """x(m,k) -> Gemm (k->n, bias) -> Relu."""
    rng = np.random.default_rng(3)
    fc = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    return make_model(
        [
            helper.make_node("Gemm", ["x", "fc", "b"], ["g"], transB=1),
            helper.make_node("Relu", ["g"], ["y"]),
        ],
        {"x": (m, k)},
        {"y": (m, n)},
        {"fc": fc, "b": b},
    )


def _build_asm(model, target: dict) -> str:  # noqa: ANN001
    _, graph, _ = prepare(model, None, None)
    return _asm(build(to_relax(graph), resolve(target), "nchwc", (), "bf16"))


# --- assembly: the tile step as the AMX machine will run it --------------------------------
def test_tile_kernel_assembles_to_amx_and_its_loop_is_tiles_only():
    asm = _asm(_amx.build_matmul(tvm.target.Target(SPR), (64, 128, 64)))
    for op in (*TILE_OPS, "syscall"):
        assert op in asm, op
    # between the config and the release: only tile loads/stores, tdpbf16ps, address math
    regions = re.findall(r"ldtilecfg.*?tilerelease", asm, flags=re.S)
    assert regions
    for region in regions:
        ops = {line.split()[0] for line in region.splitlines()[1:-1] if line.strip()}
        ops = {op for op in ops if not op.startswith((".", "#"))}
        assert ops <= {*TILE_OPS, "movq", "movl", "addq", "leaq", "movabsq", "jmp", "jne"}, ops
        assert region.count("tdpbf16ps") % 4 == 0  # 2x2 tiles per 32-deep step


def test_bf16_model_on_an_amx_target_uses_tiles_and_amx_off_uses_vdpbf16ps(monkeypatch):
    model = _gemm_model(32, 64, 48)
    asm = _build_asm(model, SPR)
    assert all(op in asm for op in TILE_OPS)
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    asm = _build_asm(model, SPR)
    assert "tdpbf16ps" not in asm and "vdpbf16ps" in asm


# --- numerics with the tile step emulated ---------------------------------------------------
def _bf16(a: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("shape", [(16, 32, 16), (48, 96, 80), (32, 256, 32)])
def test_emulated_tile_kernel_matches_numpy(shape):
    m, k, n = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    with _amx.emulated_tiles():
        lib = _amx.build_matmul(tvm.target.Target(HOST_AMX), shape)
    assert "tdpbf16ps" not in _asm(lib)  # plain loops: runs on any x86
    got = _amx.run_matmul(lib, x, w)
    ref = _bf16(x) @ _bf16(w)  # bf16 products are exact in float32: only sums round
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    assert np.abs(got - x @ w).max() > 1e-4  # and it did compute on bf16 values


def _compile(model, path, emulated: bool):  # noqa: ANN001, ANN202
    """graphopt.compile for this CPU told it has AMX: the real kernels (tiles where Linux
    grants them, else the same sums without) or, ``emulated``, plain-loop tile steps. The
    precision check reads /proc/cpuinfo for the host CPU: it is told ``amx_bf16`` too, so
    the AMX kernels run on any x86 host (the others fall back to the fp32 rules on
    bf16-rounded operands where the CPU has no avx512_bf16)."""
    flags = _precision._cpuinfo_flags
    told = mock.patch.object(_precision, "_cpuinfo_flags", lambda: {*(flags() or ()), "amx_bf16"})
    with told, _amx.emulated_tiles() if emulated else contextlib.nullcontext():
        return graphopt.compile(model, HOST_AMX, path, precision="bf16")


@pytest.mark.parametrize(("m", "rule"), [(32, "matmul_amx"), (8, "matmul_bf16")])
def test_model_matches_onnxruntime(tmp_path, m, rule):
    """Gemm+bias+Relu through graphopt.compile on an AMX target: M=32 takes the AMX
    kernel (epilogue fused), M=8 (not a multiple of 16) the AVX512-BF16 one."""
    if rule == "matmul_bf16" and not has_avx512_bf16(tvm.target.Target(HOST_AMX)):
        pytest.skip("needs avx512_bf16 on this CPU for the fallback kernel")
    model = _gemm_model(m, 64, 48)
    art = _compile(model, tmp_path / "m.so", emulated=False)
    rules = art.manifest["schedule"]["rules"]
    assert rule in rules
    assert ("matmul_amx" in rules) == (rule == "matmul_amx")
    assert art.manifest["verification"]["ok"]
    inputs = art.random_inputs(seed=5)
    got = art.run(inputs)["y"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, inputs)[0]
    rtol, atol = PRECISION_TOLERANCES["bf16"]
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * max(1.0, np.abs(ref).max()))
    assert np.abs(got - ref).max() > 1e-6  # computed in bf16, not fp32


def test_3d_matmul_model_matches_onnxruntime(tmp_path):
    """MatMul (2,16,64) @ (64,48) + bias, as in a transformer: rows flattened to 32."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 48)) / 8).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        {"x": (2, 16, 64)},
        {"y": (2, 16, 48)},
        {"w": w, "b": b},
    )
    art = _compile(model, tmp_path / "m.so", emulated=False)
    assert art.manifest["schedule"]["rules"].get("matmul_amx") == 1
    inputs = art.random_inputs(seed=8)
    got = art.run(inputs)["y"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, inputs)[0]
    rtol, atol = PRECISION_TOLERANCES["bf16"]
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * max(1.0, np.abs(ref).max()))


def _conv_model():
    """x(1,64,14,14) -> Conv 1x1 64->32 (bias; 196 pixels: a part tile) -> Relu -> Conv 3x3
    32->32 -> Add (residual) -> Conv 1x1 stride 2 32->48 (49 pixels)."""
    rng = np.random.default_rng(4)
    w1 = (rng.standard_normal((32, 64, 1, 1)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((32, 32, 3, 3)) / 17).astype(np.float32)
    w3 = (rng.standard_normal((48, 32, 1, 1)) / 6).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w1", "b"], ["c"]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["c2", "r"], ["s"]),
            helper.make_node("Conv", ["s", "w3"], ["y"], strides=[2, 2]),
        ],
        {"x": (1, 64, 14, 14)},
        {"y": (1, 48, 7, 7)},
        {"w1": w1, "b": b, "w2": w2, "w3": w3},
    )


@pytest.mark.parametrize("emulated", [False, True])
def test_conv_model_matches_onnxruntime(tmp_path, emulated):
    """The 1x1 convs become AMX GEMMs (196 and 49 output pixels, zero rows to whole
    tiles), the 3x3 a tap GEMM on its padded rows (conv_amx)."""
    model = _conv_model()
    art = _compile(model, tmp_path / "m.so", emulated)
    rules = art.manifest["schedule"]["rules"]
    assert rules.get("matmul_amx") == 2 and rules.get("conv_amx") == 1
    assert art.manifest["schedule"]["coverage"] == 100.0
    inputs = art.random_inputs(seed=6)
    got = art.run(inputs)["y"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, inputs)[0]
    rtol, atol = PRECISION_TOLERANCES["bf16"]
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * max(1.0, np.abs(ref).max()))


def test_conv_model_on_an_amx_target_uses_tiles():
    asm = _build_asm(_conv_model(), SPR)
    assert all(op in asm for op in TILE_OPS) and "vdpbf16ps" not in asm  # every conv on AMX


# --- KxK convs: taps on the padded rows -----------------------------------------------------
# (kernel, ONNX pads [top, left, bottom, right], stride) of the chain below: square and
# not, a one-row kernel, wide and asymmetric pads, stride 2 (four phase maps).
_TAP_CONVS = (
    ((3, 3), (1, 1, 1, 1), 1),
    ((5, 3), (2, 1, 2, 1), 1),
    ((3, 3), (1, 1, 1, 1), 2),
    ((1, 7), (0, 3, 1, 2), 1),
)


def _taps_model():
    """x(2,32,7,9) (two images: rows run on across them) -> Conv 3x3 32->64 +bias ->
    Relu -> Conv 5x3 64->32 -> Conv 3x3 stride 2 -> Conv 1x7 (output 5x4)."""
    rng = np.random.default_rng(9)
    chans = (32, 64, 32, 32, 32)
    nodes, inits, src = [], {}, "x"
    for i, ((kh, kw), pads, stride) in enumerate(_TAP_CONVS):
        w = rng.standard_normal((chans[i + 1], chans[i], kh, kw)) / np.sqrt(chans[i] * kh * kw)
        inits[f"w{i}"] = w.astype(np.float32)
        ins = [src, f"w{i}"] + (["b0"] if i == 0 else [])
        node = helper.make_node("Conv", ins, [f"c{i}"], pads=list(pads), strides=[stride] * 2)
        nodes.append(node)
        src = f"c{i}"
        if i == 0:
            nodes.append(helper.make_node("Relu", ["c0"], ["r0"]))
            src = "r0"
    inits["b0"] = rng.standard_normal(64).astype(np.float32)
    nodes[-1].output[0] = "y"
    return make_model(nodes, {"x": (2, 32, 7, 9)}, {"y": (2, 32, 5, 4)}, inits), inits


def _bf16_conv(x: np.ndarray, w: np.ndarray, pads, s: int) -> np.ndarray:  # noqa: ANN001
    """What the AMX conv computes: bf16 operands, exact products, float64 sums here."""
    top, left, bottom, right = pads
    x = np.pad(_bf16(x).astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    w = _bf16(w).astype(np.float64)
    _, _, kh, kw = w.shape
    oh, ow = (x.shape[2] - kh) // s + 1, (x.shape[3] - kw) // s + 1
    return sum(
        np.einsum(
            "nchw,oc->nohw",
            x[:, :, y : y + s * (oh - 1) + 1 : s, z : z + s * (ow - 1) + 1 : s],
            w[:, :, y, z],
        )
        for y in range(kh)
        for z in range(kw)
    )


def _taps_reference(x: np.ndarray, inits: dict) -> np.ndarray:
    for i, (_, pads, stride) in enumerate(_TAP_CONVS):
        x = _bf16_conv(x, inits[f"w{i}"], pads, stride)
        if i == 0:
            x = np.maximum(x + inits["b0"][None, :, None, None], 0)
    return x


def _taps_error(tmp_path, emulated: bool) -> float:  # noqa: ANN001
    """max |graphopt - bf16 numpy| / max |numpy| of the taps model, every conv on AMX."""
    model, inits = _taps_model()
    art = _compile(model, tmp_path / "taps.so", emulated)
    assert art.manifest["schedule"]["rules"].get("conv_amx") == len(_TAP_CONVS)
    x = art.random_inputs(seed=2)["x"]
    ref = _taps_reference(x, inits)
    return float(np.abs(art.run({"x": x})["y"] - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("emulated", [False, True])
def test_kxk_convs_on_tiles_match_bf16_numpy(tmp_path, emulated):
    """Each tap GEMM computes the conv on bf16 operands with float32 sums: against the
    same on float64 sums, only a few activations round to the other bf16 neighbour
    before the next conv (about 1e-3 of the range after four convs), while a tap read
    from a wrong row or a wrong output row is off by 0.1-1 of it."""
    assert _taps_error(tmp_path, emulated) < 3e-3


def test_kxk_convs_on_an_amx_target_use_tiles():
    """Every conv on tiles; between config and release only tile instructions and
    integer address math (the tap loop), no vector code or calls."""
    asm = _build_asm(_taps_model()[0], SPR)
    assert all(op in asm for op in TILE_OPS) and "vdpbf16ps" not in asm
    regions = re.findall(r"ldtilecfg.*?tilerelease", asm, flags=re.S)
    assert len(regions) == len(_TAP_CONVS)
    for region in regions:
        ops = {line.split()[0] for line in region.splitlines()[1:-1] if line.strip()}
        ops = {op for op in ops if not op.startswith((".", "#"))}
        assert not {op for op in ops if op.startswith(("v", "call"))}, ops
        assert "tdpbf16ps" in ops and "tileloadd" in ops


# --- the tile step's own LLVM IR, its tile instructions done in software --------------------
# Stand-ins for the AMX intrinsics following the SDM's pseudo-code, on a state of 8 tiles x
# 1 KiB and the 64-byte config: runs tile_ll's own IR (config bytes, addresses,
# strides, steps, C load/store) on this CPU; only the instructions themselves are not real.
_SOFTWARE_TILES_LL = """
; Software stand-ins for the AMX intrinsics: state = 8 tiles x 1 KiB, then the 64-byte config.
define internal i64 @emu_rows(ptr %st, i8 %t) {
  %ti = zext i8 %t to i64
  %o = add i64 %ti, 8240
  %p = getelementptr i8, ptr %st, i64 %o
  %r = load i8, ptr %p
  %r64 = zext i8 %r to i64
  ret i64 %r64
}
define internal i64 @emu_colsb(ptr %st, i8 %t) {
  %ti = zext i8 %t to i64
  %t2 = shl i64 %ti, 1
  %o = add i64 %t2, 8208
  %p = getelementptr i8, ptr %st, i64 %o
  %c = load i16, ptr %p, align 1
  %c64 = zext i16 %c to i64
  ret i64 %c64
}
define internal ptr @emu_tile(ptr %st, i8 %t) {
  %ti = zext i8 %t to i64
  %o = shl i64 %ti, 10
  %p = getelementptr i8, ptr %st, i64 %o
  ret ptr %p
}
define internal void @emu_ldtilecfg(ptr %st, ptr %cfg) {
  %dst = getelementptr i8, ptr %st, i64 8192
  call void @llvm.memcpy.p0.p0.i64(ptr %dst, ptr %cfg, i64 64, i1 false)
  ret void
}
define internal void @emu_tilerelease(ptr %st) {
  ret void
}
define internal void @emu_tileloadd64(ptr %st, i8 %t, ptr %p, i64 %stride) {
entry:
  %rows = call i64 @emu_rows(ptr %st, i8 %t)
  %colsb = call i64 @emu_colsb(ptr %st, i8 %t)
  %tile = call ptr @emu_tile(ptr %st, i8 %t)
  br label %loop
loop:
  %r = phi i64 [ 0, %entry ], [ %r1, %loop ]
  %so = mul i64 %r, %stride
  %src = getelementptr i8, ptr %p, i64 %so
  %do = shl i64 %r, 6
  %dst = getelementptr i8, ptr %tile, i64 %do
  call void @llvm.memcpy.p0.p0.i64(ptr %dst, ptr %src, i64 %colsb, i1 false)
  %r1 = add i64 %r, 1
  %more = icmp ult i64 %r1, %rows
  br i1 %more, label %loop, label %done
done:
  ret void
}
define internal void @emu_tilestored64(ptr %st, i8 %t, ptr %p, i64 %stride) {
entry:
  %rows = call i64 @emu_rows(ptr %st, i8 %t)
  %colsb = call i64 @emu_colsb(ptr %st, i8 %t)
  %tile = call ptr @emu_tile(ptr %st, i8 %t)
  br label %loop
loop:
  %r = phi i64 [ 0, %entry ], [ %r1, %loop ]
  %so = mul i64 %r, %stride
  %dst = getelementptr i8, ptr %p, i64 %so
  %do = shl i64 %r, 6
  %src = getelementptr i8, ptr %tile, i64 %do
  call void @llvm.memcpy.p0.p0.i64(ptr %dst, ptr %src, i64 %colsb, i1 false)
  %r1 = add i64 %r, 1
  %more = icmp ult i64 %r1, %rows
  br i1 %more, label %loop, label %done
done:
  ret void
}
define internal float @emu_bf16(ptr %p) {
  %h = load i16, ptr %p, align 1
  %w = zext i16 %h to i32
  %s = shl i32 %w, 16
  %f = bitcast i32 %s to float
  ret float %f
}
; the SDM's pseudo-code: C.row[m].fp32[n] += A.row[m].bf16[2k] * B.row[k].bf16[2n], then the +1 pair
define internal void @emu_tdpbf16ps(ptr %st, i8 %c, i8 %a, i8 %b) {
entry:
  %rows = call i64 @emu_rows(ptr %st, i8 %c)
  %ccols = call i64 @emu_colsb(ptr %st, i8 %c)
  %acols = call i64 @emu_colsb(ptr %st, i8 %a)
  %nn = lshr i64 %ccols, 2
  %kk = lshr i64 %acols, 2
  %tc = call ptr @emu_tile(ptr %st, i8 %c)
  %ta = call ptr @emu_tile(ptr %st, i8 %a)
  %tb = call ptr @emu_tile(ptr %st, i8 %b)
  br label %lm
lm:
  %m = phi i64 [ 0, %entry ], [ %m1, %lm_end ]
  br label %lk
lk:
  %k = phi i64 [ 0, %lm ], [ %k1, %lk_end ]
  br label %ln
ln:
  %n = phi i64 [ 0, %lk ], [ %n1, %ln ]
  %m64 = shl i64 %m, 6
  %k4 = shl i64 %k, 2
  %ao = add i64 %m64, %k4
  %pa0 = getelementptr i8, ptr %ta, i64 %ao
  %pa1 = getelementptr i8, ptr %pa0, i64 2
  %k64 = shl i64 %k, 6
  %n4 = shl i64 %n, 2
  %bo = add i64 %k64, %n4
  %pb0 = getelementptr i8, ptr %tb, i64 %bo
  %pb1 = getelementptr i8, ptr %pb0, i64 2
  %co = add i64 %m64, %n4
  %pc = getelementptr i8, ptr %tc, i64 %co
  %a0 = call float @emu_bf16(ptr %pa0)
  %a1 = call float @emu_bf16(ptr %pa1)
  %b0 = call float @emu_bf16(ptr %pb0)
  %b1 = call float @emu_bf16(ptr %pb1)
  %acc = load float, ptr %pc, align 4
  %p0 = fmul float %a0, %b0
  %s0 = fadd float %acc, %p0
  %p1 = fmul float %a1, %b1
  %s1 = fadd float %s0, %p1
  store float %s1, ptr %pc, align 4
  %n1 = add i64 %n, 1
  %nmore = icmp ult i64 %n1, %nn
  br i1 %nmore, label %ln, label %lk_end
lk_end:
  %k1 = add i64 %k, 1
  %kmore = icmp ult i64 %k1, %kk
  br i1 %kmore, label %lk, label %lm_end
lm_end:
  %m1 = add i64 %m, 1
  %mmore = icmp ult i64 %m1, %rows
  br i1 %mmore, label %lm, label %done
done:
  ret void
}
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)
"""


def _software_tile_ll(ll: str) -> str:
    """``ll`` with each AMX intrinsic call replaced by its stand-in."""

    def call(m: re.Match) -> str:
        name = m.group(1)
        return f"call void @emu_{name}(ptr %emu" + ("" if name == "tilerelease" else ", ")

    ll = ll.replace(
        "alwaysinline {\nentry:\n", "alwaysinline {\nentry:\n  %emu = alloca [8256 x i8]\n"
    )
    ll = re.sub(
        r"call void @llvm\.x86\.(ldtilecfg|tileloadd64|tdpbf16ps|tilestored64|tilerelease)\(",
        call,
        ll,
    )
    ll = re.sub(r"^declare void @llvm\.x86\..*$", "", ll, flags=re.M)
    # the tile state granted (Linux refuses it here: the kernel would skip the tiles)
    ll, asked = re.subn(
        r'call i64 asm sideeffect "syscall",\s*"[^"]*"\([^)]*\)', "add i64 0, 0", ll
    )
    assert asked == 1
    return ll + _SOFTWARE_TILES_LL


def _software_tile_error(monkeypatch, shape: tuple, broken=None) -> float:  # noqa: ANN001
    real = _amx.tile_ll

    def software(mt: int, nt: int) -> str:
        ll = real(mt, nt)
        return _software_tile_ll(broken(ll) if broken else ll)

    monkeypatch.setattr(_amx, "tile_ll", software)
    lib = _amx.build_matmul(tvm.target.Target(HOST_AMX), shape)
    asm = _asm(lib)
    assert not any(op in asm for op in TILE_OPS)  # all in software
    m, k, n = shape
    rng = np.random.default_rng(k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    return float(np.abs(_amx.run_matmul(lib, x, w) - _bf16(x) @ _bf16(w)).max())


# tiles per call: 1x1, 2x2, 2x1, 1x2
@pytest.mark.parametrize("shape", [(48, 96, 80), (32, 256, 32), (64, 64, 48), (16, 64, 64)])
def test_tile_step_ir_with_software_tiles_matches_numpy(monkeypatch, shape):
    assert _software_tile_error(monkeypatch, shape) < 1e-4


@pytest.mark.parametrize(
    ("wrong", "right"),
    [
        ("%bo = shl i64 %u, 10", "%bo = shl i64 %u, 9"),
        ("%bblk1 = mul i64 %ldb, 1", "%bblk1 = mul i64 %ldb, 0"),
    ],
)
def test_software_tiles_catch_a_wrong_address(monkeypatch, wrong, right):
    """The check above can fail: B advanced 512 bytes a step instead of 1 KiB; the
    second column block read from the first's place."""

    def broken(ll: str) -> str:
        assert wrong in ll
        return ll.replace(wrong, right)

    assert _software_tile_error(monkeypatch, (32, 256, 32), broken) > 1e-2


@pytest.mark.parametrize(
    ("broken", "worse"),
    [
        (None, None),
        # every tap read from its phase's first row of taps: only the x offsets move A
        ("%tyw = mul i64 %qy, %wq", "%tyw = mul i64 %qy, 0"),
        # the stride-2 conv's taps all read the first phase map
        ("%prows = mul i64 %phase, %prow", "%prows = mul i64 %phase, 0"),
        # each tap's B steps from the first tap's place
        ("%u0 = mul i64 %t, %steps", "%u0 = mul i64 %t, 0"),
    ],
)
def test_conv_tile_step_ir_with_software_tiles(monkeypatch, tmp_path, broken, worse):
    """The conv's tap loop in tile_ll's IR (A row offsets per tap, B steps across taps)
    run with software tile instructions: right, and caught when an address is wrong."""
    real = _amx.tile_ll

    def software(mt: int, nt: int) -> str:
        ll = real(mt, nt)
        if broken:
            assert broken in ll
            ll = ll.replace(broken, worse)
        return _software_tile_ll(ll)

    monkeypatch.setattr(_amx, "tile_ll", software)
    if broken is None:
        assert _taps_error(tmp_path, emulated=False) < 3e-3
    else:  # compile's verification refuses the artifact
        with pytest.raises(VerificationError, match="disagrees with onnxruntime"):
            _taps_error(tmp_path, emulated=False)


# --- when AMX is on: the probe and the switches -------------------------------------------
def test_amx_off_by_environment_or_missing_feature(monkeypatch):
    assert _amx.target_has_amx(tvm.target.Target(SPR))
    assert not _amx.target_has_amx(tvm.target.Target({**SPR, "mcpu": "cooperlake"}))
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    assert not _amx.amx_enabled(tvm.target.Target(SPR))


def test_host_has_amx_reads_the_flags_line(tmp_path):
    without, with_amx = tmp_path / "without", tmp_path / "with"
    without.write_text("model name\t: amx_bf16 lookalike\nflags\t\t: fpu avx512f amx_tile\n")
    assert not _amx.host_has_amx(without)
    with_amx.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    assert _amx.host_has_amx(with_amx)
    assert not _amx.host_has_amx(tmp_path / "missing")


@no_amx_here
def test_probe_on_a_cpu_without_amx_says_no_and_cross_compiles_skip_verification(capsys):
    assert _amx.amx_probe() is False
    assert capsys.readouterr().err == ""  # no AMX is not a failure: no warning
    assert _amx.amx_enabled(tvm.target.Target(SPR))  # built here: a cross-compile, no probe


@no_amx_here
def test_the_real_probe_here_is_refused_the_tile_state():
    ok, why = _amx.run_probe()
    assert not ok and "Linux refused the AMX tile state" in why, why


def test_probe_child_killed_by_sigill_reports_failure():
    """A probe child dying of SIGILL (as a tile instruction without AMX would) is a
    failure reported in words; this process lives on."""
    ok, why = _amx.run_probe(env={**os.environ, "GRAPHOPT_AMX_PROBE_FAIL": "sigill"})
    assert not ok and why == "killed by signal 4", why


@no_amx_here
def test_probe_refused_in_this_process_warns_without_a_child(monkeypatch, capsys):
    monkeypatch.setattr(_amx, "host_has_amx", lambda: True)  # cpuinfo says AMX; Linux no
    monkeypatch.setattr(_amx, "run_probe", lambda: pytest.fail("no child needed"))
    assert not _amx.amx_probe()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused the AMX tile state" in err[0]


def test_failing_probe_warns_once_and_falls_back(monkeypatch, capsys):
    monkeypatch.setattr(_amx, "host_has_amx", lambda: True)  # as on an AMX machine
    monkeypatch.setattr(_amx, "request_tile_state", lambda: None)
    monkeypatch.setenv("GRAPHOPT_AMX_PROBE_FAIL", "1")
    target = tvm.target.Target(SPR)
    assert not _amx.amx_enabled(target)
    assert not _amx.amx_enabled(target)  # probed once per process
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AMX probe failed" in err[0] and "forced failure" in err[0]
    asm = _build_asm(_gemm_model(32, 64, 48), SPR)  # falls back to AVX512-BF16
    assert "tdpbf16ps" not in asm and "vdpbf16ps" in asm


def test_probe_kernels_pass_with_software_tiles(monkeypatch):
    """The probe's kernels (every tile block, several threads, the convs' tap loops) on
    the real IR with software tile instructions: what the probe runs on an AMX machine."""
    real = _amx.tile_ll
    monkeypatch.setattr(_amx, "tile_ll", lambda mt, nt: _software_tile_ll(real(mt, nt)))
    _amx.check_kernels(tvm.target.Target(HOST_AMX))


def test_probe_catches_a_broken_tap_loop(monkeypatch):
    """A conv tile step that reads every tap across phase maps from the first phase: the
    matmuls pass, the stride-2 probe conv fails (so an AMX host falls back)."""
    real = _amx.tile_ll

    def broken(mt: int, nt: int) -> str:
        ll = real(mt, nt).replace("%prows = mul i64 %phase, %prow", "%prows = mul i64 0, %prow")
        return _software_tile_ll(ll)

    monkeypatch.setattr(_amx, "tile_ll", broken)
    with pytest.raises(SystemExit, match="AMX 3x3 conv, stride 2, differs"):
        _amx.check_kernels(tvm.target.Target(HOST_AMX))


def test_real_tile_kernels_run_correctly_here():
    """The real kernels, tile instructions and all, run in this process: where Linux
    refuses the tile state (no AMX here) each block takes the same sums without tiles;
    on an AMX machine this runs tdpbf16ps."""
    assert all(
        op in _asm(_amx.build_matmul(tvm.target.Target(HOST_AMX), (32, 64, 32))) for op in TILE_OPS
    )
    _amx.check_kernels(tvm.target.Target(HOST_AMX))
