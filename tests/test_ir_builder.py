"""graphopt.ir_builder.IRBuilder: fresh names, constants, nodes and constant folding."""

import numpy as np

from graphopt.ir import Graph, Value
from graphopt.ir_builder import IRBuilder


def _graph() -> Graph:
    g = Graph("g", 17)
    g.inputs = ["x"]
    g.values["x"] = Value("x", (2, 3), "float32")
    return g


def test_fresh_names_follow_unique_name_and_never_repeat():
    g = _graph()
    b = IRBuilder(g)
    assert [b.fresh("x"), b.fresh("x"), b.fresh("y"), b.fresh("y")] == ["x_1", "x_2", "y", "y_1"]
    g.values["y_2"] = Value("y_2", (), "float32")
    assert b.fresh("y") == "y_3"


def test_prefixed_names_share_one_count():
    b = IRBuilder(_graph(), prefix="lstm")
    assert [b.fresh("matmul"), b.fresh("add"), b.fresh("matmul")] == [
        "lstm_matmul_1",
        "lstm_add_2",
        "lstm_matmul_3",
    ]


def test_emit_adds_a_node_and_its_value():
    g = _graph()
    b = IRBuilder(g)
    y = b.emit("Relu", ["x"], (2, 3), "float32")
    assert y == "relu" and g.values[y] == Value("relu", (2, 3), "float32")
    node = g.producer(y)
    assert node.name == y and node.op_type == "Relu" and node.inputs == ["x"]
    z = b.emit("Relu", [y], (2, 3), "float32", out="z", const_inputs=[b.const(np.ones(1), "c")])
    assert z == "z" and g.producer("z").name == "relu_1" and g.producer("z").inputs == [y, "c"]


def test_emit_folds_all_constant_inputs_in_numpy():
    g = _graph()
    b = IRBuilder(g)
    c = b.const(np.array([1.0, -2.0], np.float32), "c")
    y = b.emit("Relu", [c], (2,), "float32", fold=lambda a: np.maximum(a, 0))
    assert g.is_constant(y) and len(g) == 0
    np.testing.assert_array_equal(g.constants[y], [1.0, 0.0])
    x = b.emit("Relu", ["x"], (2, 3), "float32", fold=lambda a: np.maximum(a, 0))
    assert not g.is_constant(x) and len(g) == 1


def test_many_names_from_one_base_stay_fast():
    b = IRBuilder(_graph())
    names = {b.fresh("v") for _ in range(20000)}
    assert len(names) == 20000
