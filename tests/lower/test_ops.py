"""Op converters whose ONNX semantics are easy to get wrong, each checked against onnxruntime."""

import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import UnsupportedOpsError
from graphopt.frontends.onnx import onnx_to_graph
from graphopt.lower import CONVERTERS, unsupported_nodes
from graphopt.lower.relax import converter
from tests.conftest import make_model

C = {"int64": lambda *v: np.array(v, np.int64)}


def _check(model, tmp_path):
    artifact = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert artifact.manifest["verification"]["ok"]
    return artifact


CASES = {
    "softmax_opset11_axis1_coerces_to_2d": (
        [helper.make_node("Softmax", ["x"], ["y"], axis=1)],
        {"x": (2, 3, 4)},
        {"y": (2, 3, 4)},
        {},
        11,
    ),
    "logsoftmax_axis0": (
        [helper.make_node("LogSoftmax", ["x"], ["y"], axis=0)],
        {"x": (3, 4)},
        {"y": (3, 4)},
        {},
        17,
    ),
    "gemm_trans_alpha_beta": (
        [helper.make_node("Gemm", ["x", "b", "c"], ["y"], transA=1, transB=1, alpha=0.5, beta=2.0)],
        {"x": (4, 2)},
        {"y": (2, 3)},
        {"b": np.ones((3, 4), np.float32) * 0.3, "c": np.arange(3, dtype=np.float32)},
        17,
    ),
    "reshape_zero_and_minus_one": (
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        {"x": (2, 3, 4)},
        {"y": (2, 12)},
        {"s": C["int64"](0, -1)},
        17,
    ),
    "slice_negative_steps_and_clamping": (
        [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        {"x": (5, 6)},
        {"y": (3, 2)},
        {
            "st": C["int64"](-1, 1),
            "en": C["int64"](-100, 1000),
            "ax": C["int64"](0, 1),
            "sp": C["int64"](-2, 3),
        },
        17,
    ),
    "clip_attr_form_opset6": (
        [helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.25)],
        {"x": (3, 3)},
        {"y": (3, 3)},
        {},
        6,
    ),
    "clip_only_max": (
        [helper.make_node("Clip", ["x", "", "hi"], ["y"])],
        {"x": (3, 3)},
        {"y": (3, 3)},
        {"hi": np.float32(0.1)},
        17,
    ),
    "pad_constant_value": (
        [helper.make_node("Pad", ["x", "p", "v"], ["y"])],
        {"x": (1, 2, 3)},
        {"y": (1, 3, 6)},
        {"p": C["int64"](0, 1, 2, 0, 0, 1), "v": np.float32(1.5)},
        17,
    ),
    "hardswish_hardsigmoid_leakyrelu": (
        [
            helper.make_node("HardSwish", ["x"], ["a"]),
            helper.make_node("HardSigmoid", ["a"], ["b"], alpha=0.3, beta=0.4),
            helper.make_node("LeakyRelu", ["b"], ["y"], alpha=0.2),
        ],
        {"x": (4, 5)},
        {"y": (4, 5)},
        {},
        17,
    ),
    "reduce_mean_keepdims0_squeeze_unsqueeze": (
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0),
            helper.make_node("Unsqueeze", ["m", "ax"], ["u"]),
            helper.make_node("Squeeze", ["u", "ax"], ["y"]),
        ],
        {"x": (2, 3, 4)},
        {"y": (2, 4)},
        {"ax": C["int64"](-1)},
        17,
    ),
    "gather_negative_constant_indices": (
        [helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
        {"x": (2, 5)},
        {"y": (2, 2)},
        {"i": C["int64"](-1, 0)},
        17,
    ),
    "conv1d_same_lower_stride2": (
        [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2])],
        {"x": (1, 2, 9)},
        {"y": (1, 3, 5)},
        {"w": np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)},
        17,
    ),
    "avgpool_1d_include_pad_ceil": (
        [
            helper.make_node(
                "AveragePool",
                ["x"],
                ["y"],
                kernel_shape=[3],
                strides=[2],
                pads=[1, 1],
                count_include_pad=1,
                ceil_mode=1,
            )
        ],
        {"x": (1, 2, 8)},
        {"y": (1, 2, 5)},
        {},
        17,
    ),
    "maxpool_dilated": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])],
        {"x": (1, 1, 6, 6)},
        {"y": (1, 1, 4, 4)},
        {},
        17,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_onnxruntime(case, tmp_path):
    nodes, inputs, outputs, inits, opset = CASES[case]
    _check(make_model(nodes, inputs, outputs, inits, opset=opset), tmp_path)


def test_gather_with_runtime_int64_indices(tmp_path):
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, (2, 3))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, 3, 4))],
        [helper.make_tensor("table", TensorProto.FLOAT, (7, 4), np.arange(28, dtype=np.float32))],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ids = np.array([[0, 6, -1], [3, -7, 2]], np.int64)
    artifact = graphopt.compile(model, "x86", tmp_path / "g.so", verify_inputs={"ids": ids})
    assert artifact.manifest["verification"]["inputs"] == "user"


def test_unsupported_nodes_named_before_lowering():
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="ok"),
            helper.make_node("Celu", ["a"], ["b"], name="celu_1"),
            helper.make_node("MaxPool", ["b"], ["y", "idx"], name="pool_idx", kernel_shape=[2]),
        ],
        {"x": (1, 1, 4)},
        {"y": (1, 1, 3)},
    )
    bad = unsupported_nodes(onnx_to_graph(m))
    assert [(op, node) for op, node, _ in bad] == [("Celu", "celu_1"), ("MaxPool", "pool_idx")]
    assert "Indices" in bad[1][2]
    with pytest.raises(UnsupportedOpsError, match="Celu.*celu_1.*MaxPool.*pool_idx"):
        graphopt.compile(m, "x86")


def test_int64_constants_keep_their_width(tmp_path):
    # relax.const narrows int64 arrays to int32 unless told the dtype: a silent wrong answer.
    g = helper.make_graph(
        [helper.make_node("Add", ["ids", "big"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, (3,))],
        [helper.make_tensor_value_info("y", TensorProto.INT64, (3,))],
        [helper.make_tensor("big", TensorProto.INT64, (3,), [2**40, -(2**35), 7])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    artifact = graphopt.compile(model, "x86", tmp_path / "w.so")
    out = artifact(ids=np.array([1, 2, 3], np.int64))["y"]
    np.testing.assert_array_equal(out, [2**40 + 1, -(2**35) + 2, 10])


def test_average_pool_over_full_windows_divides_once():
    # Without pads every window holds prod(kernel) elements: avg_pool2d's own divisor is
    # exact, and a multiply by a map of ones would cost a pass (and block the x86 layout).
    from graphopt.lower import to_relax

    def lowered(**attrs) -> str:
        node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], **attrs)
        out = (1, 4, 4, 4) if "pads" in attrs else (1, 4, 3, 3)
        m = make_model([node], {"x": (1, 4, 6, 6)}, {"y": out})
        return to_relax(onnx_to_graph(m)).script()

    assert "multiply" not in lowered(strides=[2, 2])
    assert "multiply" in lowered(strides=[2, 2], pads=[1, 1, 1, 1])


def test_every_op_has_a_check_and_a_converter():
    for key, rule in CONVERTERS.items():
        assert callable(rule.check), key
        assert callable(converter(key)), f"{key}: relax.py has no converter {rule.lower!r}"


def test_import_lower_and_check_ops_without_tvm():
    """``graphopt inspect`` and ``prepare`` call unsupported_nodes before any TVM work."""
    code = (
        "import sys, graphopt.lower as L; from graphopt.ir import Graph; "
        "L.unsupported_nodes(Graph('g', 17)); assert 'tvm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
