"""fuse-silu: x * Sigmoid(x) -> graphopt.SiLU, which lowers and compiles."""

import numpy as np
from onnx import helper

import graphopt
from graphopt.frontends.onnx import onnx_to_graph
from graphopt.lower import unsupported_nodes
from graphopt.passes import GRAPHOPT_DOMAIN, FuseSiLU
from tests.conftest import make_model
from tests.passes._util import random_inputs, run_ort


def _silu_model(extra_user=False):
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["s", "c"], ["y"]),
    ]
    outputs = {"y": (1, 4, 5, 5)}
    if extra_user:
        nodes.append(helper.make_node("Neg", ["s"], ["z"]))
        outputs["z"] = (1, 4, 5, 5)
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    return make_model(nodes, {"x": (1, 3, 5, 5)}, outputs, {"w": w})


def test_sigmoid_mul_becomes_one_silu_op():
    g = onnx_to_graph(_silu_model())
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = FuseSiLU()(g)
    assert r.stats == {"sigmoid_mul": 1}
    assert r.graph.op_counts() == {"Conv": 1, "SiLU": 1}
    silu = r.graph.nodes()[-1]
    assert silu.domain == GRAPHOPT_DOMAIN and silu.outputs == ["y"]
    assert unsupported_nodes(r.graph) == []
    np.testing.assert_allclose(run_ort(r.graph, inputs)[0], before[0], rtol=1e-6, atol=1e-6)


def test_sigmoid_with_other_users_is_kept():
    r = FuseSiLU()(onnx_to_graph(_silu_model(extra_user=True)))
    assert not r.modified and r.graph.op_counts()["Sigmoid"] == 1


def test_silu_compiles_and_verifies(tmp_path):
    artifact = graphopt.compile(_silu_model(), "x86", tmp_path / "silu.so")
    assert artifact.manifest["verification"]["ok"]
    assert artifact.manifest["ops"] == {"Conv": 1, "SiLU": 1}
