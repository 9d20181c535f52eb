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


def _bn_params(rng, n):
    return {
        "g": rng.uniform(0.5, 1.5, n).astype(np.float32),
        "b": rng.normal(0, 0.1, n).astype(np.float32),
        "m": rng.normal(0, 0.1, n).astype(np.float32),
        "v": rng.uniform(0.5, 1.5, n).astype(np.float32),
    }


@pytest.mark.parametrize("group", [1, 2])
def test_folds_into_conv_transpose(group):
    rng = np.random.default_rng(2)
    inits = {
        "w": rng.standard_normal((4, 6 // group, 3, 3)).astype(np.float32),
        "cb": rng.normal(0, 0.1, 6).astype(np.float32),
        **_bn_params(rng, 6),
    }
    nodes = [
        helper.make_node(
            "ConvTranspose", ["x", "w", "cb"], ["c"], strides=[2, 2], group=group, name="ct"
        ),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], epsilon=1e-3),
    ]
    g = onnx_to_graph(make_model(nodes, {"x": (1, 4, 5, 5)}, {"y": (1, 6, 11, 11)}, inits))
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = FoldBatchNorm()(g)
    assert r.stats == {"folded": 1, "folded into ConvTranspose": 1}
    assert r.graph.op_counts() == {"ConvTranspose": 1}
    np.testing.assert_allclose(run_ort(r.graph, inputs)[0], before[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trans_b, bias", [(0, True), (1, True), (1, False)])
def test_folds_into_gemm(trans_b, bias):
    rng = np.random.default_rng(4)
    w_shape = (5, 8) if trans_b else (8, 5)
    inits = {"w": rng.standard_normal(w_shape).astype(np.float32), **_bn_params(rng, 5)}
    gemm_in = ["x", "w"]
    if bias:
        inits["gc"] = rng.normal(0, 0.1, 5).astype(np.float32)
        gemm_in.append("gc")
    nodes = [
        helper.make_node("Gemm", gemm_in, ["c"], transB=trans_b, alpha=0.5, beta=2.0),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
    ]
    g = onnx_to_graph(make_model(nodes, {"x": (3, 8)}, {"y": (3, 5)}, inits))
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = FoldBatchNorm()(g)
    assert r.stats["folded into Gemm"] == 1 and r.graph.op_counts() == {"Gemm": 1}
    np.testing.assert_allclose(run_ort(r.graph, inputs)[0], before[0], rtol=1e-5, atol=1e-5)


def test_declines_after_other_producers():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Relu", ["x"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
    ]
    g = onnx_to_graph(
        make_model(nodes, {"x": (1, 4, 2, 2)}, {"y": (1, 4, 2, 2)}, _bn_params(rng, 4))
    )
    assert check(g, g.node("BatchNormalization_1")) == (
        "input is not produced by a Conv, ConvTranspose or Gemm"
    )
    assert not FoldBatchNorm()(g).modified
