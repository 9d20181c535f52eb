"""Layouts at the Relax level (graphopt/targets/_layout.py): the per-target tables, the
NHWC conversion (conv attributes, transforms left only at the graph's edges, weights
transformed at compile time), transpose cancellation, the cases where nothing may
change, and numerics of x86 compiles in each layout against onnxruntime."""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")
import tvm_ffi  # noqa: E402

import graphopt  # noqa: E402
from graphopt.errors import TargetError  # noqa: E402
from graphopt.lower import to_relax  # noqa: E402
from graphopt.prepare import prepare  # noqa: E402
from graphopt.targets import TARGETS, _layout, check_layout, cuda, resolve  # noqa: E402
from tests.conftest import make_model, zoo_model  # noqa: E402

relax = tvm.relax
_TRANSFORM_OPS = ("relax.permute_dims", "relax.layout_transform")
CUDA = {"kind": "cuda", "arch": "sm_80"}  # the pass lists need no nvcc


def _target(name: str):  # noqa: ANN202
    return tvm.target.Target(CUDA if name == "cuda" else resolve(name).tvm)


def _through(model, target_name: str, layout: str | None, phase_names) -> tvm.IRModule:  # noqa: ANN001
    """``model`` lowered, then through the named phases of the target in ``layout``."""
    target = _target(target_name)
    phases = TARGETS[target_name].phases(target, layout, ())
    mod = to_relax(prepare(model)[1])
    with target:
        for name in phase_names:
            mod = tvm.transform.Sequential(phases[name])(mod)
    return mod


def _calls(mod: tvm.IRModule, op_name: str) -> list:
    found = []

    def visit(expr) -> None:  # noqa: ANN001
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == op_name:
            found.append(expr)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _runtime_transforms(mod: tvm.IRModule) -> list[relax.Call]:
    """The permute_dims/layout_transform calls left to run per inference: those whose
    input does not derive from constants alone (weight and bias transforms do; the
    FoldConstant after LegalizeOps turns them into constants)."""
    folded: set = set()
    left = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            if all(v in folded for v in relax.analysis.free_vars(value)):
                folded.add(binding.var)
            elif getattr(value.op, "name", "") in _TRANSFORM_OPS:
                left.append(value)
    return left


# --- the tables -----------------------------------------------------------------------------
def test_every_target_lists_its_layouts_default_first() -> None:
    expected = {"x86": "nchwc", "arm": "nhwc", "cuda": "nhwc"}
    for name, target in TARGETS.items():
        assert target.default_layout == next(iter(target.layouts)) == expected[name]
        assert set(target.layouts) <= set(_layout.LAYOUT_NAMES)
        assert "nchw" in target.layouts and "nhwc" in target.layouts
    assert "nchwc" not in cuda.LAYOUTS


def test_check_layout_refuses_unknown_and_unsupported_names() -> None:
    spec = resolve("x86")
    assert check_layout(spec, None) == "nchwc"
    assert check_layout(spec, "NHWC") == "nhwc"
    with pytest.raises(TargetError, match="unknown layout 'nwhc'.*nchw, nchwc, nhwc"):
        check_layout(spec, "nwhc")
    cuda_spec = resolve({"kind": "cuda", "arch": "sm_80"}) if cuda.nvcc_path() else None
    if cuda_spec is not None:
        with pytest.raises(TargetError, match="target cuda does not support layout 'nchwc'"):
            check_layout(cuda_spec, "nchwc")


# --- structure after the layout phase ---------------------------------------------------
@pytest.mark.parametrize(
    ("target", "kernel"), [("x86", r"OHWI(16|8)o"), ("arm", r"OHWI4o"), ("cuda", r"OHWI")]
)
def test_nhwc_moves_convs_and_pools(target: str, kernel: str) -> None:
    mod = _through(zoo_model("small_cnn"), target, "nhwc", ["layout"])
    convs = _calls(mod, "relax.nn.conv2d")
    assert len(convs) == 4
    for conv in convs:
        a = conv.attrs
        assert (a.data_layout, a.out_layout) == ("NHWC", "NHWC")
        assert re.fullmatch(kernel, str(a.kernel_layout))
    pools = _calls(mod, "relax.nn.max_pool2d") + _calls(mod, "relax.nn.avg_pool2d")
    assert len(pools) == 2 and {p.attrs.layout for p in pools} == {"NHWC"}


def test_depthwise_weights_are_blocked_too() -> None:
    mod = _through(zoo_model("conv_variants"), "x86", "nhwc", ["layout"])
    kinds = {
        int(c.attrs.groups): str(c.attrs.kernel_layout) for c in _calls(mod, "relax.nn.conv2d")
    }
    assert re.fullmatch(r"OHWI\d+o", kinds[8])  # depthwise: 8 groups of one channel
    assert kinds[4] == "OHWI"  # grouped, 2 channels per group: plain OHWI, TOPI's conv
    assert re.fullmatch(r"OHWI\d+o", kinds[1])


@pytest.mark.parametrize(
    ("target", "layout", "edges"),
    [("x86", "nhwc", 2), ("x86", "nchwc", 2), ("cuda", "nhwc", 2)],
)
@pytest.mark.parametrize("model", ["resnet18", "mobilenetv2"])
def test_transforms_left_only_at_the_edges(model: str, target: str, layout: str, edges: int):
    """ConvertLayout carries the layout through BN-folded adds, ReLU/ReLU6, residual adds,
    max pool and the global mean: what is left is the input's transform and the one
    before the flatten (the classifier's reshape needs NCHW order)."""
    mod = _through(zoo_model(model), target, layout, ["layout"])
    left = _runtime_transforms(mod)
    assert len(left) == edges, [str(c) for c in left]
    if edges:
        assert left[0].args[0].same_as(mod["main"].params[0])  # the model input, transformed once


def test_weights_are_transformed_at_compile_time() -> None:
    """The 5-D OHWI[x]o weights reach main as constants: FoldConstant ran their layout
    transforms during the compile, so no kernel transforms a weight per inference."""
    mod = _through(zoo_model("small_cnn"), "x86", "nhwc", ["layout", "legalize"])
    const_type = type(relax.const(np.zeros(1, np.float32)))
    blocked = []

    def visit(expr) -> None:  # noqa: ANN001
        shape = getattr(expr.ty, "shape", None) if isinstance(expr, const_type) else None
        if shape is not None and len(shape.values) == 5:
            blocked.append(tuple(int(d) for d in shape.values))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    assert len(blocked) == 4  # one per conv
    kernels = [gv.name_hint for gv in mod.get_global_vars() if "transpose" in gv.name_hint]
    assert len(kernels) == 2  # the input's, and before the flatten (fused with the reshape)


# --- where nothing may change -----------------------------------------------------------
def _conv1d_model():  # noqa: ANN202
    w = np.random.default_rng(0).standard_normal((6, 4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return make_model(nodes, {"x": (1, 4, 20)}, {"y": (1, 6, 20)}, {"w": w})


def _no_conv_model():  # noqa: ANN202
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    return make_model(nodes, {"x": (1, 4, 8, 8)}, {"y": (1, 4, 4, 4)})


@pytest.mark.parametrize("model", [_conv1d_model, _no_conv_model])
@pytest.mark.parametrize("target", ["x86", "cuda"])
def test_nhwc_does_not_fire_without_a_2d_conv(model, target: str) -> None:  # noqa: ANN001
    """Negative: a conv1d, or no conv at all (a pool follows its input's layout, it does
    not choose one): the module leaves the layout phase as it came in."""
    proto = model()
    before = to_relax(prepare(proto)[1])
    after = _through(proto, target, "nhwc", ["layout"])
    assert tvm_ffi.structural_equal(before, after)


def test_conv1d_compiles_in_nhwc() -> None:
    graphopt.compile(_conv1d_model(), "x86", layout="nhwc")  # verifies against onnxruntime


# --- transposes cancelled ----------------------------------------------------------------
def _nhwc_input_model():  # noqa: ANN202
    """An NHWC model as TF exporters write it: transpose in, conv, transpose out."""
    w = np.random.default_rng(1).standard_normal((8, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1]),
    ]
    return make_model(nodes, {"x": (1, 10, 10, 4)}, {"y": (1, 10, 10, 8)}, {"w": w})


def test_the_models_own_transposes_cancel_with_the_conversion() -> None:
    model = _nhwc_input_model()
    assert len(_runtime_transforms(_through(model, "x86", "nchw", ["layout"]))) == 2
    assert _runtime_transforms(_through(model, "x86", "nhwc", ["layout"])) == []
    graphopt.compile(model, "x86", layout="nhwc")  # verifies against onnxruntime


def test_cancel_transposes_keeps_a_real_permutation() -> None:
    """Negative: composing [0, 2, 3, 1] after [0, 2, 3, 1] is not the identity."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 2, 3, 4], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
            b = bb.emit_output(relax.op.permute_dims(a, [0, 2, 3, 1]))
        bb.emit_func_output(b)
    mod = _layout.CancelTransposes()(bb.get())
    (left,) = _calls(mod, "relax.permute_dims")
    assert [int(i) for i in left.attrs.axes] == [0, 3, 1, 2]
    assert left.args[0].same_as(mod["main"].params[0])


# --- numerics: x86 in each layout against onnxruntime -------------------------------------
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("name", ["small_cnn", "conv_variants", "pool_variants", "mlp_head"])
def test_zoo_matches_onnxruntime_in_each_layout(name: str, layout: str) -> None:
    art = graphopt.compile(zoo_model(name), "x86", layout=layout)  # verifies
    assert art.manifest["verification"]["ok"]
    assert art.manifest["target"]["layout"] == layout


def test_mobilenetv2_nhwc_matches_onnxruntime() -> None:
    """The one bigger model: depthwise and pointwise convs, ReLU6, residual adds."""
    art = graphopt.compile(zoo_model("mobilenetv2"), "x86", layout="nhwc")
    assert art.manifest["verification"]["ok"]
