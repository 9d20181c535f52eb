"""A depthwise conv read only by a 1x1 conv is one kernel with it (graphopt/targets/
_fuse_dwpw.py, _cpu_schedules.schedule_depthwise_pointwise); other shapes stay apart.
Every compile here verifies against onnxruntime."""

from __future__ import annotations

import re

import onnx
import pytest

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.targets import _fuse_dwpw  # noqa: E402
from tests.targets._cnn_blocks import inverted_residual  # noqa: E402
from tests.targets.test_cpu_schedules import _scheduled_module  # noqa: E402

FUSED_RULE = "depthwise_pointwise_nchwc"


def _scheduled(model: onnx.ModelProto) -> dict[str, tvm.tirx.PrimFunc]:
    """The x86 pipeline's kernels after its schedule phase, by name."""
    mod = _scheduled_module(model)
    return {g.name_hint: f for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _rules(funcs: dict) -> list[str]:
    return [
        str(f.attrs["graphopt.schedule_rule"])
        for f in funcs.values()
        if f.attrs is not None and "graphopt.schedule_rule" in f.attrs
    ]


@pytest.mark.parametrize("size,stride", [(28, 1), (28, 2), (14, 1)])
def test_a_depthwise_conv_and_the_1x1_conv_reading_it_are_one_kernel(
    size: int, stride: int
) -> None:
    """The depthwise conv (its bias and ReLU6), the projection, its bias and the residual
    add are one kernel: its parallel loop is the output's rows alone, the depthwise
    conv's output a one-row buffer under it. The artifact matches onnxruntime."""
    model = inverted_residual(size, stride=stride)
    funcs = _scheduled(model)
    fused = [
        f
        for n, f in funcs.items()
        if "depthwise" in n and "conv2d_nchwc" in n.split("depthwise", 1)[1]
    ]
    assert len(fused) == 1, list(funcs)
    assert str(fused[0].attrs["graphopt.schedule_rule"]) == FUSED_RULE
    assert "depthwise_nchwc" not in _rules(funcs)
    script = fused[0].script()
    rows = -(-size // stride)
    assert re.search(rf"in T\.parallel\(T\.int64\({rows}\)\)|in T\.parallel\({rows}\)", script), (
        script
    )
    # the depthwise conv is computed under the row loop, after the rows went parallel
    assert script.index("T.parallel") < script.index('T.sblock("depthwise_conv2d_nchwc_update")')
    art = graphopt.compile(model, "x86")
    assert art.manifest["verification"]["ok"]


@pytest.mark.parametrize(
    "options",
    [
        {"size": 28, "shared": True},  # a squeeze-excitation pool reads the map too
        {"size": 28, "pointwise_stride": 2},  # a strided 1x1 conv
        {"size": 2 * (_fuse_dwpw.MIN_ROWS - 1), "stride": 2},  # too few rows to share
    ],
)
def test_what_a_fused_kernel_cannot_take_stays_two_kernels(options: dict) -> None:
    """Each of these keeps its depthwise conv a kernel of its own (its rule
    depthwise_nchwc) and compiles to what onnxruntime computes."""
    model = inverted_residual(**options)
    rules = _rules(_scheduled(model))
    assert "depthwise_nchwc" in rules and FUSED_RULE not in rules, rules
    art = graphopt.compile(model, "x86")
    assert art.manifest["verification"]["ok"]
