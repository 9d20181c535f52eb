"""Dynamic batch: a model with a symbolic batch dim compiles, on request, to one artifact
that runs any batch size and matches onnxruntime at each; fixed shapes stay the default."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.tools.update_model_dims import update_inputs_outputs_dims

import graphopt
from graphopt import zoo
from graphopt.artifact import check_inputs, concrete_specs, symbolic_dims
from graphopt.cli import main
from graphopt.compiler import verify
from graphopt.errors import InputError, VerificationError
from graphopt.frontends.onnx import onnx_to_graph, parse_input_shapes
from graphopt.verify import compare, onnxruntime_reference
from tests.conftest import make_model


def with_batch(model: onnx.ModelProto, symbol: str = "N") -> onnx.ModelProto:
    """``model`` with dim 0 of every input and output made the symbol ``symbol``."""

    def dims(infos) -> dict:
        return {
            i.name: [symbol] + [d.dim_value for d in i.type.tensor_type.shape.dim[1:]]
            for i in infos
        }

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return update_inputs_outputs_dims(copy, dims(copy.graph.input), dims(copy.graph.output))


def relu_model(**dims) -> onnx.ModelProto:
    """``x`` and ``y`` -> Relu(x) + y, with the given shapes."""
    node = [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("Relu", ["s"], ["z"])]
    return make_model(node, dims, {"z": dims["x"]})


def check_batches(artifact, model: onnx.ModelProto, batches) -> None:  # noqa: ANN001
    reference = onnxruntime_reference(model)
    for batch in batches:
        inputs = artifact.random_inputs(seed=batch, batch=batch)
        got = artifact.run(inputs)
        assert all(v.shape[0] == batch for v in got.values())
        report = compare(got, reference(inputs), rtol=1e-3, atol=1e-4)
        assert report["ok"], (batch, report["first_mismatch"])


# --- the frontend ----------------------------------------------------------------------
def test_input_shape_takes_a_batch_symbol_in_dim_0_only():
    assert parse_input_shapes(["x=N,3,4,4"]) == {"x": ("N", 3, 4, 4)}
    assert parse_input_shapes({"x": ("batch", 3)}) == {"x": ("batch", 3)}
    for bad in ("x=3,N", "x=N,M", "x=1-1,3"):
        with pytest.raises(InputError, match="malformed"):
            parse_input_shapes([bad])


def test_fixed_shapes_stay_the_default():
    model = relu_model(x=("N", 3), y=("N", 3))
    with pytest.raises(InputError, match="--dynamic-batch"):
        onnx_to_graph(model)
    assert onnx_to_graph(model, {"x": (2, 3), "y": (2, 3)}).values["z"].shape == (2, 3)


def test_the_batch_symbol_is_shared_and_propagated():
    g = onnx_to_graph(relu_model(x=("batch_size", 3), y=("batch_size", 3)), dynamic_batch=True)
    assert g.values["x"].shape == ("batch_size", 3) and g.values["z"].shape == ("batch_size", 3)
    # inputs that disagree on the name (or have none) share one symbol
    g = onnx_to_graph(relu_model(x=("a", 3), y=(None, 3)), dynamic_batch=True)
    assert g.values["x"].shape == g.values["y"].shape == ("N", 3)
    # --input-shape x=B,3 names it (and implies a dynamic batch)
    g = onnx_to_graph(relu_model(x=("a", 3), y=("b", 3)), {"x": ("B", 3)})
    assert g.values["y"].shape == ("B", 3)


def test_dynamic_batch_refusals():
    with pytest.raises(InputError, match="no input has a symbolic dim 0"):
        onnx_to_graph(relu_model(x=(1, 3), y=(1, 3)), dynamic_batch=True)
    with pytest.raises(InputError, match="symbolic shape"):  # only dim 0 may stay symbolic
        onnx_to_graph(relu_model(x=("N", "C"), y=("N", "C")), dynamic_batch=True)
    with pytest.raises(InputError, match="fixed to 1"):
        onnx_to_graph(relu_model(x=(1, 3), y=(1, 3)), {"x": ("N", 3)})
    with pytest.raises(InputError, match="ONNX models only"):
        graphopt.compile("model.pt2", dynamic_batch=True)


def test_check_inputs_binds_the_symbol_once():
    specs = [
        {"name": "x", "shape": ["N", 3], "dtype": "float32"},
        {"name": "y", "shape": ["N", 3], "dtype": "float32"},
    ]
    assert symbolic_dims(specs) == ["N"]
    assert concrete_specs(specs, 5)[1]["shape"] == [5, 3]
    f = np.float32
    assert len(check_inputs(specs, {"x": np.zeros((4, 3), f), "y": np.zeros((4, 3), f)})) == 2
    with pytest.raises(InputError, match="dim N is 4 in another input"):
        check_inputs(specs, {"x": np.zeros((4, 3), f), "y": np.zeros((2, 3), f)})
    with pytest.raises(InputError, match="at least 1"):
        check_inputs(specs, {"x": np.zeros((0, 3), f), "y": np.zeros((0, 3), f)})
    with pytest.raises(InputError, match=r"expected \('N', 3\)"):
        check_inputs(specs, {"x": np.zeros((4, 2), f), "y": np.zeros((4, 3), f)})


# --- compiled artifacts ---------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    """zoo's small_cnn (conv, BatchNorm, max/avg pool, Flatten, Gemm, Softmax), batch N."""
    model = with_batch(zoo.small_cnn())
    out = tmp_path_factory.mktemp("dyn") / "small_cnn.so"
    return model, graphopt.compile(model, output=out, dynamic_batch=True)


def test_one_artifact_runs_any_batch(small_cnn):
    model, art = small_cnn
    m = graphopt.load(art.path).manifest
    assert m["inputs"][0]["shape"] == ["N", 3, 32, 32]
    assert m["outputs"][0]["shape"] == ["N", 10]
    assert m["symbolic_dims"] == ["N"]
    v = m["verification"]
    assert v["ok"] and v["batches"] == [1, 3]
    assert sorted({o["batch"] for o in v["outputs"]}) == [1, 3]
    check_batches(graphopt.load(art.path), model, (1, 2, 8))


def test_verify_command_checks_a_dynamic_artifact(small_cnn):
    model, art = small_cnn
    report = verify(art.path, model)
    assert report["ok"] and report["batches"] == [1, 3]


def test_cli_compile_with_a_symbol_and_run_any_batch(tmp_path, capsys):
    model = with_batch(zoo.pool_variants(), "batch")
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "m.so"
    argv = ["compile", str(tmp_path / "m.onnx"), "-o", str(out), "--input-shape"]
    assert main([*argv, "input=B,4,15,15"]) == 0
    assert "B takes any size" in capsys.readouterr().out
    assert graphopt.load(out).manifest["outputs"][0]["shape"] == ["B", 8, 7, 7]
    assert main(["run", str(out), "--batch", "5", "--repeat", "1"]) == 0
    assert "shape (5, 8, 7, 7)" in capsys.readouterr().out
    check_batches(graphopt.load(out), model, (4,))


def test_a_reshape_that_fixes_the_batch_is_caught_by_verification(tmp_path):
    """mlp_head reshapes to [1, 16, 64]: it runs at batch 1 only (onnxruntime too).
    The check at batch 3 refuses it; no artifact is written."""
    out = tmp_path / "mlp.so"
    with pytest.raises(VerificationError, match="at batch 3: onnxruntime cannot run"):
        graphopt.compile(with_batch(zoo.mlp_head()), output=out, dynamic_batch=True)
    assert not out.exists()


@pytest.mark.slow
def test_resnet18_dynamic_batch_runs_batch_1_3_and_8(tmp_path):
    """The bar of issue 14: one ResNet-18 artifact, batches 1, 3 and 8 against onnxruntime."""
    model = with_batch(zoo.resnet18())
    art = graphopt.compile(model, output=tmp_path / "r18.so", dynamic_batch=True)
    assert art.manifest["inputs"][0]["shape"] == ["N", 3, 224, 224]
    check_batches(graphopt.load(art.path), model, (1, 3, 8))
