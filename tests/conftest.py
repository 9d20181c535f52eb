"""Shared fixtures: zoo models built once per session, and a tiny model factory."""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import zoo

# A schedule rule with a Python error in its own code is a bug: in the tests it fails the
# compile instead of being logged and passed over (targets/_cpu_schedules.apply_rules).
os.environ.setdefault("GRAPHOPT_STRICT_RULES", "1")


@functools.cache
def zoo_model(name: str) -> onnx.ModelProto:
    return zoo.build(name)


def make_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    """Build a small ONNX model. ``inputs``/``outputs``: ``{name: shape}`` (float32)."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in dict(inits).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.fixture
def tiny_model() -> onnx.ModelProto:
    """x(1,2,4,4) -> Conv(3x3, pad 1) -> Relu -> y."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        {"x": (1, 2, 4, 4)},
        {"y": (1, 3, 4, 4)},
        {"w": w},
    )
