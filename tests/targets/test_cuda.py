"""The CUDA target: compiles without a GPU (nvcc only), runs where one is present.

Default tier (no GPU needed): the small zoo models compile for sm_80 in the default NHWC
layout (every kernel bound to GPU threads, or the compile fails) and each artifact holds
SASS and PTX for sm_80 and no CUDA source (ResNet-18 and MobileNetV2, 16 s each on a
2-core machine, in the slow tier); sm_90 and plain NCHW for one model each; bad
archs, a missing nvcc, loading without a GPU and unscheduled kernels fail with one clear
line; the conv schedule rule fits the convs dlight's Matmul leaves, in both layouts, and
matches the unscheduled kernel numerically (thread loops run serially on the CPU).
``-m gpu``: every zoo model runs on the GPU and matches onnxruntime.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphopt
from graphopt import targets, zoo
from graphopt.errors import ArtifactError, TargetError
from graphopt.targets import TargetSpec, cuda
from tests.conftest import zoo_model

needs_nvcc = pytest.mark.skipif(cuda.nvcc_path() is None, reason="needs nvcc (CUDA toolkit)")


def _has_gpu() -> bool:
    return cuda.local_arch() is not None


@pytest.fixture(scope="module", autouse=True)
def cuda_registered():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(targets.TARGETS, "cuda", cuda.TARGET)
        yield


def _compile(
    name: str, arch: str, out, verify: bool = False, layout: str | None = None
) -> graphopt.Artifact:
    spec = TargetSpec("cuda", cuda.tvm_target(arch=arch))
    return graphopt.compile(zoo_model(name), spec, out, verify=verify, layout=layout)


# The zoo models whose sm_80 compile runs in the slow tier: 31 of the 42 seconds that the
# whole zoo took on a 2-core Zen 3, and no op or kernel kind the small models lack.
_SLOW_SM80 = ("resnet18", "mobilenetv2")


@pytest.fixture(scope="module")
def sm80(tmp_path_factory, cuda_registered):
    """A function of a zoo model's name: its sm_80 artifact, compiled once per module."""
    if cuda.nvcc_path() is None:
        pytest.skip("needs nvcc (CUDA toolkit)")
    out = tmp_path_factory.mktemp("cuda-sm80")
    return functools.cache(lambda name: _compile(name, "sm_80", out / f"{name}.so"))


def _device_code(path) -> tuple[set, bytes]:
    data = path.read_bytes()
    return set(cuda.fatbin_entries(data)), data


@needs_nvcc
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow if n in _SLOW_SM80 else ()) for n in zoo.ZOO]
)
def test_zoo_compiles_with_device_code_for_sm80(sm80, name):
    artifact = sm80(name)
    entries, data = _device_code(artifact.path)
    assert entries == {("sass", "sm_80"), ("ptx", "sm_80")}
    assert b".target sm_80" in data  # the PTX, uncompressed
    assert b'extern "C" __global__' not in data  # compiled, no source left to JIT
    target = artifact.manifest["target"]
    assert (target["name"], target["tvm"]) == ("cuda", {"kind": "cuda", "arch": "sm_80"})
    assert target["layout"] == "nhwc"
    assert "TVM_COMPILE_FORCE_FALLBACK" not in os.environ  # restored after the compile


@needs_nvcc
def test_plain_nchw_layout(tmp_path):
    artifact = _compile("conv_variants", "sm_80", tmp_path / "nchw.so", layout="nchw")
    assert artifact.manifest["target"]["layout"] == "nchw"
    assert set(cuda.fatbin_entries(artifact.path.read_bytes())) == {
        ("sass", "sm_80"),
        ("ptx", "sm_80"),
    }


@needs_nvcc
def test_second_arch(tmp_path):
    artifact = _compile("small_cnn", "sm_90", tmp_path / "small_cnn.so")
    entries, data = _device_code(artifact.path)
    assert entries == {("sass", "sm_90"), ("ptx", "sm_90")}
    assert b".target sm_90" in data and b".target sm_80" not in data


_LOADER_PROBE = textwrap.dedent(
    """
    import struct, sys
    import tvm, tvm_ffi

    def field(b, o):
        n = struct.unpack_from("<Q", b, o)[0]
        return b[o + 8 : o + 8 + n], o + 8 + n

    seen = {}

    # What the CUDA runtime's loader would be handed, parsed as it parses it.
    @tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda", override=True)
    def probe(data):
        b = bytes(data)
        fmt, o = field(b, 0)
        (count,) = struct.unpack_from("<Q", b, o)
        o += 8
        for _ in range(count):  # name -> FunctionInfo(name, arg types, tags, extra tags)
            _, o = field(b, o)
            _, o = field(b, o)
            (n,) = struct.unpack_from("<Q", b, o)
            o += 8 + 4 * n
            (n,) = struct.unpack_from("<Q", b, o)
            o += 8
            for _ in range(n):
                _, o = field(b, o)
            (n,) = struct.unpack_from("<Q", b, o)
            o += 8 + 4 * n
        code, o = field(b, o)
        seen.update(fmt=fmt.decode(), kernels=count, magic=code[:4].hex(), rest=len(b) - o)
        raise RuntimeError("probe done")

    try:
        tvm.runtime.load_module(sys.argv[1])
    except Exception:
        pass
    print(seen)
    """
)


@needs_nvcc
def test_packed_module_parses_as_the_cuda_loader_reads_it(sm80):
    if _has_gpu():
        pytest.skip("the probe replaces the CUDA loader; the gpu tier loads for real")
    path = sm80("small_cnn").path
    out = subprocess.run(
        [sys.executable, "-c", _LOADER_PROBE, str(path)], capture_output=True, text=True
    )
    seen = eval(out.stdout.strip().splitlines()[-1])  # a dict literal printed by the probe
    assert seen["fmt"] == "fatbin"
    assert seen["kernels"] > 0
    assert seen["magic"] == "50ed55ba"  # fatbin header, little-endian 0xBA55ED50
    assert seen["rest"] == 0


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_42", "sm_999", "ampere", "80"])
def test_unknown_arch_is_a_target_error(arch):
    with pytest.raises(TargetError, match="CUDA arch|nvcc does not know") as info:
        cuda.tvm_target(arch=arch)
    assert "\n" not in str(info.value)
    with pytest.raises(TargetError):
        cuda.check_tvm_dict({"kind": "cuda", "arch": arch})


@needs_nvcc
def test_target_dicts():
    if not _has_gpu():
        assert cuda.tvm_target() == {"kind": "cuda", "arch": cuda.DEFAULT_ARCH}
    assert cuda.accepts({"kind": "cuda", "arch": "sm_80"})
    assert not cuda.accepts({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    assert cuda.check_tvm_dict({"kind": "cuda", "arch": "sm_90"})["arch"] == "sm_90"
    assert targets.resolve({"kind": "cuda", "arch": "sm_86"}).name == "cuda"


def test_missing_nvcc_names_the_toolkit(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda, "nvcc_path", lambda: None)
    with pytest.raises(TargetError, match="CUDA toolkit"):
        cuda.tvm_target(arch="sm_80")
    with pytest.raises(TargetError, match="CUDA toolkit"):
        cuda.export(object(), tmp_path / "never.so")


@needs_nvcc
def test_load_without_gpu_is_an_artifact_error(sm80):
    if _has_gpu():
        pytest.skip("this machine has a CUDA GPU")
    artifact = graphopt.load(sm80("small_cnn").path)
    with pytest.raises(
        ArtifactError, match=r"is a CUDA artifact \(sm_80\) and this machine has no"
    ):
        artifact.run(artifact.random_inputs())


# ---- schedules -------------------------------------------------------------------


def _fused_kernels(name: str, layout: str | None = None):
    """The model's PrimFuncs as the schedule phase sees them."""
    import tvm

    from graphopt.lower import to_relax
    from graphopt.prepare import prepare

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    phases = cuda.phases(target, layout=layout)
    mod = to_relax(prepare(zoo_model(name))[1])
    before = ("library_dispatch", "layout", "legalize")
    with target:
        mod = tvm.transform.Sequential([p for n in before for p in phases[n]])(mod)
    return mod, target, phases


def test_unscheduled_kernel_is_an_error_naming_it():
    from graphopt.targets import _gpu_schedules as gpu

    mod, target, _ = _fused_kernels("small_cnn")
    unbound = r"no CUDA schedule rule fits kernel\(s\) avg_pool2d, fused_conv2d1_add_relu, "
    with target, pytest.raises(TargetError, match=unbound):
        gpu.RequireThreadBinding()(mod)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("name", ["conv_variants", "pool_variants"])
def test_schedule_phase_binds_every_kernel(name, layout):
    import tvm

    from graphopt.targets import _gpu_schedules as gpu

    mod, target, phases = _fused_kernels(name, layout)
    with target:
        mod = tvm.transform.Sequential(phases["schedule"])(mod)
    assert gpu.unbound_kernels(mod) == []


def _conv_kernels(mod):
    return [gv.name_hint for gv, f in mod.functions_items() if "conv2d" in gv.name_hint]


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_conv_rule_fits_grouped_and_depthwise_convs_only(layout):
    from tvm.s_tir import dlight as dl

    from graphopt.targets._gpu_schedules import Conv2dDirect

    mod, target, _ = _fused_kernels("conv_variants", layout)
    claimed = {
        n for n in _conv_kernels(mod) if dl.gpu.Matmul().apply(mod[n], target, False) is None
    }
    assert claimed  # the grouped and depthwise convs, which Matmul declines
    for name in claimed:
        assert Conv2dDirect().apply(mod[name], target, False) is not None, name
    for name in ("concatenate", "mean"):  # not convolutions: the rule declines
        assert Conv2dDirect().apply(mod[name], target, False) is None


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize(
    "model, kernel",
    [
        ("mobilenetv2", "fused_conv2d1_add_maximum_minimum"),  # depthwise, 112 wide: rows of 4
        ("conv_variants", "fused_conv2d_add"),  # 2 channels per group, 17 wide: rows of 1
        ("pool_variants", "max_pool2d"),  # 3x3 stride 2, ceil mode: 7 wide, rows of 1
    ],
)
def test_conv_rule_matches_the_unscheduled_kernel(model, kernel, layout):
    """Each thread of the schedule is independent (no shared memory, no barriers), so
    its thread loops may run serially; on the CPU it must compute what the TE did."""
    import tvm

    from graphopt.targets._gpu_schedules import Conv2dDirect

    mod, target, _ = _fused_kernels(model, layout)
    func = mod[kernel]
    sch = Conv2dDirect().apply(func, target, False)
    serial = re.sub(r'T\.thread_binding\(([^,]+), thread="[^"]+"', r"T.serial(\1", sch.mod.script())
    scheduled = tvm.script.from_source(serial)["main"]

    def run(f):
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), "llvm")
        rng = np.random.default_rng(0)
        args = [
            tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.shape]).astype("float32"))
            for p in f.params
        ]
        lib["main"](*args)
        return args[-1].numpy()

    np.testing.assert_allclose(run(scheduled), run(func), rtol=1e-5, atol=1e-5)


# ---- on a GPU (-m gpu) -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_runs_on_the_gpu_and_matches_onnxruntime(tmp_path, name):
    if not _has_gpu():
        pytest.skip("no CUDA GPU on this machine")
    artifact = _compile(name, cuda.local_arch(), tmp_path / f"{name}.so", verify=True)
    assert artifact.manifest["verification"]["ok"], artifact.manifest["verification"]
    again = graphopt.load(artifact.path)
    inputs = again.random_inputs(seed=1)
    first = again.run(inputs)
    assert all(np.isfinite(v).all() for v in first.values())
    assert again.benchmark(inputs, repeat=3)["median_ms"] > 0
