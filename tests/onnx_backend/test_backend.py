"""graphopt.backend: ONNX's backend API over graphopt.compile, checked against onnxruntime;
and the regeneration command's worker pool surviving a crash and a hang."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphopt.backend as backend
from graphopt.errors import InputError, UnsupportedOpsError
from graphopt.targets import TARGETS, resolve
from tests.conftest import make_model
from tests.onnx_backend import _fake_worker, regenerate


def _two_outputs() -> onnx.ModelProto:
    """y = relu(a) + b, z = sigmoid(a): two inputs, two outputs in a fixed order."""
    return make_model(
        [
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Add", ["r", "b"], ["y"]),
            helper.make_node("Sigmoid", ["a"], ["z"]),
        ],
        {"a": (2, 5), "b": (2, 5)},
        {"z": (2, 5), "y": (2, 5)},
    )


def _ort(model: onnx.ModelProto, feed: dict) -> list:
    return ort.InferenceSession(model.SerializeToString()).run(None, feed)


def test_prepare_and_run_match_onnxruntime_by_position_and_name():
    model = _two_outputs()
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 5)).astype(np.float32) for _ in range(2))
    z, y = _ort(model, {"a": a, "b": b})
    rep = backend.prepare(model)
    try:
        out = rep.run([a, b])
        assert len(out) == 2
        np.testing.assert_allclose(out[0], z, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[1], y, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["y"], out[1])
        np.testing.assert_array_equal(rep.run({"b": b, "a": a}).z, out[0])
        with pytest.raises(InputError, match="got 1 input"):
            rep.run([a])
        with pytest.raises(InputError, match="no input.* c;"):
            rep.run({"a": a, "b": b, "c": b})
    finally:
        rep.close()
    assert not rep.artifact.path.parent.exists()  # the temporary artifact is gone


@pytest.mark.parametrize("form", ["bytes", "path"])
def test_run_model_takes_bytes_or_a_path_and_one_array(form, tmp_path):
    model = make_model([helper.make_node("Tanh", ["x"], ["y"])], {"x": (3, 4)}, {"y": (3, 4)})
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    given = model.SerializeToString()
    if form == "path":
        given = tmp_path / "tanh.onnx"
        onnx.save(model, given)
    (y,) = backend.run_model(given, x)
    np.testing.assert_allclose(y, _ort(model, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_run_node_infers_or_takes_output_types():
    node = helper.make_node("Gemm", ["a", "b"], ["c"], transB=1, alpha=0.5)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((5, 4)).astype(np.float32)
    inferred = backend.run_node(node, [a, b])
    given = backend.run_node(node, [a, b], outputs_info=[(np.float32, (3, 5))], opset_version=13)
    ref = helper.make_model(
        helper.make_graph(
            [node],
            "g",
            [
                helper.make_tensor_value_info("a", TensorProto.FLOAT, a.shape),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, b.shape),
            ],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, (3, 5))],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    ref.ir_version = 8
    (expected,) = _ort(ref, {"a": a, "b": b})
    np.testing.assert_allclose(inferred[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(given["c"], expected, rtol=1e-5, atol=1e-5)


def test_an_op_graphopt_cannot_compile_is_refused_at_prepare():
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="example.test")
    model = make_model([node], {"x": (2, 3)}, {"y": (2, 3)})
    model.opset_import.append(helper.make_opsetid("example.test", 1))
    with pytest.raises(UnsupportedOpsError, match="Frobnicate"):
        backend.prepare(model)


def test_supported_devices_follow_the_targets():
    cuda_here = TARGETS["cuda"].cannot_run_here(resolve("cuda").tvm) is None
    assert backend.supports_device("CPU")
    assert backend.supports_device("CUDA") is cuda_here
    assert not backend.supports_device("CUDA:1")
    assert not backend.supports_device("TPU")
    assert backend.GraphoptBackend.target_for("CUDA:0") == "cuda"


def test_the_regeneration_pool_outlives_a_crash_and_a_hang():
    pool = regenerate.Pool(2, "unused", timeout=5.0, worker=_fake_worker.worker)
    seen = []
    names = ["ok1", "crash", "bad", "hang", "ok2", "ok3"]
    outcomes = pool.run(names, lambda name, outcome: seen.append(name))
    assert sorted(seen) == sorted(names)
    assert outcomes["crash"][1].startswith("crash:")
    assert outcomes["hang"] == ("fail", "timeout: over 5 s")
    assert outcomes["bad"] == ("fail", "UnsupportedOpsError: no")
    assert all(outcomes[n] == ("pass", "") for n in ("ok1", "ok2", "ok3"))


def test_shapes_from_input_values_compile_per_value_at_run():
    """Pad whose pads and value are graph inputs: compile refuses it, the backend compiles
    one artifact per distinct pads/value at run (cached), each matching onnxruntime."""
    model = onnx.helper.make_model(
        helper.make_graph(
            [helper.make_node("Pad", ["x", "pads", "value"], ["y"])],
            "pad_inputs",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3)),
                helper.make_tensor_value_info("pads", TensorProto.INT64, (4,)),
                helper.make_tensor_value_info("value", TensorProto.FLOAT, ()),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ("h", "w"))],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    rep = backend.prepare(model)
    assert isinstance(rep, backend.SpecializingRep)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for pads, value in (([0, 1, 1, 0], 1.5), ([1, 0, 0, 2], -2.0), ([0, 1, 1, 0], 1.5)):
        feed = {"x": x, "pads": np.array(pads, np.int64), "value": np.array(value, np.float32)}
        (y,) = rep.run(feed)
        (expected,) = _ort(model, feed)
        np.testing.assert_array_equal(y, expected)
    assert len(rep._reps) == 2  # the repeated values reused their artifact
    rep.close()


def test_a_specialized_model_that_still_cannot_compile_is_refused_at_run():
    """Reshape's shape as an input makes a SpecializingRep; an op graphopt has no lowering
    for is still refused, naming it, when run compiles the specialized model."""
    model = onnx.helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Reshape", ["x", "shape"], ["r"]),
                helper.make_node("Frobnicate", ["r"], ["y"], domain="example.test"),
            ],
            "reshape_inputs",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3)),
                helper.make_tensor_value_info("shape", TensorProto.INT64, (2,)),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ("h", "w"))],
        ),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("example.test", 1)],
    )
    rep = backend.prepare(model)
    assert isinstance(rep, backend.SpecializingRep)
    feed = {"x": np.ones((2, 3), np.float32), "shape": np.array([3, 2], np.int64)}
    with pytest.raises(UnsupportedOpsError, match="Frobnicate"):
        rep.run(feed)
    rep.close()
