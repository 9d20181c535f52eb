"""Ops lowered through TVM's ONNX converters (graphopt.lower._tvm_onnx) and graphopt's
newer hand-written ones, each a one-node model checked against onnxruntime; and the
refusals where TVM's converter would be wrong."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import UnsupportedOpsError
from graphopt.lower import CONVERTERS
from graphopt.lower._ops import TVM_OPS
from tests.conftest import make_model

I64 = lambda *v: np.array(v, np.int64)  # noqa: E731


def _typed_model(node, inputs, outputs, inits=(), opset=18):
    """A one-node model; ``inputs``/``outputs``: ``{name: (shape, TensorProto type)}``."""
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "test",
        [info(n, t, s) for n, (s, t) in inputs.items()],
        [info(n, t, s) for n, (s, t) in outputs.items()],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in dict(inits).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _verified(model, tmp_path):
    artifact = graphopt.compile(model, "x86", tmp_path / "m.so")
    assert artifact.manifest["verification"]["ok"]
    return artifact


def _against_onnxruntime(model, feed, tmp_path):
    """For inputs seeded random values would make invalid (shapes, class indices)."""
    artifact = graphopt.compile(model, "x86", tmp_path / "m.so", verify=False)
    want = ort.InferenceSession(model.SerializeToString()).run(None, feed)
    got = list(artifact.run(feed).values())
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5)


F, B, L = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64

CASES = {
    "resize_linear_half_pixel": make_model(
        [helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear")],
        {"x": (1, 2, 4, 4)},
        {"y": (1, 2, 8, 8)},
        {"s": np.array([1, 1, 2, 2], np.float32)},
        18,
    ),
    "resize_nearest_sizes": make_model(
        [helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="nearest")],
        {"x": (1, 1, 3, 3)},
        {"y": (1, 1, 5, 6)},
        {"sz": I64(1, 1, 5, 6)},
        18,
    ),
    "layernorm_negative_axis_three_outputs": make_model(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y", "m", "r"], axis=-2)],
        {"x": (2, 3, 4)},
        {"y": (2, 3, 4), "m": (2, 1, 1), "r": (2, 1, 1)},
        {"g": np.full((3, 4), 1.5, np.float32), "b": np.full((3, 4), 0.5, np.float32)},
        17,
    ),
    "instancenorm_lrn": make_model(
        [
            helper.make_node("InstanceNormalization", ["x", "s", "c"], ["n"]),
            helper.make_node("LRN", ["n"], ["y"], size=3),
        ],
        {"x": (1, 4, 3, 3)},
        {"y": (1, 4, 3, 3)},
        {"s": np.arange(4, dtype=np.float32), "c": np.ones(4, np.float32)},
        17,
    ),
    "groupnorm": make_model(
        [helper.make_node("GroupNormalization", ["x", "g", "b"], ["y"], num_groups=2)],
        {"x": (1, 4, 3, 3)},
        {"y": (1, 4, 3, 3)},
        {"g": np.linspace(0.5, 2, 4, dtype=np.float32), "b": np.full(4, 0.5, np.float32)},
        21,
    ),
    "conv_transpose_groups_output_padding": make_model(
        [
            helper.make_node(
                "ConvTranspose", ["x", "w"], ["y"], group=2, strides=[2, 2], output_padding=[1, 0]
            )
        ],
        {"x": (1, 4, 3, 3)},
        {"y": (1, 2, 8, 7)},
        {"w": np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)},
        17,
    ),
    "conv_transpose_output_shape": make_model(
        [
            helper.make_node(
                "ConvTranspose", ["x", "w"], ["y"], strides=[3, 2], output_shape=[10, 8]
            )
        ],
        {"x": (1, 1, 3, 3)},
        {"y": (1, 2, 10, 8)},
        {"w": np.random.default_rng(2).standard_normal((1, 2, 3, 3)).astype(np.float32)},
        17,
    ),
    "batchnorm_training_mode_running_stats": make_model(
        [
            helper.make_node(
                "BatchNormalization",
                ["x", "s", "b", "m", "v"],
                ["y", "rm", "rv"],
                training_mode=1,
                momentum=0.8,
            )
        ],
        {"x": (2, 3, 4)},
        {"y": (2, 3, 4), "rm": (3,), "rv": (3,)},
        {
            "s": np.array([1.0, 2.0, 0.5], np.float32),
            "b": np.array([0.0, 1.0, -1.0], np.float32),
            "m": np.array([0.1, 0.2, 0.3], np.float32),
            "v": np.array([1.0, 2.0, 3.0], np.float32),
        },
        15,
    ),
    "conv3d_maxpool3d_avgpool3d": make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 6),
            helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[2, 2, 2]),
            helper.make_node("AveragePool", ["m"], ["y"], kernel_shape=[2, 2, 2], pads=[1] * 6),
        ],
        {"x": (1, 2, 5, 5, 5)},
        {"y": (1, 3, 5, 5, 5)},
        {"w": np.random.default_rng(1).standard_normal((3, 2, 3, 3, 3)).astype(np.float32)},
        17,
    ),
    "activations": make_model(
        [
            helper.make_node("Elu", ["x"], ["a"]),
            helper.make_node("Selu", ["a"], ["b"]),
            helper.make_node("Mish", ["b"], ["c"]),
            helper.make_node("Softplus", ["c"], ["d"]),
            helper.make_node("PRelu", ["d", "slope"], ["y"]),
        ],
        {"x": (2, 3)},
        {"y": (2, 3)},
        {"slope": np.array([0.1, 0.2, 0.3], np.float32)},
        18,
    ),
    "pad_reflect_split_concat": make_model(
        [
            helper.make_node("Pad", ["x", "p"], ["p1"], mode="reflect"),
            helper.make_node("Split", ["p1", "sp"], ["a", "b"], axis=-1),
            helper.make_node("Concat", ["b", "a"], ["y"], axis=-1),
        ],
        {"x": (2, 4)},
        {"y": (2, 6)},
        {"p": I64(0, 1, 0, 1), "sp": I64(2, 4)},
        18,
    ),
    "where_broadcast": _typed_model(
        helper.make_node("Where", ["c", "x", "y"], ["z"]),
        {"c": ((2, 1), B), "x": ((2, 3), F), "y": ((3,), F)},
        {"z": ((2, 3), F)},
    ),
    "argmax_negative_axis": _typed_model(
        helper.make_node("ArgMax", ["x"], ["y"], axis=-1, keepdims=0),
        {"x": ((2, 5), F)},
        {"y": ((2,), L)},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name, tmp_path):
    """Each compiles and verifies against onnxruntime (graphopt.compile checks it; integer
    outputs are compared exactly); the target indices of nll_loss must stay in range."""
    _verified(CASES[name], tmp_path)


def test_nll_loss_with_weight_and_ignore_index(tmp_path):
    model = _typed_model(
        helper.make_node("NegativeLogLikelihoodLoss", ["x", "t", "w"], ["y"], ignore_index=1),
        {"x": ((3, 4, 2), F), "t": ((3, 2), L)},
        {"y": ((), F)},
        {"w": np.array([0.5, 1.0, 2.0, 3.0], np.float32)},
    )
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((3, 4, 2)).astype(np.float32), "t": I64(0, 1, 3, 2, 1, 3)}
    _against_onnxruntime(model, {"x": feed["x"], "t": feed["t"].reshape(3, 2)}, tmp_path)


def test_expand_to_a_runtime_shape_the_model_declares(tmp_path):
    model = _typed_model(
        helper.make_node("Expand", ["x", "s"], ["y"]),
        {"x": ((3, 1), F), "s": ((2,), L)},
        {"y": ((3, 4), F)},
    )
    x = np.arange(3, dtype=np.float32).reshape(3, 1)
    _against_onnxruntime(model, {"x": x, "s": I64(3, 4)}, tmp_path)


def test_shape_input_only_a_run_knows_is_refused(tmp_path):
    """Expand to a shape that is a graph input and an undeclared output shape: refused
    at compile time, naming the node."""
    model = _typed_model(
        helper.make_node("Tile", ["x", "r"], ["y"], name="tile"),
        {"x": ((3, 1), F), "r": ((2,), L)},
        {"y": (["a", "b"], F)},
    )
    with pytest.raises(UnsupportedOpsError, match="tile"):
        graphopt.compile(model, "x86", tmp_path / "m.so")


@pytest.mark.parametrize(
    ("node", "why"),
    [
        (helper.make_node("Mod", ["x", "x"], ["y"], name="m"), "fmod=0"),
        (helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=1, mode="CRD"), "mode"),
    ],
)
def test_where_tvm_is_wrong_it_is_refused(node, why, tmp_path):
    model = make_model([node], {"x": (1, 2, 2, 2)}, {"y": (1, 2, 2, 2)}, opset=28)
    with pytest.raises(UnsupportedOpsError, match=why):
        graphopt.compile(model, "x86", tmp_path / "m.so")


def test_table_has_one_rule_per_op():
    own = {op for op, rule in CONVERTERS.items() if rule.lower != "tvm_onnx"}
    assert not own & set(TVM_OPS)
    assert all(CONVERTERS[op].lower == "tvm_onnx" for op in TVM_OPS)


@pytest.mark.parametrize(
    ("mode", "coords", "scales", "out"),
    [
        ("linear", "half_pixel", (1, 1, 0.6, 0.6), (1, 1, 2, 2)),
        ("cubic", "half_pixel", (1, 1, 1.5, 2.0), (1, 1, 6, 8)),
        ("nearest", "asymmetric", (1, 1, 2.0, 3.0), (1, 1, 8, 12)),
    ],
)
def test_resize_with_scales_given_at_run_time(mode, coords, scales, out, tmp_path):
    """Scales that only a run knows: graphopt's own Resize computes the coordinates from
    the scales tensor (TVM's converter would use size ratios, wrong for 0.6 on 4)."""
    node = helper.make_node(
        "Resize", ["x", "", "s"], ["y"], mode=mode, coordinate_transformation_mode=coords
    )
    model = _typed_model(node, {"x": ((1, 1, 4, 4), F), "s": ((4,), F)}, {"y": (out, F)})
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 4)).astype(np.float32)
    _against_onnxruntime(model, {"x": x, "s": np.array(scales, np.float32)}, tmp_path)


def test_reduce_with_axes_given_at_run_time(tmp_path):
    """keepdims=1: the reduced axes are the static output's 1s (where the input's are not)."""
    node = helper.make_node("ReduceSum", ["x", "a"], ["y"], keepdims=1)
    model = _typed_model(node, {"x": ((3, 4, 5), F), "a": ((1,), L)}, {"y": ((3, 1, 5), F)})
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    _against_onnxruntime(model, {"x": x, "a": I64(-2)}, tmp_path)


def test_reduce_with_ambiguous_runtime_axes_is_refused(tmp_path):
    node = helper.make_node("ReduceSum", ["x", "a"], ["y"], keepdims=0, name="r")
    model = _typed_model(node, {"x": ((3, 2, 2), F), "a": ((1,), L)}, {"y": ((3, 2), F)})
    with pytest.raises(UnsupportedOpsError, match="ambiguous"):
        graphopt.compile(model, "x86", tmp_path / "m.so")


def test_integer_div_truncates_toward_zero(tmp_path):
    I32 = TensorProto.INT32
    model = _typed_model(
        helper.make_node("Div", ["x", "y"], ["z"]),
        {"x": ((6,), I32), "y": ((6,), I32)},
        {"z": ((6,), I32)},
    )
    x = np.array([7, -7, 7, -7, 0, 9], np.int32)
    y = np.array([2, 2, -2, -2, 3, 3], np.int32)
    _against_onnxruntime(model, {"x": x, "y": y}, tmp_path)


def test_top_k_with_k_given_at_run_time(tmp_path):
    model = _typed_model(
        helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1),
        {"x": ((2, 5), F), "k": ((1,), L)},
        {"v": ((2, 3), F), "i": ((2, 3), L)},
    )
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    _against_onnxruntime(model, {"x": x, "k": I64(3)}, tmp_path)


def test_dropout_that_may_train_is_refused(tmp_path):
    model = _typed_model(
        helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="drop"),
        {"x": ((2, 3), F), "r": ((), F), "t": ((), B)},
        {"y": ((2, 3), F)},
    )
    with pytest.raises(UnsupportedOpsError, match="drop.*at random"):
        graphopt.compile(model, "x86", tmp_path / "m.so")
