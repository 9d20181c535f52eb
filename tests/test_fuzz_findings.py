"""What the compile fuzzer (:mod:`tests.test_fuzz`) found, one small model each.

Each of these models passes ``onnx.checker`` and ONNX shape inference, and used to end
in an internal error (exit 1), in a TVM error naming no node, or in a stray
"BlockBuilder destroyed" line after the error line. Each is now refused before TVM does
any work with one ``error:`` line naming the node and the reason, or compiles.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.cli import main
from tests.conftest import make_model

W = np.ones((3, 2, 3, 3), np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def unknown(rank: int) -> tuple[str, ...]:
    """An output shape of ``rank`` unknown dims: shape inference fills them in."""
    return tuple(f"d{i}" for i in range(rank))


def one_node(op: str, inputs, shape, rank_out: int, inits=(), **attrs) -> onnx.ModelProto:  # noqa: ANN001
    node = helper.make_node(op, ["x", *inputs], ["y"], name="n", **attrs)
    return make_model([node], {"x": shape}, {"y": unknown(rank_out)}, dict(inits))


def lstm_with_b_equal_w() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w, r = rng.standard_normal((1, 16, 3)), rng.standard_normal((1, 16, 4))
    node = helper.make_node("LSTM", ["x", "w", "r", "w"], ["y"], name="n", hidden_size=4)
    inits = {"w": w.astype(np.float32), "r": r.astype(np.float32)}
    return make_model([node], {"x": (2, 1, 3)}, {"y": unknown(4)}, inits)


def initializer_retyped() -> onnx.ModelProto:
    """The weight's data type says int16, its bytes are float32's: twice too many."""
    model = one_node("Conv", ["w"], (1, 2, 4, 4), 4, {"w": W})
    model.graph.initializer[0].data_type = TensorProto.INT16
    return model


def weight_retyped() -> onnx.ModelProto:
    """A float32 weight relabeled uint32 (same size): Conv over float and uint32."""
    model = one_node("Conv", ["w"], (1, 2, 4, 4), 4, {"w": W})
    model.graph.initializer[0].data_type = TensorProto.UINT32
    return model


def no_outputs() -> onnx.ModelProto:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": (2,)}, {"y": (2,)})
    del model.graph.output[:]
    return model


def opset_twice() -> onnx.ModelProto:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": (2,)}, {"y": (2,)})
    model.opset_import.append(helper.make_opsetid("ai.onnx", 6))
    return model


def complex_input() -> onnx.ModelProto:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": (2,)}, {"y": (2,)})
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.COMPLEX128
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.COMPLEX128
    return model


def untyped_output() -> onnx.ModelProto:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": (2,)}, {"y": (2,)})
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    return model


def min_with_blank_input() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Min", ["x", ""], ["y"], name="n")], {"x": (2,)}, {"y": (2,)}
    )


REFUSED = {
    # frontend: onnx.checker lets these through
    "initializer-bytes": (initializer_retyped, "initializer 'w' cannot be read"),
    "no-outputs": (no_outputs, "no outputs"),
    "opset-twice": (opset_twice, "imports opset domain 'ai.onnx' twice"),
    "untyped-output": (untyped_output, "graph output 'y' declares no element type"),
    # lowering checks: ONNX shape inference lets these through, TVM failed on them
    "conv-channels": (
        lambda: one_node("Conv", ["w"], (1, 3, 4, 4), 4, {"w": W}),
        "weight shape (3, 2, 3, 3) and group=1 do not fit",
    ),
    "conv-weight-rank": (
        lambda: one_node("Conv", ["w"], (1, 2, 4, 4), 4, {"w": W[..., None]}, kernel_shape=[3, 3]),
        "do not fit together",
    ),
    "conv-group": (
        lambda: one_node("Conv", ["w"], (1, 2, 4, 4), 4, {"w": W}, group=2),
        "group=2 do not fit",
    ),
    "conv-bias": (
        lambda: one_node(
            "Conv", ["w", "b"], (1, 2, 4, 4), 4, {"w": W, "b": np.ones(2, np.float32)}
        ),
        "bias shape (2,)",
    ),
    "conv-window": (
        lambda: one_node("Conv", ["w"], (1, 2, 2, 2), 4, {"w": W}),
        "larger than the padded input",
    ),
    "conv-auto-pad": (
        lambda: one_node("Conv", ["w"], (1, 2, 4, 4), 4, {"w": W}, auto_pad="FOO"),
        "auto_pad='FOO'",
    ),
    "pool-window": (
        lambda: one_node("MaxPool", [], (1, 2, 4, 4), 4, kernel_shape=[5, 5]),
        "larger than the padded input",
    ),
    "reshape-count": (
        lambda: one_node("Reshape", ["s"], (2, 3), 2, {"s": i64(4, 2)}),
        "cannot reshape [2, 3] (6 elements) to [4, 2]",
    ),
    "gemm-c": (
        lambda: one_node("Gemm", ["b", "c"], (1, 3), 2, {"b": np.ones((3, 5), np.float32), "c": W}),
        "C [3, 2, 3, 3] does not broadcast to the [1, 5] result",
    ),
    "global-pool-rank": (
        lambda: one_node("GlobalAveragePool", [], (3, 4), 2),
        "global pooling needs N, C and spatial dims",
    ),
    "flatten-axis": (
        lambda: one_node("Flatten", [], (1, 4, 3, 3), 2, axis=2**62),
        "axis=4611686018427387904 is outside [-4, 4]",
    ),
    "transpose-perm": (
        lambda: one_node("Transpose", [], (1, 4, 6, 1), 3, perm=[0, 2, 1]),
        "not a permutation of the 4 axes",
    ),
    "pad-value": (
        lambda: one_node("Pad", ["p", "v"], (4,), 1, {"p": i64(1, 0), "v": np.ones(2, np.float32)}),
        "must hold one value",
    ),
    "clip-bounds": (
        lambda: one_node("Clip", ["lo"], (4,), 1, {"lo": np.ones(2, np.float32)}),
        "min and max must be scalars",
    ),
    "gather-empty": (
        lambda: one_node("Gather", ["i"], (4, 3), 2, {"i": np.zeros(0, np.int64)}),
        "empty tensors are not supported",
    ),
    "mixed-types": (weight_retyped, "inputs of different element types (float32, uint32)"),
    "complex": (complex_input, "element type complex128"),
    "blank-input": (min_with_blank_input, "input 1 is empty"),
    # expand-rnn: B must be [directions, 8 * hidden]; numpy broadcasting failed instead
    "lstm-bias-shape": (lstm_with_b_equal_w, "input B ('w') has shape (1, 16, 3)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_one_error_line(case, tmp_path, capsys):
    build, reason = REFUSED[case]
    path = tmp_path / "m.onnx"
    path.write_bytes(build().SerializeToString())
    out = tmp_path / "m.so"
    assert main(["compile", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert reason in err[0]
    assert not out.exists()


def test_flatten_negative_axis_counts_from_the_rank(tmp_path):
    """Flatten's axis is in [-r, r]: -3 on a rank-4 input is axis 1 (it was taken as 2)."""
    model = one_node("Flatten", [], (1, 4, 3, 3), 2, axis=-3)
    artifact = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert artifact.manifest["verification"]["ok"]
    assert artifact.manifest["outputs"][0]["shape"] == [1, 36]


def test_pow_with_an_integer_exponent(tmp_path):
    """ONNX Pow lets the exponent's type differ from the base's (x ** int64 2)."""
    exponent = numpy_helper.from_array(np.array(2, np.int64), "e")
    model = one_node("Pow", ["e"], (2, 3), 2)
    model.graph.initializer.append(exponent)
    artifact = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert artifact.manifest["verification"]["ok"]


def test_scalar_axes_are_read_as_one_axis(tmp_path):
    """ONNX wants Unsqueeze's axes 1-D; shape inference and onnxruntime take a scalar too
    (lowering used to iterate over the 0-d array)."""
    model = one_node("Unsqueeze", ["a"], (2, 3), 3, {"a": np.array(0, np.int64)})
    artifact = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert artifact.manifest["outputs"][0]["shape"] == [1, 2, 3]
