"""The graph IR keeps networkx edges in step with node inputs, without TVM."""

import sys

import numpy as np

from graphopt.ir import Graph, Node


def _chain() -> Graph:
    g = Graph()
    g.add_input("x", (1, 4), "float32")
    g.add_constant("w", np.ones((4, 4), np.float32))
    g.add_node(Node("mm", "MatMul", ["x", "w"], ["a"]))
    g.add_node(Node("relu", "Relu", ["a"], ["b"]))
    g.add_node(Node("unused", "Neg", ["a"], ["c"]))
    g.outputs = ["b"]
    return g


def test_topological_order_and_edges():
    g = _chain()
    assert [n.name for n in g.nodes()] == ["mm", "relu", "unused"]
    assert set(g.nx_graph.edges) == {("mm", "relu"), ("mm", "unused")}
    assert [n.name for n in g.consumers("a")] == ["relu", "unused"]
    assert g.producer("b").name == "relu"


def test_nodes_added_out_of_order_still_sort_topologically():
    g = Graph()
    g.add_input("x", (1,), "float32")
    g.add_node(Node("second", "Relu", ["t"], ["y"]))
    g.add_node(Node("first", "Neg", ["x"], ["t"]))
    assert [n.name for n in g.nodes()] == ["first", "second"]


def test_replace_uses_rewires_consumers_and_outputs():
    g = _chain()
    g.remove_node("relu")
    g.replace_uses("b", "a")
    assert g.outputs == ["a"]
    g.replace_uses("a", "x")
    assert g.node("unused").inputs == ["x"]
    assert g.consumers("a") == []
    assert list(g.nx_graph.predecessors("unused")) == []


def test_copy_is_independent():
    g = _chain()
    c = g.copy()
    c.remove_node("unused")
    assert len(g) == 3 and len(c) == 2


def test_ir_and_passes_do_not_import_tvm():
    import subprocess

    code = (
        "import sys, graphopt.ir, graphopt.passes, graphopt.frontends.onnx; "
        "sys.exit(1 if 'tvm' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
