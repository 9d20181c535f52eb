"""graphopt.verify.compare: integer and bool outputs match exactly, floats within tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.verify import DEFAULT_ATOL, DEFAULT_RTOL, compare


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
    from graphopt.verify import tolerances

    assert tolerances("fp32") == tolerances("fp32", DEFAULT_RTOL, DEFAULT_ATOL)
    assert not tolerances("fp32").scaled and tolerances("bf16").scaled
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
    assert "bf16 tolerances" in tol.note() and tolerances("fp32").note() == ""
