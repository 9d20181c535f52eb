"""eliminate-identity, fold-constants and dead-code: structure, numerics, non-firing."""

import numpy as np
from onnx import helper

from graphopt.frontends.onnx import onnx_to_graph
from graphopt.passes import (
    DEFAULT_PIPELINE,
    EliminateDeadCode,
    EliminateIdentity,
    FoldConstants,
    default_passes,
    run_passes,
)
from tests.conftest import make_model
from tests.passes._util import random_inputs, run_ort


def test_identity_and_dropout_removed():
    m = make_model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Dropout", ["a"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"]),
        ],
        {"x": (2, 3)},
        {"y": (2, 3)},
    )
    g = onnx_to_graph(m)
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = EliminateIdentity()(g)
    assert r.stats == {"Identity": 1, "Dropout": 1}
    assert r.graph.op_counts() == {"Relu": 1}
    np.testing.assert_array_equal(run_ort(r.graph, inputs)[0], before[0])


def test_identity_kept_when_output_is_the_input():
    m = make_model([helper.make_node("Identity", ["x"], ["y"])], {"x": (2,)}, {"y": (2,)})
    r = EliminateIdentity()(onnx_to_graph(m))
    assert not r.modified and r.graph.op_counts() == {"Identity": 1}


def test_dropout_with_mask_output_kept():
    m = make_model([helper.make_node("Dropout", ["x"], ["y", "mask"])], {"x": (2,)}, {"y": (2,)})
    r = EliminateIdentity()(onnx_to_graph(m))
    assert not r.modified


def test_fold_constants_turns_shape_arithmetic_into_constants():
    # The pattern exporters emit for flatten: Shape -> Gather -> Unsqueeze -> Concat -> Reshape.
    m = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        {"x": (2, 3, 4)},
        {"y": (2, 12)},
        {
            "zero": np.array(0, np.int64),
            "axes": np.array([0], np.int64),
            "minus1": np.array([-1], np.int64),
        },
    )
    g = onnx_to_graph(m)
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = FoldConstants()(g)
    assert r.stats == {"Shape": 1, "Gather": 1, "Unsqueeze": 1, "Concat": 1}
    assert r.graph.op_counts() == {"Reshape": 1}
    np.testing.assert_array_equal(r.graph.constants["shape"], [2, -1])
    np.testing.assert_array_equal(run_ort(r.graph, inputs)[0], before[0])


def test_fold_constants_folds_size_of_a_static_value():
    m = make_model(
        [
            helper.make_node("Size", ["x"], ["n"]),
            helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
            helper.make_node("Reshape", ["x", "n1"], ["y"]),
        ],
        {"x": (2, 3)},
        {"y": (6,)},
        {"axes": np.array([0], np.int64)},
    )
    g = onnx_to_graph(m)
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = FoldConstants()(g)
    assert r.stats == {"Size": 1, "Unsqueeze": 1}
    np.testing.assert_array_equal(r.graph.constants["n1"], [6])
    np.testing.assert_array_equal(run_ort(r.graph, inputs)[0], before[0])


def test_fold_constants_leaves_data_dependent_nodes():
    m = make_model(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        {"x": (2,)},
        {"y": (2,)},
        {"c": np.ones(2, np.float32)},
    )
    r = FoldConstants()(onnx_to_graph(m))
    assert not r.modified


def test_dead_code_removes_unreachable_nodes_and_constants():
    m = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Add", ["x", "c"], ["dead"])],
        {"x": (2,)},
        {"y": (2,)},
        {"c": np.ones(2, np.float32)},
    )
    r = EliminateDeadCode()(onnx_to_graph(m))
    assert r.stats == {"nodes": 1, "constants": 1}
    assert r.graph.op_counts() == {"Relu": 1} and not r.graph.constants
    assert not EliminateDeadCode()(r.graph).modified


def test_default_pipeline_records_each_pass():
    m = make_model(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        {"x": (2,)},
        {"y": (2,)},
    )
    _, records = run_passes(onnx_to_graph(m), default_passes())
    assert [r["name"] for r in records] == list(DEFAULT_PIPELINE)
    assert records[0]["stats"] == {"Identity": 1}


def test_output_names_survive_identity_removal(tmp_path):
    import graphopt

    m = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
        {"x": (2, 3)},
        {"y": (2, 3)},
    )
    artifact = graphopt.compile(m, "x86", tmp_path / "m.so")
    assert artifact.output_names == ["y"]
    assert artifact.manifest["verification"]["ok"]
