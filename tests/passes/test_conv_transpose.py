"""conv-transpose-to-conv: a 2-D ConvTranspose becomes Conv (+ Concat) + DepthToSpace (+
Slice) computing the same numbers, checked with onnxruntime on the graph before and after
the pass. The compiled forms (packed conv rules, x86 and ARM) are tested with the
``decoder`` block in tests/targets/test_conv_families.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from graphopt.frontends.onnx import onnx_to_graph
from graphopt.passes import ConvTransposeToConv
from graphopt.passes.conv_transpose import check
from tests.conftest import make_model
from tests.passes._util import random_inputs, run_ort


def _model(  # noqa: ANN202, PLR0913
    cin: int,
    cout: int,
    k,  # noqa: ANN001 - int or (kh, kw)
    stride: int,
    pads=(0, 0, 0, 0),  # noqa: ANN001 - None: auto_pad SAME_UPPER
    out_pad=(0, 0),  # noqa: ANN001
    group: int = 1,
    hw=(5, 6),  # noqa: ANN001
    bias: bool = True,
    **extra,  # noqa: ANN003
):
    kh, kw = (k, k) if isinstance(k, int) else k
    rng = np.random.default_rng([cin, cout, kh, kw, stride])
    inits = {"w": rng.standard_normal((cin, cout // group, kh, kw)).astype(np.float32)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = rng.standard_normal(cout).astype(np.float32)
        inputs.append("b")
    attrs = {"kernel_shape": [kh, kw], "strides": [stride, stride]}
    if pads is None:
        attrs["auto_pad"] = "SAME_UPPER"
    else:
        attrs["pads"] = list(pads)
    if group > 1:
        attrs["group"] = group
    if any(out_pad):
        attrs["output_padding"] = list(out_pad)
    attrs.update(extra)
    node = helper.make_node("ConvTranspose", inputs, ["y"], name="up", **attrs)
    h, w = hw
    dil = extra.get("dilations", [1, 1])
    if pads is None:
        out = [stride * h, stride * w]
    else:
        axes = zip((h, w), out_pad, (kh, kw), dil, pads[:2], pads[2:], strict=True)
        out = [stride * (n - 1) + op + (kk - 1) * d + 1 - pb - pe for n, op, kk, d, pb, pe in axes]
    model = make_model([node], {"x": (1, cin, h, w)}, {"y": (1, cout, *out)}, inits)
    return onnx_to_graph(model)


def _same_after_pass(graph) -> dict:  # noqa: ANN001
    inputs = random_inputs(graph)
    before = run_ort(graph, inputs)[0]
    result = ConvTransposeToConv()(graph.copy())
    after = run_ort(result.graph, inputs)[0]
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    return result


@pytest.mark.parametrize(
    "cin,cout,k,stride,pads,out_pad",
    [
        (8, 4, 4, 2, (1, 1, 1, 1), (0, 0)),  # FCN / DCGAN: k 4, stride 2, pad 1
        (8, 8, 2, 2, (0, 0, 0, 0), (0, 0)),  # U-Net: k 2 stride 2 (a 1x1 conv per phase)
        (4, 6, 3, 2, (1, 1, 1, 1), (1, 1)),  # k 3 stride 2 with output_padding
        (4, 4, 3, 1, (1, 1, 1, 1), (0, 0)),  # stride 1: a conv with the flipped kernel
        (4, 4, 3, 1, (0, 0, 0, 0), (0, 0)),  # stride 1, no pads: a "full" conv
        (3, 5, 5, 3, (2, 0, 1, 3), (2, 1)),  # stride 3, asymmetric pads
        (2, 3, (3, 5), 2, (1, 2, 0, 2), (0, 1)),  # rectangular kernel
        (4, 4, 1, 2, (0, 0, 0, 0), (1, 1)),  # k < stride: pixels only the bias reaches
    ],
)
def test_rewrite_matches_onnxruntime(cin, cout, k, stride, pads, out_pad):  # noqa: ANN001
    result = _same_after_pass(_model(cin, cout, k, stride, pads, out_pad))
    assert result.modified and result.stats["rewritten"] == 1
    ops = result.graph.op_counts()
    assert "ConvTranspose" not in ops and ops["Conv"] == 1
    assert ("DepthToSpace" in ops) == (stride > 1)


def test_grouped_transposed_conv_is_one_conv_per_phase():
    result = _same_after_pass(_model(8, 8, 4, 2, (1, 1, 1, 1), group=8))  # depthwise
    ops = result.graph.op_counts()
    assert ops["Conv"] == 4 and ops["Concat"] == 1
    convs = [n for n in result.graph.nodes() if n.op_type == "Conv"]
    assert all(n.attrs["group"] == 8 for n in convs)
    _same_after_pass(_model(8, 12, 3, 2, (1, 1, 1, 1), (1, 1), group=4, bias=False))


@pytest.mark.parametrize(
    "extra,why",
    [
        ({"dilations": [2, 2]}, "dilated"),
        ({"pads": None}, "auto_pad SAME or output_shape"),
    ],
)
def test_declines_what_it_does_not_rewrite(extra, why):  # noqa: ANN001
    graph = _model(4, 4, 3, 2, **extra)
    assert check(graph, graph.node("up")) == why
    result = ConvTransposeToConv()(graph)
    assert not result.modified and result.graph.op_counts() == {"ConvTranspose": 1}


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 5),
    cout=st.integers(1, 5),
    k=st.integers(1, 5),
    stride=st.integers(1, 3),
    pad=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    out_pad=st.integers(0, 2),
    h=st.integers(1, 5),
)
def test_any_shape_matches_onnxruntime(cin, cout, k, stride, pad, out_pad, h):  # noqa: ANN001, PLR0913
    out_pad = min(out_pad, stride - 1)  # ONNX: output_padding < stride
    pads = [min(p, k - 1) for p in pad]
    assume(all(stride * (h - 1) + out_pad + k - pads[i] - pads[i + 2] >= 1 for i in (0, 1)))
    assert _same_after_pass(
        _model(cin, cout, k, stride, tuple(pads), (out_pad, out_pad), hw=(h, h + 1))
    ).modified
