"""fold-conv-mul-add: a per-channel Mul/Add after a Conv folds into its weight/bias."""

import numpy as np
import pytest
from onnx import helper

from graphopt.frontends.onnx import onnx_to_graph
from graphopt.passes import FoldConvMulAdd
from tests.conftest import make_model
from tests.passes._util import random_inputs, run_ort

RNG = np.random.default_rng(3)


def _model(tail, consts, bias=True, extra_user=False):
    inits = {"w": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), **consts}
    conv_in = ["x", "w"]
    if bias:
        inits["b"] = RNG.standard_normal(4).astype(np.float32)
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", pads=[1, 1, 1, 1])] + tail
    outputs = {"y": (1, 4, 5, 5)}
    if extra_user:
        nodes.append(helper.make_node("Relu", ["c"], ["z"]))
        outputs["z"] = (1, 4, 5, 5)
    return onnx_to_graph(make_model(nodes, {"x": (1, 3, 5, 5)}, outputs, inits))


@pytest.mark.parametrize("bias", [True, False])
def test_mul_then_add_fold_into_the_conv(bias):
    g = _model(
        [
            helper.make_node("Mul", ["k", "c"], ["m"]),  # constant first: either order matches
            helper.make_node("Add", ["m", "a"], ["y"]),
        ],
        {
            "k": RNG.standard_normal((4, 1, 1)).astype(np.float32),
            "a": RNG.standard_normal((1, 4, 1, 1)).astype(np.float32),
        },
        bias=bias,
    )
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = FoldConvMulAdd()(g)
    suffix = "bias_" if bias else ""
    assert r.stats == {f"conv_{suffix}mul": 1, "conv_bias_add": 1}
    assert r.graph.op_counts() == {"Conv": 1}
    assert r.graph.nodes()[0].outputs == ["y"]
    np.testing.assert_allclose(run_ort(r.graph, inputs)[0], before[0], rtol=1e-5, atol=1e-5)


def test_scalar_constant_folds():
    g = _model([helper.make_node("Mul", ["c", "k"], ["y"])], {"k": np.float32(0.5)})
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = FoldConvMulAdd()(g)
    assert r.graph.op_counts() == {"Conv": 1}
    np.testing.assert_allclose(run_ort(r.graph, inputs)[0], before[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "const, extra_user",
    [
        (RNG.standard_normal(5).astype(np.float32), False),  # [C] broadcasts on the W axis
        (RNG.standard_normal((1, 4, 5, 5)).astype(np.float32), False),  # per element
        (RNG.standard_normal((4, 1, 1)).astype(np.float32), True),  # conv output shared
    ],
    ids=["last-axis-vector", "per-element", "shared-conv-output"],
)
def test_does_not_fire(const, extra_user):
    g = _model([helper.make_node("Mul", ["c", "k"], ["y"])], {"k": const}, extra_user=extra_user)
    r = FoldConvMulAdd()(g)
    assert not r.modified and r.graph.op_counts()["Mul"] == 1


def test_non_constant_operand_does_not_fold():
    g = _model([helper.make_node("Add", ["c", "c"], ["y"])], {})
    r = FoldConvMulAdd()(g)
    assert not r.modified
