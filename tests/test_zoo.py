"""Every zoo model compiles for x86 and matches onnxruntime.

graphopt.compile verifies by default; the test checks again on its own, with a second
input seed, so a bug in the built-in verification cannot hide a wrong artifact.
"""

import numpy as np
import onnxruntime as ort
import pytest

import graphopt
from graphopt import zoo
from tests.conftest import zoo_model


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_matches_onnxruntime(name, tmp_path):
    model = zoo_model(name)
    artifact = graphopt.compile(model, "x86", tmp_path / f"{name}.so")
    v = artifact.manifest["verification"]
    assert v["ok"] and v["reference"] == "onnxruntime"
    assert [o["name"] for o in artifact.manifest["outputs"]] == [o.name for o in model.graph.output]

    inputs = artifact.random_inputs(seed=123)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, inputs)
    got = artifact.run(inputs)
    for out, exp in zip(artifact.output_names, expected, strict=True):
        np.testing.assert_allclose(got[out], exp, rtol=1e-3, atol=1e-4, err_msg=f"{name}:{out}")


def test_zoo_covers_the_ops_the_issue_names():
    ops = set()
    for name in zoo.ZOO:
        model = zoo_model(name)
        ops |= {n.op_type for n in model.graph.node}
        for n in model.graph.node:
            attrs = {a.name for a in n.attribute}
            if n.op_type in ("MaxPool", "AveragePool") and "ceil_mode" in attrs:
                ops.add(f"{n.op_type}:ceil_mode")
            if n.op_type == "Conv":
                ops |= {f"Conv:{a}" for a in attrs}
    wanted = {
        "Conv",
        "BatchNormalization",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Gemm",
        "MatMul",
        "Add",
        "Mul",
        "Concat",
        "Reshape",
        "Flatten",
        "Transpose",
        "Softmax",
        "Clip",
        "Relu",
        "MaxPool:ceil_mode",
        "AveragePool:ceil_mode",
        "Conv:group",
        "Conv:dilations",
        "Conv:strides",
        "Conv:auto_pad",
        "Conv:pads",
    }
    assert wanted <= ops, wanted - ops
