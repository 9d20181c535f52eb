"""The torch frontend: nn.Module / GraphModule / ExportedProgram / .pt2 in, verified artifact out.

Every compile here verifies against torch eager inside ``graphopt.compile`` (which raises
``VerificationError`` on a mismatch); the tests also compare the outputs themselves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import graphopt  # noqa: E402
from graphopt.cli import main  # noqa: E402
from graphopt.errors import InputError, UnsupportedOpsError, VerificationError  # noqa: E402
from graphopt.frontends.torch import TorchImportError, TorchSource, from_torch  # noqa: E402
from graphopt.zoo_torch import CRNN, GRUTagger, LSTMClassifier  # noqa: E402


def _check(source: TorchSource, rtol: float = 1e-4, atol: float = 1e-5) -> graphopt.Artifact:
    """Compile ``source``, then compare the artifact with torch eager ourselves too."""
    artifact = graphopt.compile(source, "x86")
    manifest = artifact.manifest
    assert manifest["verification"]["ok"] and manifest["verification"]["reference"] == "torch"
    assert manifest["source"]["format"] == "torch"
    got = artifact.run(source.example_inputs)
    expected = source.reference(source.example_inputs)
    assert list(got) == list(expected) == source.graph.outputs
    for name, exp in expected.items():
        np.testing.assert_allclose(got[name], exp, rtol=rtol, atol=atol, err_msg=name)
    return artifact


def _randomize_bn(module: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so eval-mode BatchNorm is really exercised."""
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return module.eval()


# --- layer families -----------------------------------------------------------------------
class ConvNet(nn.Module):
    """Conv1d/2d, BatchNorm, the activations, every pooling, Linear, Flatten, Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.adapt = nn.AdaptiveAvgPool2d((2, 4))
        self.adapt_max = nn.AdaptiveMaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 4, 10)
        self.drop = nn.Dropout(0.3)
        self.conv1d = nn.Conv1d(4, 6, 3, dilation=2)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, image, signal):
        x = torch.relu(self.bn(self.conv(image)))
        x = nn.functional.relu6(self.dw(x))  # 8x8
        pooled = nn.functional.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
        avg = nn.functional.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        flat = self.drop(torch.flatten(self.adapt(x), 1))
        logits = nn.functional.gelu(self.fc(flat))
        tanh_gelu = nn.functional.gelu(logits, approximate="tanh")
        s = nn.functional.silu(self.bn1d(self.conv1d(signal)))
        s = torch.sigmoid(nn.functional.max_pool1d(s, 2)) + torch.tanh(
            nn.functional.avg_pool1d(s, 2)
        )
        glob = nn.AdaptiveAvgPool2d(1)(x).flatten(1)  # decomposes to a mean
        return (
            logits,
            tanh_gelu,
            pooled,
            avg,
            self.adapt_max(x),
            glob,
            s,
            nn.functional.hardswish(s),
        )


def test_conv_bn_activations_pooling_linear():
    module = _randomize_bn(ConvNet())
    source = from_torch(module, (torch.randn(1, 3, 16, 16), torch.randn(2, 4, 20)))
    assert source.graph.inputs == ["image", "signal"]
    assert source.graph.outputs == [f"out{i}" for i in range(8)]
    ops = source.graph.op_counts()
    for op in ("Conv", "BatchNormalization", "Clip", "Gelu", "MaxPool", "AveragePool"):
        assert ops[op] >= 1, op
    assert ops["ReduceMean"] == 1 and ops["Gemm"] == 1
    _check(source)


class Shapes(nn.Module):
    """Embedding, elementwise, cat/stack, views, indexing and slicing, reductions, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6))

    def forward(self, tokens, x):
        e = self.emb(tokens) * self.scale + 1.0  # (2, 7, 6)
        cat = torch.cat([e, e[:, :, :2] - 0.5], dim=-1)  # (2, 7, 8)
        stacked = torch.stack([e, 2 * e], dim=1)  # (2, 2, 7, 6)
        view = cat.view(2, 56).reshape(2, 7, 8).permute(2, 0, 1).transpose(0, 2)  # (7, 2, 8)
        picked = x[:, -1, 1::2]  # negative index, step
        back = x.flip(-1)[..., :-1]  # reversed (torch has no negative slice steps)
        rows = x[:, [0, -1]]  # an index tensor with a negative index
        parts = torch.chunk(x, 2, dim=-1)[1] * torch.unbind(x, 1)[2][:, :3].unsqueeze(1)
        red = x.mean(dim=(1, 2)) + x.sum(-1, keepdim=True).squeeze(-1)[:, 0]
        return (
            view.flatten(1),
            stacked.sum(1),
            picked,
            back,
            rows,
            parts,
            red,
            torch.softmax(x, -1),
            torch.log_softmax(cat, 1),
            x.amax(1),
        )


def test_embedding_elementwise_views_indexing_reductions():
    tokens = torch.randint(0, 50, (2, 7))
    source = from_torch(Shapes(), (tokens, torch.randn(2, 4, 6)))
    ops = source.graph.op_counts()
    assert ops["Gather"] >= 2 and ops["Slice"] >= 3 and ops["Concat"] >= 2
    assert ops["Softmax"] == 1 and ops["LogSoftmax"] == 1
    _check(source)


# --- recurrent layers ---------------------------------------------------------------------
class Recurrent(nn.Module):
    """``nn.LSTM``/``GRU``/``RNN``, fed initial states when ``states`` is set."""

    def __init__(self, kind: str, states: bool = False, **kwargs) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(**kwargs)
        self.kind, self.states = kind, states

    def forward(self, x, *states):
        if not self.states:
            return self.rnn(x)
        return self.rnn(x, tuple(states) if self.kind == "LSTM" else states[0])


_RNN_CASES = {
    "lstm-2layer-bidir-batchfirst-states": (
        dict(kind="LSTM", num_layers=2, bidirectional=True, batch_first=True, states=True),
        lambda: (torch.randn(2, 5, 6), torch.randn(4, 2, 8), torch.randn(4, 2, 8)),
    ),
    "lstm-seqfirst": (dict(kind="LSTM"), lambda: (torch.randn(5, 3, 6),)),
    "gru-2layer-bidir-seqfirst-state": (
        dict(kind="GRU", num_layers=2, bidirectional=True, states=True),
        lambda: (torch.randn(5, 2, 6), torch.randn(4, 2, 8)),
    ),
    "gru-batchfirst-nobias": (
        dict(kind="GRU", batch_first=True, bias=False),
        lambda: (torch.randn(1, 5, 6),),
    ),
    "rnn-relu-3layer-bidir-batchfirst-state": (
        dict(kind="RNN", num_layers=3, nonlinearity="relu", bidirectional=True, batch_first=True,
             states=True),
        lambda: (torch.randn(2, 4, 6), torch.randn(6, 2, 8)),
    ),
    "rnn-tanh-seqfirst": (dict(kind="RNN"), lambda: (torch.randn(4, 1, 6),)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_RNN_CASES))
def test_recurrent_layers_all_outputs(case):
    torch.manual_seed(0)
    kwargs, make_args = _RNN_CASES[case]
    module = Recurrent(input_size=6, hidden_size=8, **kwargs).eval()
    source = from_torch(module, make_args())
    op = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN"}[kwargs["kind"]]
    layers = kwargs.get("num_layers", 1)
    assert source.graph.op_counts()[op] == layers  # one ONNX node per layer
    outputs = 3 if op == "LSTM" else 2  # output, h_n (, c_n)
    assert source.graph.outputs == [f"out{i}" for i in range(outputs)]
    artifact = _check(source)
    assert not {"LSTM", "GRU", "RNN"} & set(artifact.manifest["ops"])


def test_gate_order_is_converted_for_onnx():
    """LSTM i f g o -> i o f c; GRU r z n -> z r h; biases Wb then Rb; linear_before_reset."""
    torch.manual_seed(0)
    lstm = Recurrent("LSTM", input_size=3, hidden_size=2).eval()
    graph = from_torch(lstm, torch.randn(4, 1, 3)).graph
    node = next(n for n in graph.nodes() if n.op_type == "LSTM")
    w_ih = lstm.rnn.weight_ih_l0.detach().numpy()
    i, f, g, o = np.split(w_ih, 4)
    np.testing.assert_array_equal(graph.constants[node.inputs[1]][0], np.concatenate([i, o, f, g]))
    gru = Recurrent("GRU", input_size=3, hidden_size=2).eval()
    graph = from_torch(gru, torch.randn(4, 1, 3)).graph
    node = next(n for n in graph.nodes() if n.op_type == "GRU")
    assert node.attrs["linear_before_reset"] == 1
    r, z, n = np.split(gru.rnn.bias_hh_l0.detach().numpy(), 3)
    bias = graph.constants[node.inputs[3]][0]
    np.testing.assert_array_equal(bias[6:], np.concatenate([z, r, n]))


# --- what from_torch and compile accept -----------------------------------------------------
def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_graph_module_from_symbolic_trace():
    gm = torch.fx.symbolic_trace(_small())
    assert isinstance(gm, torch.fx.GraphModule)
    _check(from_torch(gm, torch.randn(2, 4)))


def test_exported_program_directly_and_through_from_torch():
    program = torch.export.export(_small(), (torch.randn(2, 4),))
    _check(from_torch(program))  # the program's own example inputs
    artifact = graphopt.compile(program)
    assert artifact.manifest["verification"]["inputs"] == "example"


def test_pt2_file_compiles_from_python_and_cli(tmp_path, capsys):
    path = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(_small(), (torch.randn(2, 4),)), path)
    artifact = graphopt.compile(path)
    assert artifact.manifest["source"]["name"] == "small.pt2"
    assert artifact.manifest["inputs"][0]["shape"] == [2, 4]
    out = tmp_path / "small.so"
    assert main(["compile", str(path), "-o", str(out)]) == 0
    assert "verification: passed against torch" in capsys.readouterr().out
    assert graphopt.load(out).manifest["source"]["format"] == "torch"


def test_pt2_with_dynamic_batch_takes_input_shapes(tmp_path):
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        _small(), (torch.randn(2, 4),), dynamic_shapes={"input": {0: batch}}
    )
    path = tmp_path / "dynamic.pt2"
    torch.export.save(program, path)
    artifact = graphopt.compile(path, input_shapes={"input": (5, 4)})
    assert artifact.manifest["inputs"][0]["shape"] == [5, 4]
    assert artifact.manifest["verification"]["ok"]
    assert graphopt.compile(path).manifest["inputs"][0]["shape"] == [2, 4]  # its example


def test_shape_disagreeing_with_a_static_program_is_an_input_error():
    source = from_torch(_small(), torch.randn(2, 4))
    with pytest.raises(InputError, match="fixed shapes"):
        graphopt.compile(source, input_shapes={"input": (3, 4)})


def test_plain_module_needs_from_torch():
    with pytest.raises(InputError, match="from_torch"):
        graphopt.compile(_small())
    with pytest.raises(InputError, match="example_inputs"):
        from_torch(_small())


class Passthrough(nn.Module):
    """Outputs that are not computed: the input itself, a buffer, one value twice."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(6.0).reshape(2, 3))

    def forward(self, x):
        y = x * 2
        return x, self.table + 1, y, y


def test_outputs_that_are_inputs_constants_or_repeated():
    source = from_torch(Passthrough(), torch.randn(2, 3))
    assert source.graph.outputs == ["out0", "out1", "out2", "out3"]
    _check(source)


def test_disagreeing_with_torch_is_a_verification_error(tmp_path):
    source = from_torch(_small(), torch.randn(2, 4))

    def off_by_one(inputs):
        return {k: v + 1 for k, v in source.reference(inputs).items()}

    wrong = dataclasses.replace(source, reference=off_by_one)
    with pytest.raises(VerificationError, match="disagrees with torch on output 'out0'"):
        graphopt.compile(wrong, output=tmp_path / "wrong.so")
    assert not (tmp_path / "wrong.so").exists()


# --- refusals ---------------------------------------------------------------------------------
class Cumsum(nn.Module):
    def forward(self, x):
        y = torch.relu(x)
        return torch.cumsum(y, 1)  # no ONNX translation in graphopt


def test_unsupported_op_names_node_and_source_line():
    with pytest.raises(UnsupportedOpsError) as info:
        from_torch(Cumsum(), torch.randn(2, 3))
    assert info.value.nodes[0][:2] == ("aten.cumsum.default", "cumsum")
    message = str(info.value)
    assert "test_torch.py:" in message and "torch.cumsum(y, 1)" in message


def test_untraceable_model_gives_one_typed_line():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(TorchImportError) as info:
        from_torch(DataDependent(), torch.randn(2, 3))
    assert isinstance(info.value, graphopt.GraphoptError)
    assert "DataDependent" in str(info.value) and "\n" not in str(info.value)


def test_broken_pt2_file_is_a_load_error(tmp_path):
    path = tmp_path / "broken.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(TorchImportError, match="broken.pt2"):
        graphopt.compile(path)


def test_lstm_text_classifier():
    torch.manual_seed(0)
    source = from_torch(LSTMClassifier().eval(), torch.randint(0, 1000, (1, 32)))
    assert source.graph.op_counts()["LSTM"] == 2
    _check(source, rtol=1e-3, atol=1e-4)


def test_bidirectional_gru_tagger_small():
    torch.manual_seed(0)
    module = GRUTagger(vocab=100, embed=16, hidden=16).eval()
    _check(from_torch(module, torch.randint(0, 100, (2, 12))), rtol=1e-3, atol=1e-4)


def test_crnn_small():
    torch.manual_seed(0)
    module = _randomize_bn(CRNN(height=16, hidden=16, classes=11))
    _check(from_torch(module, torch.randn(1, 1, 16, 32)), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_bidirectional_gru_tagger():
    torch.manual_seed(0)
    _check(from_torch(GRUTagger().eval(), torch.randint(0, 5000, (1, 32))), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_crnn():
    torch.manual_seed(0)
    module = _randomize_bn(CRNN())
    _check(from_torch(module, torch.randn(1, 1, 32, 128)), rtol=1e-3, atol=1e-4)
