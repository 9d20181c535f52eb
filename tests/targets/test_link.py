"""Kernels built and written on every core (graphopt/targets/_link.py): the split deals
each kernel to exactly one part, and a model built in parts is one library whose numbers
match onnxruntime, on x86 and on ARM under qemu (slow tier)."""

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from tvm import relax, topi

import graphopt
from graphopt.targets import _link
from tests._system import CROSS_GXX, QEMU
from tests.conftest import zoo_model


def _tir_module(kernels: int) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([8], "float32"))
    with bb.function("main", [x]):
        y = x
        for i in range(kernels):
            y = bb.emit_te(lambda a, i=i: topi.add(a, float(i)), y, primfunc_name_hint=f"k{i}")
        bb.emit_func_output(y)
    mod = bb.get()
    return tvm.IRModule(
        {g: f for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    )


@pytest.mark.parametrize(
    "kernels,parts,expected", [(40, 2, 2), (100, 3, 3), (20, 2, 1), (40, 1, 1)]
)
def test_split_deals_every_kernel_to_one_part(kernels, parts, expected):
    """Round-robin by name; fewer than _MIN_KERNELS_PER_PART kernels a part: fewer parts."""
    mod = _tir_module(kernels)
    got = _link.split(mod, parts)
    assert len(got) == expected
    names = [g.name_hint for m in got for g in m.get_global_vars()]
    assert sorted(names) == sorted(g.name_hint for g in mod.get_global_vars())
    sizes = [len(m.get_global_vars()) for m in got]
    assert max(sizes) - min(sizes) <= 1


def _compile_in_parts(monkeypatch, target: str, path, parts: int = 3):
    """Compile the zoo's conv_variants with its kernels built in ``parts`` LLVM modules."""
    monkeypatch.setattr(_link, "workers", lambda: parts)
    monkeypatch.setattr(_link, "_MIN_KERNELS_PER_PART", 1)
    built = []
    split = _link.split
    monkeypatch.setattr(_link, "split", lambda m, n: built.append(split(m, n)) or built[-1])
    model = zoo_model("conv_variants")
    art = graphopt.compile(model, target, path)
    assert len(built) == 1 and len(built[0]) == parts
    return art, model


def _check_against_onnxruntime(art, model) -> None:
    inputs = art.random_inputs(seed=3)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = model.graph.output[0].name
    np.testing.assert_allclose(
        art.run(inputs)[name], ref.run(None, inputs)[0], rtol=1e-3, atol=1e-3
    )


def test_model_built_in_parts_is_one_library_that_matches_onnxruntime(monkeypatch, tmp_path):
    art, model = _compile_in_parts(monkeypatch, "x86", tmp_path / "m.so")
    assert art.manifest["verification"]["ok"]
    # a fresh load of the one file finds every kernel
    _check_against_onnxruntime(graphopt.load(tmp_path / "m.so"), model)


@pytest.mark.slow
@CROSS_GXX
@QEMU
def test_arm_model_built_in_parts_runs_under_emulation(monkeypatch, tmp_path):
    art, model = _compile_in_parts(monkeypatch, "arm", tmp_path / "arm.so", parts=2)
    assert art.emulated and art.manifest["verification"]["ok"]
    _check_against_onnxruntime(art, model)


def test_profile_times_every_kernel_of_a_model_built_in_parts(monkeypatch):
    """``graphopt profile`` calls each kernel from the built library: kernels of the second
    part are found through the first's imports."""
    monkeypatch.setattr(_link, "workers", lambda: 2)
    monkeypatch.setattr(_link, "_MIN_KERNELS_PER_PART", 1)
    report = graphopt.profile(zoo_model("conv_variants"), "x86", repeat=2)
    assert len(report.rows) >= 4
    assert all(r.seconds_per_call > 0 for r in report.rows)
