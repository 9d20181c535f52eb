import numpy as np
import pytest
from onnx import helper

from graphopt.frontends.onnx import onnx_to_graph
from graphopt.passes import FoldBatchNorm
from graphopt.passes.fold_batchnorm import check
from tests.conftest import make_model, zoo_model
from tests.passes._util import random_inputs, run_ort


def _conv_bn(extra_user: bool = False, bias: bool = True):
    rng = np.random.default_rng(1)
    inits = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "b": rng.normal(0, 0.1, 4).astype(np.float32),
        "m": rng.normal(0, 0.1, 4).astype(np.float32),
        "v": rng.uniform(0.5, 1.5, 4).astype(np.float32),
    }
    conv_in = ["x", "w"]
    if bias:
        inits["cb"] = rng.normal(0, 0.1, 4).astype(np.float32)
        conv_in.append("cb")
    nodes = [
        helper.make_node("Conv", conv_in, ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3
        ),
    ]
    outputs = {"y": (1, 4, 5, 5)}
    if extra_user:
        nodes.append(helper.make_node("Relu", ["c"], ["z"], name="other"))
        outputs["z"] = (1, 4, 5, 5)
    return onnx_to_graph(make_model(nodes, {"x": (1, 3, 5, 5)}, outputs, inits))


@pytest.mark.parametrize("bias", [True, False])
def test_folds_and_matches_onnxruntime(bias):
    g = _conv_bn(bias=bias)
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    result = FoldBatchNorm()(g.copy())
    assert result.modified and result.stats["folded"] == 1
    assert result.graph.op_counts() == {"Conv": 1}
    np.testing.assert_allclose(run_ort(result.graph, inputs)[0], before[0], rtol=1e-5, atol=1e-5)


def test_declines_when_conv_output_has_other_users():
    g = _conv_bn(extra_user=True)
    assert check(g, g.node("bn")) == "Conv output has other users"
    result = FoldBatchNorm()(g)
    assert not result.modified and result.stats["declined"] == 1
    assert result.graph.op_counts()["BatchNormalization"] == 1


def test_folds_every_batchnorm_in_resnet18():
    g = onnx_to_graph(zoo_model("resnet18"))
    n_bn = g.op_counts()["BatchNormalization"]
    result = FoldBatchNorm()(g)
    assert result.stats["folded"] == n_bn == 20
    assert "BatchNormalization" not in result.graph.op_counts()
