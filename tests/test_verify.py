"""graphopt.verify.compare: integer and bool outputs match exactly, floats within tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.verify import DEFAULT_ATOL, DEFAULT_RTOL, compare, tolerances


def _one(actual, expected) -> dict:  # noqa: ANN001
    return compare({"y": actual}, {"y": expected}, DEFAULT_RTOL, DEFAULT_ATOL)["outputs"][0]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.int8])
def test_an_integer_off_by_one_fails_where_the_float_tolerance_would_pass_it(dtype):
    expected = np.array([100, 5, 7], dtype)
    actual = np.array([101, 5, 7], dtype)  # |diff| 1 <= atol + rtol * 100 for rtol=1e-2
    assert np.allclose(actual, expected, rtol=1e-2, atol=DEFAULT_ATOL)
    out = compare({"y": actual}, {"y": expected}, rtol=1e-2, atol=DEFAULT_ATOL)["outputs"][0]
    assert not out["ok"] and out["exact"]
    assert (out["mismatched"], out["max_abs_diff"]) == (1, 1.0)
    assert _one(expected.copy(), expected) == {
        "name": "y",
        "ok": True,
        "exact": True,
        "max_abs_diff": 0.0,
    }


def test_large_int64_values_are_compared_as_integers_not_floats():
    big = np.array([2**62, 2**62 + 1], np.int64)  # equal once converted to float64
    assert np.allclose(big[::-1].astype(np.float64), big.astype(np.float64), rtol=0, atol=0)
    assert not _one(big[::-1].copy(), big)["ok"]


def test_bool_outputs_are_compared_exactly():
    expected = np.array([[True, False], [False, True]])
    assert _one(expected.copy(), expected)["ok"]
    flipped = expected.copy()
    flipped[0, 1] = True
    out = _one(flipped, expected)
    assert not out["ok"] and out["mismatched"] == 1


def test_floats_keep_their_tolerance():
    expected = np.array([1000.0, 1.0], np.float32)
    off = np.array([0.5, 0.0], np.float32)  # 0.5 <= 1e-4 + 1e-3 * 1000
    out = _one(expected + off, expected)
    assert out["ok"] and "exact" not in out
    assert not _one(expected + 4 * off, expected)["ok"]


def test_an_integer_output_verifies_exactly_against_onnxruntime():
    """A compiled Cast(float -> int32) checked by graphopt.compile: the report marks the
    int output exact, and it agrees with onnxruntime element for element."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=6)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = (np.random.default_rng(0).standard_normal((4, 8)) * 10).astype(np.float32)
    art = graphopt.compile(model, verify_inputs={"x": x})
    report = art.manifest["verification"]
    assert report["ok"] and report["outputs"][0]["exact"]
    assert report["outputs"][0]["max_abs_diff"] == 0.0


def test_reduced_precision_tolerances_scale_atol_with_the_output_range():
    fp32 = tolerances("fp32")
    assert (fp32.rtol, fp32.atol) == (DEFAULT_RTOL, DEFAULT_ATOL)
    assert fp32.scaled and tolerances("bf16").scaled
    tol = tolerances("bf16")
    big = np.array([140.0, 0.0, -90.0], np.float32)  # ResNet-50 logits are this large
    off = big + np.float32(0.6)  # bf16's error there (OpenVINO bf16: the same)
    assert not compare({"y": off}, {"y": big}, tol.rtol, tol.atol)["ok"]  # absolute atol
    report = compare({"y": off}, {"y": big}, tol.rtol, tol.atol, scaled=True)
    assert report["ok"] and report["atol_scaled"]
    assert report["outputs"][0]["atol_used"] == pytest.approx(tol.atol * 140.0)
    # a real error still fails: a third of the range
    bad = big + np.float32(45.0)
    assert not compare({"y": bad}, {"y": big}, tol.rtol, tol.atol, scaled=True)["ok"]
    # an atol the user gives is absolute
    assert not tolerances("bf16", atol=1e-3).scaled
    assert not tolerances("fp32", atol=1e-4).scaled
    assert "bf16 tolerances" in tol.note() and tolerances("fp32", atol=1e-4).note() == ""
    assert fp32.note() == ", atol relative to each output's range"


def test_a_correct_conv_with_large_outputs_verifies_in_fp32():
    """float32 rounding grows with what a kernel sums: a 3x3 conv of 64 channels on
    standard-normal data and weights reaches ~117, where onnxruntime itself is 3.6e-5 off
    float64 and the Winograd conv 2.7e-4 off onnxruntime (2.3e-6 of the range). A fixed
    atol of 1e-4 refused that artifact; the range-relative one passes it and still fails
    an element off by a hundredth of the range."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 56, 56])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 56, 56])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    art = graphopt.compile(model)
    report = art.manifest["verification"]
    assert report["ok"] and report["atol_scaled"]
    out = report["outputs"][0]
    assert out["atol_used"] > 50 * DEFAULT_ATOL  # the range, not 1
    got = art.run(art.random_inputs(0))["y"]
    wrong = got.copy()
    wrong.flat[123] += 0.01 * float(np.abs(got).max())  # a hundredth of the range
    fp32 = tolerances("fp32")
    assert not compare({"y": wrong}, {"y": got}, fp32.rtol, fp32.atol, scaled=True)["ok"]
