"""annotate-conv-groups: annotates Conv/Gemm + bias + activation chains; computes nothing new."""

import numpy as np
from onnx import helper

from graphopt.frontends.onnx import onnx_to_graph
from graphopt.passes import AnnotateConvGroups, FuseConvAct, build_pipeline, run_passes
from graphopt.passes.annotate_conv_groups import groups
from tests.conftest import make_model, zoo_model
from tests.passes._util import random_inputs, run_ort


def test_gemm_bias_relu_is_one_group_and_numbers_do_not_change():
    rng = np.random.default_rng(0)
    m = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
            helper.make_node("Add", ["mm", "b"], ["a"], name="bias"),
            helper.make_node("Relu", ["a"], ["y"], name="relu"),
        ],
        {"x": (2, 8)},
        {"y": (2, 4)},
        {"w": rng.standard_normal((8, 4)).astype(np.float32), "b": np.ones(4, np.float32)},
    )
    g = onnx_to_graph(m)
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    r = AnnotateConvGroups()(g)
    assert r.stats == {"MatMul+Add+Relu": 1}
    assert groups(r.graph) == {"mm": ["mm", "bias", "relu"]}
    np.testing.assert_array_equal(run_ort(r.graph, inputs)[0], before[0])


def test_resnet18_groups_each_conv_relu():
    g = onnx_to_graph(zoo_model("resnet18"))
    g, _ = run_passes(g, build_pipeline("fold-constants,fold-batchnorm,annotate-conv-groups"))
    found = groups(g)
    assert found and all(len(m) == 2 for m in found.values())


def test_shared_output_or_no_activation_is_not_grouped():
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),  # not an anchor
            helper.make_node("MatMul", ["r", "x2"], ["mm"]),
            helper.make_node("Relu", ["mm"], ["y1"]),
            helper.make_node("Neg", ["mm"], ["y2"]),  # mm has two users
        ],
        {"x": (2, 2), "x2": (2, 2)},
        {"y1": (2, 2), "y2": (2, 2)},
    )
    r = AnnotateConvGroups()(onnx_to_graph(m))
    assert not r.modified and groups(r.graph) == {}


def test_the_old_name_still_names_the_pass():
    assert FuseConvAct is AnnotateConvGroups
    assert [p.name for p in build_pipeline("fuse-conv-act")] == ["annotate-conv-groups"]
    assert build_pipeline(None, disable=["fuse-conv-act"])[-1].name == "dead-code"
    assert "annotate-conv-groups" not in [
        p.name for p in build_pipeline(None, disable=["fuse-conv-act"])
    ]
