"""ONNX loading: clear errors for bad files, input-shape fixing, graph conversion."""

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.errors import InputError, ModelLoadError
from graphopt.frontends.onnx import graph_to_onnx, load_onnx, onnx_to_graph, parse_input_shapes
from tests.conftest import make_model


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_onnx(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    p = tmp_path / "junk.onnx"
    p.write_text("this is not a protobuf at all \x00\xff")
    with pytest.raises(ModelLoadError, match="not"):
        load_onnx(p)


def test_truncated(tmp_path, tiny_model):
    p = tmp_path / "cut.onnx"
    data = tiny_model.SerializeToString()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated|not"):
        load_onnx(p)


def test_checker_failure(tmp_path):
    bad = make_model([helper.make_node("Relu", ["missing"], ["y"])], {"x": (1,)}, {"y": (1,)})
    p = tmp_path / "bad.onnx"
    onnx.save(bad, p)
    with pytest.raises(ModelLoadError, match="onnx.checker"):
        load_onnx(p)


@pytest.mark.parametrize("spec", ["x", "x=", "x=1,a", "=1,2", "x=0,3", "x=-1"])
def test_malformed_input_shape(spec):
    with pytest.raises(InputError, match="malformed --input-shape"):
        parse_input_shapes([spec])


def test_symbolic_dims_need_input_shape():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": ("N", 3)}, {"y": ("N", 3)})
    with pytest.raises(InputError, match="--input-shape x="):
        onnx_to_graph(model)
    g = onnx_to_graph(model, {"x": (2, 3)})
    assert g.values["x"].shape == (2, 3)
    assert g.values["y"].shape == (2, 3)


def test_input_shape_errors():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": ("N", 3)}, {"y": ("N", 3)})
    with pytest.raises(InputError, match="unknown input"):
        onnx_to_graph(model, {"z": (1, 3)})
    with pytest.raises(InputError, match="rank 2"):
        onnx_to_graph(model, {"x": (1, 3, 1)})
    with pytest.raises(InputError, match="fixed to 3"):
        onnx_to_graph(model, {"x": (1, 4)})


def test_constant_nodes_become_constants_and_roundtrip(tiny_model):
    g = onnx_to_graph(tiny_model)
    assert g.inputs == ["x"] and g.outputs == ["y"]
    assert g.op_counts() == {"Conv": 1, "Relu": 1}
    assert g.constants["w"].shape == (3, 2, 3, 3)
    back = graph_to_onnx(g)
    onnx.checker.check_model(back)
    m = make_model(
        [
            helper.make_node("Constant", [], ["c"], value_float=2.0),
            helper.make_node("Mul", ["x", "c"], ["y"]),
        ],
        {"x": (2,)},
        {"y": (2,)},
    )
    g = onnx_to_graph(m)
    assert g.op_counts() == {"Mul": 1}
    np.testing.assert_array_equal(g.constants["c"], np.float32(2.0))
