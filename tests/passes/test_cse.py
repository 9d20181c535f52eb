"""cse: structure, numerics against onnxruntime, and where it must not merge."""

import numpy as np
from onnx import helper

from graphopt.frontends.onnx import onnx_to_graph
from graphopt.passes import EliminateCommonSubexpressions
from tests.conftest import make_model
from tests.passes._util import random_inputs, run_ort


def test_merges_repeated_subexpressions_and_equal_constants():
    shape_a = np.array([2, 12], np.int64)
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r1"]),
            helper.make_node("Relu", ["x"], ["r2"]),
            helper.make_node("Reshape", ["r1", "sa"], ["f1"]),
            helper.make_node("Reshape", ["r2", "sb"], ["f2"]),  # equal shape, other constant
            helper.make_node("Add", ["f1", "f2"], ["y"]),
        ],
        {"x": (2, 3, 4)},
        {"y": (2, 12)},
        {"sa": shape_a, "sb": shape_a.copy()},
    )
    g = onnx_to_graph(m)
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = EliminateCommonSubexpressions()(g)
    assert r.stats == {"constants": 1, "Relu": 1, "Reshape": 1}
    assert r.graph.op_counts() == {"Relu": 1, "Reshape": 1, "Add": 1}
    add = next(n for n in r.graph.nodes() if n.op_type == "Add")
    assert add.inputs[0] == add.inputs[1]
    np.testing.assert_array_equal(run_ort(r.graph, inputs)[0], before[0])


def test_different_attributes_or_graph_outputs_are_kept():
    m = make_model(
        [
            helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.1),
            helper.make_node("LeakyRelu", ["x"], ["b"], alpha=0.2),
            helper.make_node("Relu", ["x"], ["y1"]),
            helper.make_node("Relu", ["x"], ["y2"]),  # a graph output: its name stays
            helper.make_node("Add", ["a", "b"], ["y3"]),
        ],
        {"x": (2, 3)},
        {"y1": (2, 3), "y2": (2, 3), "y3": (2, 3)},
    )
    r = EliminateCommonSubexpressions()(onnx_to_graph(m))
    assert not r.modified
    assert r.graph.op_counts() == {"LeakyRelu": 2, "Relu": 2, "Add": 1}
