"""NHWC convs on CPUs (graphopt/targets/_cpu_nhwc.py): every kernel of every zoo model
scheduled in the nhwc layout (x86 and ARM pipelines), the conv rule's register tile, the
rule declining what is not its own, and numerics against the unscheduled TE and
onnxruntime. Whole-model numerics per layout are in test_layout.py."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.targets import _cpu_nhwc as nhwc  # noqa: E402
from graphopt.targets import _cpu_schedules as cpu  # noqa: E402
from graphopt.targets import resolve  # noqa: E402
from graphopt.zoo import ZOO  # noqa: E402
from tests.targets.test_cpu_schedules import (  # noqa: E402
    _grouped_conv_model,
    _loops,
    _rules_used,
    _scheduled_module,
    _zoo_scheduled,
    unscheduled_kernels,
)


@pytest.mark.parametrize("name", list(ZOO))
def test_every_kernel_is_scheduled_in_nhwc(name: str) -> None:
    assert unscheduled_kernels(_zoo_scheduled(name, layout="nhwc")) == []


@pytest.mark.parametrize("name", ["small_cnn", "conv_variants", "pool_variants"])
def test_every_kernel_is_scheduled_on_arm_and_in_plain_nchw(name: str) -> None:
    """ARM's default (nhwc, 4-lane NEON blocks) and x86's plain NCHW."""
    assert unscheduled_kernels(_zoo_scheduled(name, "arm", "nhwc")) == []
    assert unscheduled_kernels(_zoo_scheduled(name, "x86", "nchw")) == []


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_every_cnn_conv_takes_the_nhwc_rule(name: str) -> None:
    """ResNet-18's convs (3x3, strided, 1x1, the 7x7 stem) and MobileNetV2's dense and
    depthwise convs all get the register-tile rule."""
    rules = _rules_used(_zoo_scheduled(name, layout="nhwc"))
    convs = {k: v for k, v in rules.items() if "conv2d" in k}
    assert len(convs) >= 10  # identical kernels are one PrimFunc
    depthwise = {k for k in convs if k.startswith("fused_depthwise_conv2d_nhwc")}
    assert bool(depthwise) == (name == "mobilenetv2")
    assert {convs[k] for k in depthwise} <= {"depthwise_nhwc"}
    assert {v for k, v in convs.items() if k not in depthwise} == {"conv2d_nhwc"}


def test_register_tile_shape() -> None:
    """A 3x3 conv 64->64 on 56x56: the output tile is reg_n pixels (unrolled) by one
    SIMD-wide channel block (vectorized), inside a parallel loop; reg_n accumulators
    plus spares fit the register file."""
    target = tvm.target.Target(resolve("x86").tvm)
    lanes = cpu.vector_lanes(target)
    data = tvm.te.placeholder((1, 56, 56, 64), name="data")
    weight = tvm.te.placeholder((64 // lanes, 3, 3, 64, lanes), name="weight")
    out = nhwc.conv2d_nhwc_te(data, weight, [1, 1], [1, 1, 1, 1], [1, 1], "float32")
    func = tvm.te.create_prim_func([data, weight, out])
    with target:
        name, new = cpu.apply_rules(func, target, [nhwc.RULE, *cpu.RULES])
    assert name == "conv2d_nhwc"
    loops = _loops(new)
    kinds = {k for k, _ in loops}
    assert tvm.tirx.ForKind.PARALLEL in kinds
    assert (tvm.tirx.ForKind.VECTORIZED, lanes) in loops
    unrolled = [e for k, e in loops if k == tvm.tirx.ForKind.UNROLLED]
    reg_n = max(unrolled)
    assert 56 % reg_n == 0 and 4 <= reg_n <= cpu.max_reg_n(target)


def _run(func: tvm.tirx.PrimFunc, target) -> np.ndarray:  # noqa: ANN001
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    rng = np.random.default_rng(0)
    args = [
        tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.shape]).astype("float32"))
        for p in func.params
    ]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("depthwise", [False, True])
def test_scheduled_conv_matches_the_unscheduled_te(depthwise: bool) -> None:
    """Strided, dilated, asymmetric padding, an odd width: the schedule computes what the
    TE says (the TE itself is checked against onnxruntime by the model tests)."""
    target = tvm.target.Target(resolve("x86").tvm)
    channels, block = 24, 8
    data = tvm.te.placeholder((1, 19, 13, channels), name="data")
    if depthwise:
        weight = tvm.te.placeholder((channels // block, 3, 3, 1, block), name="weight")
        compute = nhwc.depthwise_conv2d_nhwc_te
    else:
        weight = tvm.te.placeholder((channels // block, 3, 3, channels, block), name="weight")
        compute = nhwc.conv2d_nhwc_te
    out = compute(data, weight, [2, 1], [1, 2, 0, 1], [1, 2], "float32")
    func = tvm.te.create_prim_func([data, weight, out])
    with target:
        sch = nhwc.rule_conv2d_nhwc(func, target)
    assert sch is not None
    np.testing.assert_allclose(_run(sch.mod["main"], target), _run(func, target), rtol=1e-5)


def test_rule_declines_what_is_not_its_own() -> None:
    """Negative: a plain matmul and a packed NCHWc conv are left to the other rules."""
    target = tvm.target.Target(resolve("x86").tvm)
    a = tvm.te.placeholder((16, 32), name="a")
    b = tvm.te.placeholder((32, 64), name="b")
    matmul = tvm.te.create_prim_func([a, b, tvm.topi.matmul(a, b)])
    data = tvm.te.placeholder((1, 4, 8, 8, 16), name="data")
    weight = tvm.te.placeholder((4, 4, 3, 3, 16, 16), name="weight")
    packed = cpu.conv2d_nchwc_te(data, weight, [1, 1], [1, 1, 1, 1], [1, 1], "float32")
    nchwc = tvm.te.create_prim_func([data, weight, packed])
    with target:
        assert nhwc.rule_conv2d_nhwc(matmul, target) is None
        assert nhwc.rule_conv2d_nhwc(nchwc, target) is None


def test_grouped_conv_in_nhwc_takes_the_grouped_rule() -> None:
    """A grouped conv (2 groups of 4 channels) blocks its weights inside one group
    (OHWI4o) and takes the grouped rule, not the dense one; it matches onnxruntime."""
    model = _grouped_conv_model()
    rules = _rules_used(_scheduled_module(model, layout="nhwc"))
    conv = [v for k, v in rules.items() if "conv2d" in k]
    assert conv == ["grouped_nhwc"]
    graphopt.compile(model, "x86", layout="nhwc")  # verifies against onnxruntime
