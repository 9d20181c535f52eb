"""eliminate-redundant: Reshape pairs, cancelling Transposes, same-type Casts."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.frontends.onnx import onnx_to_graph
from graphopt.passes import EliminateRedundant
from tests.conftest import make_model
from tests.passes._util import random_inputs, run_ort


def _check(m, expected_ops, expected_stats):
    g = onnx_to_graph(m)
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = EliminateRedundant()(g)
    assert dict(r.stats) == expected_stats
    assert dict(r.graph.op_counts()) == expected_ops
    for got, want in zip(run_ort(r.graph, inputs), before, strict=True):
        np.testing.assert_array_equal(got, want)
    return r.graph


def test_reshape_of_reshape_becomes_one_reshape():
    m = make_model(
        [
            helper.make_node("Reshape", ["x", "s1"], ["a"]),
            helper.make_node("Reshape", ["a", "s2"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"]),
        ],
        {"x": (2, 3, 4)},
        {"y": (6, 2, 2)},
        # the 0 in s2 copies the *intermediate* dim (6): the merged shape must be explicit
        {"s1": np.array([6, -1], np.int64), "s2": np.array([0, 2, 2], np.int64)},
    )
    g = _check(m, {"Reshape": 1, "Relu": 1}, {"reshape_reshape": 1})
    reshape = g.nodes()[0]
    assert reshape.inputs[0] == "x" and list(g.constants[reshape.inputs[1]]) == [6, 2, 2]


def test_transposes_that_cancel_disappear_and_others_compose():
    m = make_model(
        [
            helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", ["a"], ["b"], perm=[0, 3, 1, 2]),  # cancels
            helper.make_node("Transpose", ["b"], ["c"], perm=[1, 0, 2, 3]),
            helper.make_node("Transpose", ["c"], ["d"], perm=[0, 1, 3, 2]),  # composes
            helper.make_node("Relu", ["d"], ["y"]),
        ],
        {"x": (1, 2, 3, 4)},
        {"y": (2, 1, 4, 3)},
    )
    g = _check(m, {"Transpose": 1, "Relu": 1}, {"transpose_transpose": 2})
    t = g.nodes()[0]
    assert t.inputs == ["x"] and t.attrs["perm"] == [1, 0, 3, 2]


def test_cast_to_the_same_type_and_noop_reshape_go():
    m = make_model(
        [
            helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["a", "s"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"]),
        ],
        {"x": (2, 3)},
        {"y": (2, 3)},
        {"s": np.array([2, 3], np.int64)},
    )
    g = _check(m, {"Relu": 1}, {"cast_noop": 1, "reshape_noop": 1})
    assert g.nodes()[0].inputs == ["x"]


@pytest.mark.parametrize(
    "nodes, inits",
    [
        # a real Cast
        (
            [
                helper.make_node("Cast", ["x"], ["c"], to=TensorProto.INT32),
                helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT),
            ],
            {},
        ),
        # a Reshape that changes the shape
        ([helper.make_node("Reshape", ["x", "s"], ["y"])], {"s": np.array([3, 2], np.int64)}),
        # a Transpose pair whose first output has another user
        (
            [
                helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
                helper.make_node("Transpose", ["t"], ["u"], perm=[1, 0]),
                helper.make_node("Transpose", ["t"], ["t2"], perm=[1, 0]),
                helper.make_node("Add", ["u", "t2"], ["y"]),
            ],
            {},
        ),
    ],
    ids=["real-cast", "real-reshape", "transpose-shared"],
)
def test_does_not_fire(nodes, inits):
    out = (3, 2) if any(n.op_type == "Reshape" for n in nodes) else (2, 3)
    m = make_model(nodes, {"x": (2, 3)}, {"y": out}, inits)
    r = EliminateRedundant()(onnx_to_graph(m))
    assert not r.modified and len(r.graph) == len(nodes)
