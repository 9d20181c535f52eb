"""fuse-gelu: the erf form of GELU (torch's export before opset 20) -> graphopt.Gelu,
which lowers to Relax nn.gelu and compiles into its producer's kernel."""

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.frontends.onnx import onnx_to_graph
from graphopt.lower import unsupported_nodes
from graphopt.passes import GRAPHOPT_DOMAIN, FuseGELU
from tests.conftest import make_model
from tests.passes._util import random_inputs, run_ort

SQRT2 = np.float32(np.sqrt(2.0))


def _gelu_model(form: str = "torch", s: float = SQRT2, extra_user: bool = False):
    """MatMul then GELU in one of the erf forms exporters write."""
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal((16, 32)).astype(np.float32),
        "one": np.float32(1.0),
        "half": np.float32(0.5),
        "s": np.float32(s if form != "scaled" else 1 / s),
    }
    inner = "Mul" if form == "scaled" else "Div"
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node(inner, ["h", "s"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
    ]
    if form == "half_first":
        nodes += [
            helper.make_node("Mul", ["h", "half"], ["p"]),
            helper.make_node("Mul", ["p", "e1"], ["y"]),
        ]
    else:
        nodes += [
            helper.make_node("Mul", ["h", "e1"], ["p"]),
            helper.make_node("Mul", ["p", "half"], ["y"]),
        ]
    outputs = {"y": (1, 8, 32)}
    if extra_user:
        nodes.append(helper.make_node("Neg", ["e"], ["z"]))
        outputs["z"] = (1, 8, 32)
    return make_model(nodes, {"x": (1, 8, 16)}, outputs, inits)


@pytest.mark.parametrize("form", ["torch", "half_first", "scaled"])
def test_erf_gelu_becomes_one_gelu_op(form):
    g = onnx_to_graph(_gelu_model(form))
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = FuseGELU()(g)
    assert r.graph.op_counts() == {"MatMul": 1, "Gelu": 1}
    gelu = r.graph.nodes()[-1]
    assert gelu.domain == GRAPHOPT_DOMAIN and gelu.outputs == ["y"]
    assert unsupported_nodes(r.graph) == []
    np.testing.assert_allclose(run_ort(r.graph, inputs)[0], before[0], rtol=1e-6, atol=1e-6)


def test_other_constants_or_other_users_are_kept():
    r = FuseGELU()(onnx_to_graph(_gelu_model(s=1.5)))
    assert not r.modified and r.graph.op_counts()["Erf"] == 1
    r = FuseGELU()(onnx_to_graph(_gelu_model(extra_user=True)))
    assert not r.modified and r.graph.op_counts()["Erf"] == 1


def test_gelu_compiles_into_the_matmul_kernel_and_verifies(tmp_path):
    artifact = graphopt.compile(_gelu_model(), "x86", tmp_path / "gelu.so")
    assert artifact.manifest["verification"]["ok"]
    assert artifact.manifest["ops"] == {"MatMul": 1, "Gelu": 1}
    assert artifact.manifest["schedule"]["rules"] == {"matmul": 1}
