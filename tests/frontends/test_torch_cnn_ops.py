"""The torch importer's CNN ops beyond the classic set: layer/group norm, upsampling, 3-D conv
and pools, transposed conv, GELU, strided views.

Checked on the IR: the ONNX nodes and attributes emitted, and the IR written back to ONNX
(``graph_to_onnx``) run by onnxruntime against torch eager. That pins the importer to the
ONNX operators' own semantics, independently of graphopt's lowering of them.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
nn, F = torch.nn, torch.nn.functional

from graphopt.errors import UnsupportedOpsError  # noqa: E402
from graphopt.frontends.torch import from_torch  # noqa: E402
from graphopt.ir import Graph, graph_to_onnx  # noqa: E402


class Fn(nn.Module):
    def __init__(self, fn, *modules: nn.Module) -> None:
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(modules)

    def forward(self, *xs):
        return self.fn(self.mods, *xs)


def _ort_matches_torch(module: nn.Module, *args, rtol=1e-5, atol=1e-5) -> Graph:
    """Import ``module``, run the IR with onnxruntime, compare every output with torch eager."""
    torch.manual_seed(0)
    source = from_torch(module.eval(), args)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(graph_to_onnx(source.graph).SerializeToString(), options)
    feeds = {name: a.numpy() for name, a in zip(source.graph.inputs, args, strict=True)}
    expected = source.reference(feeds)
    got = dict(zip(source.graph.outputs, sess.run(source.graph.outputs, feeds), strict=True))
    assert list(expected) == source.graph.outputs
    for name, exp in expected.items():
        np.testing.assert_allclose(got[name], exp, rtol=rtol, atol=atol, err_msg=name)
    return source.graph


def _nodes(graph: Graph, op: str) -> list:
    return [n for n in graph.nodes() if n.op_type == op]


def _random_affine(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    return norm


# --- normalizations -------------------------------------------------------------------------
def test_layer_norm_axis_epsilon_affine():
    ln_last = _random_affine(nn.LayerNorm(8, eps=1e-3))
    ln_two = _random_affine(nn.LayerNorm((5, 8)))
    plain = nn.LayerNorm(8, elementwise_affine=False)
    no_bias = _random_affine(nn.LayerNorm(8, bias=False))

    def fn(m, x):
        return m[0](x), m[1](x), m[2](x), m[3](x)

    graph = _ort_matches_torch(Fn(fn, ln_last, ln_two, plain, no_bias), torch.randn(2, 5, 8))
    nodes = _nodes(graph, "LayerNormalization")
    assert [n.attrs["axis"] for n in nodes] == [2, 1, 2, 2]  # never negative
    assert nodes[0].attrs["epsilon"] == pytest.approx(1e-3)
    assert [len(n.inputs) for n in nodes] == [3, 3, 2, 2]  # no bias: none given
    np.testing.assert_array_equal(graph.constants[nodes[2].inputs[1]], np.ones(8, np.float32))


def test_convnext_style_channels_last_layer_norm():
    """LayerNorm2d as torchvision's ConvNeXt writes it: permute, layer_norm, permute back."""
    ln = _random_affine(nn.LayerNorm(6, eps=1e-6))

    def fn(m, x):
        y = m[0](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.gelu(y), F.adaptive_avg_pool2d(y, 1)  # pool decomposes to a strided view

    graph = _ort_matches_torch(Fn(fn, ln), torch.randn(1, 6, 5, 7))
    assert len(_nodes(graph, "LayerNormalization")) == 1


@pytest.mark.parametrize("shape", [(2, 8, 5), (1, 8, 4, 6), (1, 8, 3, 4, 5)])
def test_group_norm_every_rank(shape):
    gn = _random_affine(nn.GroupNorm(4, 8, eps=1e-4))
    plain = nn.GroupNorm(2, 8, affine=False)
    graph = _ort_matches_torch(Fn(lambda m, x: (m[0](x), m[1](x)), gn, plain), torch.randn(*shape))
    nodes = _nodes(graph, "GroupNormalization")
    assert [n.attrs["num_groups"] for n in nodes] == [4, 2]
    assert nodes[0].attrs["epsilon"] == pytest.approx(1e-4)
    # Opset 18-20 form: the group scale/bias are 1/0 per group; torch's affine is per channel.
    assert graph.constants[nodes[0].inputs[1]].shape == (4,)
    assert len(_nodes(graph, "Mul")) == 1 and len(_nodes(graph, "Add")) == 1


# --- upsampling ------------------------------------------------------------------------------
_UPSAMPLE = {
    "nearest-x2": (dict(scale_factor=2, mode="nearest"), "asymmetric", "scales"),
    "nearest-x1.5": (dict(scale_factor=1.5, mode="nearest"), "asymmetric", "scales"),
    "nearest-size": (dict(size=(7, 11), mode="nearest"), "asymmetric", "sizes"),
    "nearest-exact": (dict(size=(7, 11), mode="nearest-exact"), "half_pixel", "sizes"),
    "bilinear-scale": (dict(scale_factor=1.7, mode="bilinear"), "half_pixel", "scales"),
    "bilinear-size": (dict(size=(9, 4), mode="bilinear"), "half_pixel", "sizes"),
    "bilinear-align-scale": (
        dict(scale_factor=2, mode="bilinear", align_corners=True),
        "align_corners",
        "sizes",
    ),
    "bilinear-align-size": (
        dict(size=(9, 13), mode="bilinear", align_corners=True),
        "align_corners",
        "sizes",
    ),
    "bicubic": (dict(scale_factor=2, mode="bicubic"), "half_pixel", "scales"),
    "bicubic-align": (
        dict(size=(8, 8), mode="bicubic", align_corners=True),
        "align_corners",
        "sizes",
    ),
    "bilinear-recompute": (
        dict(scale_factor=1.7, mode="bilinear", recompute_scale_factor=True),
        "half_pixel",
        "sizes",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_UPSAMPLE))
def test_upsample_2d(case):
    kwargs, transform, given = _UPSAMPLE[case]
    graph = _ort_matches_torch(
        Fn(lambda m, x: F.interpolate(x, **kwargs)), torch.randn(1, 3, 5, 6), rtol=1e-4
    )
    (node,) = _nodes(graph, "Resize")
    assert node.attrs["coordinate_transformation_mode"] == transform.encode()
    mode = kwargs["mode"].removeprefix("bi").replace("-exact", "")
    assert node.attrs["mode"] == mode.encode()
    if mode == "nearest":
        rounding = b"floor" if transform == "asymmetric" else b"round_prefer_ceil"
        assert node.attrs["nearest_mode"] == rounding
    assert bool(node.inputs[2]) == (given == "scales")
    assert bool(node.inputs[3:]) == (given == "sizes")


def test_upsample_1d_and_3d():
    def fn(m, signal, video):
        return (
            F.interpolate(signal, scale_factor=2.5, mode="linear"),
            F.interpolate(signal, size=7, mode="nearest"),
            F.interpolate(video, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False),
            F.interpolate(video, scale_factor=2, mode="nearest"),
        )

    graph = _ort_matches_torch(Fn(fn), torch.randn(2, 3, 6), torch.randn(1, 2, 3, 4, 5))
    assert len(_nodes(graph, "Resize")) == 4


def test_upsample_modules_as_hrnet_and_lraspp_use_them():
    up = nn.Upsample(scale_factor=4, mode="nearest")

    def fn(m, x):
        low = F.avg_pool2d(x, 4)
        return x + m[0](low), F.interpolate(low, size=x.shape[-2:], mode="bilinear")

    _ort_matches_torch(Fn(fn, up), torch.randn(1, 4, 16, 12))


def test_antialiased_interpolation_is_refused_with_reason():
    module = Fn(lambda m, x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True))
    with pytest.raises(UnsupportedOpsError, match="antialiased"):
        from_torch(module, torch.randn(1, 2, 8, 8))


# --- 3-D convolution and pools, transposed convolution --------------------------------------
def test_conv3d_and_3d_pools_as_r3d_uses_them():
    conv = nn.Conv3d(3, 4, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=False)
    dil = nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=2)

    def fn(m, x):
        y = torch.relu(m[0](x))  # (1, 4, 4, 6, 6)
        z = m[1](y)
        return (
            F.max_pool3d(y, 2),
            F.max_pool3d(y, 3, stride=2, padding=1, ceil_mode=True),
            F.avg_pool3d(z, (1, 2, 2), count_include_pad=False),
            F.adaptive_avg_pool3d(z, 1).flatten(1),
            F.adaptive_avg_pool3d(z, (2, 3, 3)),
            F.adaptive_max_pool3d(z, (1, 2, 2)),
        )

    graph = _ort_matches_torch(Fn(fn, conv, dil), torch.randn(1, 3, 4, 12, 12), rtol=1e-4)
    convs = _nodes(graph, "Conv")
    assert [n.attrs["kernel_shape"] for n in convs] == [[3, 5, 5], [3, 3, 3]]
    assert convs[0].attrs["pads"] == [1, 2, 2, 1, 2, 2] and convs[1].attrs["group"] == 2
    assert len(_nodes(graph, "MaxPool")) == 3
    assert _nodes(graph, "MaxPool")[1].attrs["ceil_mode"] == 1


def test_conv_transpose_output_padding_groups_dilation():
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    dil = nn.ConvTranspose1d(3, 2, 3, stride=3, dilation=2, bias=False)

    def fn(m, x, s):
        return m[0](x), m[1](s)

    graph = _ort_matches_torch(Fn(fn, up, dil), torch.randn(1, 4, 5, 7), torch.randn(2, 3, 6))
    nodes = _nodes(graph, "ConvTranspose")
    assert nodes[0].attrs["output_padding"] == [1, 1] and nodes[0].attrs["group"] == 2
    assert nodes[1].attrs["dilations"] == [2]


def test_gelu_both_approximations():
    graph = _ort_matches_torch(
        Fn(lambda m, x: (F.gelu(x), F.gelu(x, approximate="tanh"))), torch.randn(3, 7) * 3
    )
    assert [n.attrs["approximate"] for n in _nodes(graph, "Gelu")] == [b"none", b"tanh"]


# --- strided views -------------------------------------------------------------------------
def test_as_strided_gathers_from_a_contiguous_input():
    fn = Fn(lambda m, x: torch.as_strided(x * 2, (3, 2, 2), (1, 4, 2), 1))
    graph = _ort_matches_torch(fn, torch.randn(4, 5))
    assert len(_nodes(graph, "Gather")) == 1


def test_as_strided_on_a_non_contiguous_input_is_refused():
    fn = Fn(lambda m, x: torch.as_strided((x * 2).t(), (2, 2), (1, 2)))
    with pytest.raises(UnsupportedOpsError, match="non-contiguous"):
        from_torch(fn, torch.randn(4, 5))
