"""expand-rnn: LSTM/GRU/RNN unrolled into primitive ops, one input GEMM per direction.

Checked three ways: the pass alone against onnxruntime on hand-built ONNX models (every
direction, layout, optional input and weight source); ONNX's own backend node tests,
compiled with graphopt and run; torch models exported to ONNX, compiled with
``graphopt.compile`` (which verifies against onnxruntime) and compared with torch.
"""

from __future__ import annotations

import functools
import io
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import graphopt
from graphopt.errors import UnsupportedOpsError
from graphopt.frontends.onnx import onnx_to_graph
from graphopt.lower import unsupported_nodes
from graphopt.passes import DEFAULT_PIPELINE, ExpandRNN, default_passes, run_passes
from tests.passes._util import run_ort

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def unfused_passes() -> list:
    """The default pipeline with every step as primitive ops (``expand-rnn`` with
    ``fuse_steps=False``): the expansion onnxruntime can run, graphopt::RNNStep having no
    ONNX definition."""
    return _with_expand(ExpandRNN(fuse_steps=False, sequence=False))


def fused_passes() -> list:
    """The default pipeline with one graphopt::RNNStep node per step."""
    return _with_expand(ExpandRNN(fuse_steps=True, sequence=False))


def sequence_passes() -> list:
    """The default pipeline with one graphopt::RNNSequence node per layer (CPU targets)."""
    return _with_expand(ExpandRNN(fuse_steps=False, sequence=True))


def _with_expand(expand: ExpandRNN) -> list:
    return [expand if p.name == "expand-rnn" else p for p in default_passes()]


# --- hand-built ONNX models ------------------------------------------------------------
def _rnn_model(
    op: str,
    *,
    direction: str = "forward",
    layout: int = 0,
    seq: int = 4,
    batch: int = 3,
    inp: int = 5,
    hidden: int = 6,
    bias: bool = True,
    init_h: bool = False,
    init_c: bool = False,
    peepholes: bool = False,
    const_weights: bool = True,
    outputs: tuple[str, ...] = ("Y", "Y_h", "Y_c"),
    seq_lens: np.ndarray | None = None,
    opset: int = 17,
    **attrs,
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    gh = _GATES[op] * hidden

    def rand(*shape):
        return rng.uniform(-0.5, 0.5, shape).astype(np.float32)

    params = {"W": rand(dirs, gh, inp), "R": rand(dirs, gh, hidden)}
    if bias:
        params["B"] = rand(dirs, 2 * gh)
    if peepholes and op == "LSTM":
        params["P"] = rand(dirs, 3 * hidden)
    state = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    inputs = {"X": (batch, seq, inp) if layout else (seq, batch, inp)}
    if init_h:
        inputs["initial_h"] = state
    if init_c and op == "LSTM":
        inputs["initial_c"] = state
    inits = dict(params) if const_weights else {}
    if not const_weights:
        inputs.update({k: v.shape for k, v in params.items()})
    if seq_lens is not None:
        inits["sequence_lens"] = seq_lens
    names = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    present = set(inputs) | set(inits)
    node_in = [n if n in present else "" for n in names]
    while not node_in[-1]:
        node_in.pop()
    y_shape = (batch, seq, dirs, hidden) if layout else (seq, dirs, batch, hidden)
    shapes = {"Y": y_shape, "Y_h": state, "Y_c": state}
    node_out = [n if n in outputs else "" for n in ("Y", "Y_h", "Y_c")[: 3 if op == "LSTM" else 2]]
    node = helper.make_node(
        op, node_in, node_out, name="rnn", hidden_size=hidden, direction=direction, **attrs
    )
    if layout:
        node.attribute.append(helper.make_attribute("layout", 1))
    graph = helper.make_graph(
        [node],
        "rnn",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in node_out if n],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    return {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(
            np.float32
        )
        for i in model.graph.input
        if i.name not in inits
    }


def _reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnxruntime's result; ONNX's reference evaluator where onnxruntime refuses layout=1."""
    if any(a.name == "layout" and a.i for a in model.graph.node[0].attribute):
        return ReferenceEvaluator(model).run(None, feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _expand_and_compare(model: onnx.ModelProto) -> graphopt.ir.Graph:
    """Run the default passes (steps unfused); the result must match the original model's."""
    feeds = _feeds(model)
    expected = _reference(model, feeds)
    graph, _ = run_passes(onnx_to_graph(model), unfused_passes())
    assert not {"LSTM", "GRU", "RNN"} & set(graph.op_counts())
    assert not unsupported_nodes(graph)
    for got, exp in zip(run_ort(graph, feeds), expected, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)
    return graph


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("const_weights", [True, False], ids=["const", "input-weights"])
def test_matches_onnxruntime(op, direction, layout, const_weights):
    # Vary the optional inputs along with the rest so every combination is hit somewhere.
    k = ["forward", "reverse", "bidirectional"].index(direction) + layout
    extra = {"linear_before_reset": int(const_weights)} if op == "GRU" else {}
    model = _rnn_model(
        op,
        direction=direction,
        layout=layout,
        const_weights=const_weights,
        bias=k % 2 == 0,
        init_h=k % 3 != 0,
        init_c=k % 2 == 1,
        peepholes=op == "LSTM" and layout == 1,
        **extra,
    )
    _expand_and_compare(model)


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("init_h", [False, True])
def test_gru_linear_before_reset(lbr, init_h):
    _expand_and_compare(
        _rnn_model("GRU", direction="bidirectional", linear_before_reset=lbr, init_h=init_h)
    )


@pytest.mark.parametrize("outputs", [("Y",), ("Y_h",), ("Y_c",), ("Y", "Y_c")])
def test_any_subset_of_outputs(outputs):
    graph = _expand_and_compare(_rnn_model("LSTM", direction="bidirectional", outputs=outputs))
    if "Y" not in outputs:  # no Y assembly when nothing reads Y
        assert graph.op_counts()["Concat"] == len(outputs)


@pytest.mark.parametrize(
    "op, direction, activations",
    [
        ("LSTM", "forward", ["Sigmoid", "Tanh", "Tanh"]),  # the defaults, given explicitly
        ("LSTM", "bidirectional", ["sigmoid", "tanh", "tanh", "Sigmoid", "Tanh", "Relu"]),
        ("GRU", "bidirectional", ["Sigmoid", "Relu", "Sigmoid", "Tanh"]),
        ("RNN", "reverse", ["Relu"]),
        ("RNN", "bidirectional", ["Relu", "Tanh"]),
    ],
)
def test_activations(op, direction, activations):
    _expand_and_compare(_rnn_model(op, direction=direction, init_h=True, activations=activations))


def test_full_length_constant_sequence_lens_and_old_opset():
    seq_lens = np.full(3, 4, dtype=np.int32)
    _expand_and_compare(_rnn_model("LSTM", init_h=True, init_c=True, seq_lens=seq_lens))
    graph = _expand_and_compare(_rnn_model("GRU", direction="bidirectional", opset=9))
    assert "Slice" not in graph.op_counts()  # Slice took its bounds as attributes before 10


def test_zero_initial_state_costs_nothing():
    """No initial state: the first step has no recurrent MatMul (H_0 = 0)."""
    seq = 4
    graph, _ = run_passes(onnx_to_graph(_rnn_model("LSTM", seq=seq)), unfused_passes())
    assert graph.op_counts()["MatMul"] == 1 + (seq - 1)
    graph, _ = run_passes(onnx_to_graph(_rnn_model("LSTM", seq=seq, init_h=True)), unfused_passes())
    assert graph.op_counts()["MatMul"] == 1 + seq
    # Fused: the first step (no recurrence) stays primitive ops, the others are one node.
    graph, _ = run_passes(onnx_to_graph(_rnn_model("LSTM", seq=seq)), fused_passes())
    assert graph.op_counts()["MatMul"] == 1 and graph.op_counts()["RNNStep"] == seq - 1


@pytest.mark.parametrize(
    "op, extra",
    [("LSTM", {}), ("GRU", {"linear_before_reset": 1}), ("GRU", {}), ("RNN", {})],
    ids=["lstm", "gru-lbr", "gru", "rnn"],
)
def test_recurrent_weight_is_packed_in_column_blocks(op, extra):
    """hidden 128: R^T [128, G*128] becomes [G*128/64, 128, 64] blocks (one MatMul per
    step still), and the result matches onnxruntime."""
    seq, hidden = 3, 128
    model = _rnn_model(op, seq=seq, batch=2, hidden=hidden, init_h=True, **extra)
    graph = _expand_and_compare(model)
    blocked = [
        graph.values[n.inputs[1]].shape
        for n in graph.nodes()
        if n.op_type == "MatMul" and len(graph.values[n.inputs[1]].shape) == 3
    ]
    per_step = 2 if op == "GRU" and not extra else 1  # GRU lbr=0: r multiplies H first
    assert len(blocked) == seq * per_step
    assert all(s[1:] == (hidden, 64) for s in blocked)


def test_small_recurrent_weight_stays_plain():
    """Negative: hidden 8 (not a whole 64-column block per gate) keeps R^T as it is."""
    graph = _expand_and_compare(_rnn_model("LSTM", init_h=True, hidden=8))
    matmuls = [n for n in graph.nodes() if n.op_type == "MatMul"]
    assert matmuls and all(len(graph.values[n.inputs[1]].shape) == 2 for n in matmuls)


# --- refusals ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, reason",
    [
        (lambda: _rnn_model("LSTM", clip=1.0), "clip=1.0"),
        (lambda: _rnn_model("LSTM", input_forget=1), "input_forget=1"),
        (lambda: _rnn_model("GRU", activations=["HardSigmoid", "Tanh"]), "activations="),
        (
            lambda: _rnn_model("RNN", direction="bidirectional", activations=["Tanh"]),
            "activations=",
        ),
        (lambda: _rnn_model("RNN", seq_lens=np.array([4, 2, 4], np.int32)), "sequence_lens"),
    ],
    ids=["clip", "input_forget", "activations", "activations-per-direction", "short-sequence"],
)
def test_refuses_naming_node_and_attribute(model, reason):
    graph = onnx_to_graph(model())
    with pytest.raises(UnsupportedOpsError, match=reason) as info:
        ExpandRNN()(graph)
    ((op, node, why),) = info.value.nodes
    assert node == "rnn" and reason in why
    assert op in ("LSTM", "GRU", "RNN") and graph.node("rnn").op_type == op  # left unchanged


def test_unexpanded_rnn_is_reported_by_lowering():
    graph = onnx_to_graph(_rnn_model("GRU"))
    assert unsupported_nodes(graph) == [
        ("GRU", "rnn", "expanded by the expand-rnn pass, which did not run")
    ]
    assert DEFAULT_PIPELINE.index("fold-constants") < DEFAULT_PIPELINE.index("expand-rnn")
    assert DEFAULT_PIPELINE.index("expand-rnn") < DEFAULT_PIPELINE.index("fold-batchnorm")


# --- ONNX's backend node tests, compiled and run --------------------------------------
_BACKEND_CASES = [
    "test_gru_batchwise",
    "test_gru_bidirectional",
    "test_gru_defaults",
    "test_gru_reverse",
    "test_gru_seq_length",
    "test_gru_with_initial_bias",
    "test_lstm_batchwise",
    "test_lstm_bidirectional",
    "test_lstm_defaults",
    "test_lstm_reverse",
    "test_lstm_with_initial_bias",
    "test_lstm_with_peepholes",
    "test_rnn_seq_length",
    "test_simple_rnn_batchwise",
    "test_simple_rnn_bidirectional",
    "test_simple_rnn_defaults",
    "test_simple_rnn_reverse",
    "test_simple_rnn_with_initial_bias",
]
# (case, how the weights are fed) -> the reason graphopt must give for refusing it.
_REFUSED = {
    # Fed as a graph input, sequence_lens may hold any lengths at run time.
    ("test_lstm_with_peepholes", "inputs"): "sequence_lens ('sequence_lens') is not a constant",
}


@functools.cache
def _backend_cases() -> dict:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # other ops' case generators warn on overflow
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    prefixes = ("test_lstm_", "test_gru_", "test_rnn_", "test_simple_rnn_")
    return {c.name: c for c in cases if c.name.startswith(prefixes)}


def test_backend_case_list_is_complete():
    assert sorted(_backend_cases()) == _BACKEND_CASES


def _as_initializers(model: onnx.ModelProto, feeds: dict) -> onnx.ModelProto:
    """The same model with every input but X stored as an initializer (a constant)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    inputs = [i for i in fixed.graph.input if i.name == "X"]
    for name, array in feeds.items():
        if name != "X":
            fixed.graph.initializer.append(numpy_helper.from_array(array, name))
    del fixed.graph.input[:]
    fixed.graph.input.extend(inputs)
    return fixed


@pytest.mark.parametrize("weights", ["inputs", "initializers"])
@pytest.mark.parametrize("name", _BACKEND_CASES)
def test_backend_node_case(name, weights):
    case = _backend_cases()[name]
    (inputs, expected), *_ = case.data_sets
    feeds = {i.name: a for i, a in zip(case.model.graph.input, inputs, strict=True)}
    model = case.model
    if weights == "initializers":
        model = _as_initializers(model, feeds)
        feeds = {"X": feeds["X"]}
    shapes = {n: a.shape for n, a in feeds.items()}
    reason = _REFUSED.get((name, weights))
    if reason is not None:
        with pytest.raises(UnsupportedOpsError, match=re.escape(reason)):
            graphopt.compile(model, "x86", verify=False, input_shapes=shapes)
        return
    artifact = graphopt.compile(model, "x86", verify=False, input_shapes=shapes)
    got = artifact.run(feeds)
    for out, exp in zip(case.model.graph.output, expected, strict=True):
        np.testing.assert_allclose(got[out.name], exp, rtol=case.rtol, atol=case.atol)


# --- torch models, compiled and verified against onnxruntime ---------------------------
def _torch():
    return pytest.importorskip("torch")


def _export(module, args: tuple, input_names: list[str], output_names: list[str]):
    torch = _torch()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, not gone
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            buf,
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
        )
    return onnx.load_from_string(buf.getvalue())


def _recurrent(kind: str, **kwargs):
    """A torch LSTM/GRU/RNN returning a flat tuple (y, h_n[, c_n])."""
    torch = _torch()

    class Recurrent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = getattr(torch.nn, kind)(**kwargs)

        def forward(self, x, *state):
            if kind == "LSTM" and state:
                y, (h, c) = self.rnn(x, tuple(state))
                return y, h, c
            y, h = self.rnn(x, *state)
            if kind == "LSTM":
                return y, h[0], h[1]
            return y, h

    return Recurrent()


def _embedding_lstm_classifier(vocab: int = 20, classes: int = 5):
    torch = _torch()

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, 8)
            self.lstm = torch.nn.LSTM(8, 12, batch_first=True)
            self.head = torch.nn.Linear(12, classes)

        def forward(self, tokens):
            y, _ = self.lstm(self.embed(tokens))
            return self.head(y[:, -1])

    return Classifier()


def _crnn(classes: int = 7):
    """Conv front end over a (1, 8, W) image, columns as time steps, into a BiGRU."""
    torch = _torch()

    class CRNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Sequential(
                torch.nn.Conv2d(1, 4, 3, padding=1),
                torch.nn.BatchNorm2d(4),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            )
            self.rnn = torch.nn.GRU(16, 10, bidirectional=True)
            self.head = torch.nn.Linear(20, classes)

        def forward(self, image):
            f = self.conv(image)  # (N, 4, 4, W/2)
            n, c, h, w = f.shape
            f = f.permute(3, 0, 1, 2).reshape(w, n, c * h)  # (T, N, features)
            y, _ = self.rnn(f)
            return self.head(y).log_softmax(-1)

    return CRNN()


def _torch_cases():
    """name -> (module, example args, input names, output names)."""
    torch = _torch()
    torch.manual_seed(0)
    x_bf = torch.randn(2, 5, 6)  # batch-first (N, T, C)
    x_sf = torch.randn(5, 2, 6)  # sequence-first (T, N, C)
    h2 = torch.randn(4, 2, 8)
    return {
        "lstm-2layer-bidir-batchfirst-state": (
            _recurrent(
                "LSTM",
                input_size=6,
                hidden_size=8,
                num_layers=2,
                bidirectional=True,
                batch_first=True,
            ),
            (x_bf, h2, torch.randn(4, 2, 8)),
            ["x", "h0", "c0"],
            ["y", "hn", "cn"],
        ),
        "gru-2layer-seqfirst": (
            _recurrent("GRU", input_size=6, hidden_size=8, num_layers=2),
            (x_sf,),
            ["x"],
            ["y", "hn"],
        ),
        "gru-bidir-batchfirst-state": (
            _recurrent("GRU", input_size=6, hidden_size=8, bidirectional=True, batch_first=True),
            (x_bf, torch.randn(2, 2, 8)),
            ["x", "h0"],
            ["y", "hn"],
        ),
        "rnn-relu-2layer-bidir-seqfirst": (
            _recurrent(
                "RNN",
                input_size=6,
                hidden_size=8,
                num_layers=2,
                bidirectional=True,
                nonlinearity="relu",
            ),
            (x_sf,),
            ["x"],
            ["y", "hn"],
        ),
        "rnn-tanh-batchfirst-state": (
            _recurrent("RNN", input_size=6, hidden_size=8, batch_first=True),
            (x_bf, torch.randn(1, 2, 8)),
            ["x", "h0"],
            ["y", "hn"],
        ),
        "embedding-lstm-classifier": (
            _embedding_lstm_classifier(),
            (torch.randint(0, 10, (2, 7)),),
            ["tokens"],
            ["logits"],
        ),
        "crnn": (_crnn(), (torch.randn(2, 1, 8, 12),), ["image"], ["log_probs"]),
    }


_TORCH_CASES = [
    "lstm-2layer-bidir-batchfirst-state",
    "gru-2layer-seqfirst",
    "gru-bidir-batchfirst-state",
    "rnn-relu-2layer-bidir-seqfirst",
    "rnn-tanh-batchfirst-state",
    "embedding-lstm-classifier",
    "crnn",
]


@pytest.mark.parametrize("name", _TORCH_CASES)
def test_torch_model_compiles_and_verifies(name):
    torch = _torch()
    module, args, input_names, output_names = _torch_cases()[name]
    model = _export(module, args, input_names, output_names)
    # graphopt.compile verifies against onnxruntime (VerificationError on a mismatch).
    artifact = graphopt.compile(model, "x86")
    assert artifact.manifest["verification"]["ok"]
    assert not {"LSTM", "GRU", "RNN"} & set(artifact.manifest["ops"])
    # And against torch itself, on the example inputs.
    got = artifact.run({n: a.numpy() for n, a in zip(input_names, args, strict=True)})
    with torch.no_grad():
        expected = module(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for out, exp in zip(output_names, expected, strict=True):
        np.testing.assert_allclose(got[out], exp.numpy(), rtol=1e-4, atol=1e-5)


def test_one_input_projection_per_direction_per_layer():
    torch = _torch()
    seq, batch, layers, dirs = 5, 2, 2, 2
    module = _recurrent("LSTM", input_size=6, hidden_size=8, num_layers=layers, bidirectional=True)
    model = _export(module, (torch.randn(seq, batch, 6),), ["x"], ["y", "hn", "cn"])
    graph = onnx_to_graph(model)
    assert graph.op_counts()["LSTM"] == layers
    graph, records = run_passes(graph, unfused_passes())
    counts = graph.op_counts()
    assert not {"LSTM", "GRU", "RNN"} & set(counts)
    stats = next(r["stats"] for r in records if r["name"] == "expand-rnn")
    assert stats["LSTM"] == layers and stats["input_projections"] == layers * dirs
    # The projection MatMul reads all seq*batch rows at once; the recurrent ones read
    # one step's batch rows. torch's zero initial state leaves out step 0's recurrence.
    projections = [
        n
        for n in graph.nodes()
        if n.op_type == "MatMul" and graph.values[n.inputs[0]].shape[0] == seq * batch
    ]
    assert len(projections) == layers * dirs
    assert counts["MatMul"] == layers * dirs * (1 + seq - 1)


@pytest.mark.parametrize("case", ["inconsistent hidden size", "dynamic sequence length"])
def test_cli_refuses_what_expansion_cannot_handle(case, tmp_path, capsys):
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.cli import main

    rng = np.random.default_rng(0)
    w = rng.standard_normal((1, 12, 4)).astype(np.float32)
    r = rng.standard_normal((1, 12, 3)).astype(np.float32)
    hidden = 5 if case == "inconsistent hidden size" else 3
    seq = "T" if case == "dynamic sequence length" else 6
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden, name="rnn")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (seq, 1, 4))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (seq, 1, 1, hidden))],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    code = main(["compile", str(path), "-o", str(tmp_path / "out.so")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert ("hidden_size=5" in err) if hidden == 5 else ("--input-shape x=" in err)
    assert not (tmp_path / "out.so").exists()


# --- fused steps: one graphopt::RNNStep node per step ------------------------------------
def _steps(graph) -> list:
    return [n for n in graph.nodes() if n.op_type == "RNNStep" and n.domain == "graphopt"]


@pytest.mark.parametrize(
    "op, extra, fused",
    [
        ("LSTM", {}, True),
        ("GRU", {"linear_before_reset": 1}, True),
        ("RNN", {}, True),
        ("GRU", {}, False),  # lbr=0: r multiplies H before its MatMul, two GEMVs a step
    ],
    ids=["lstm", "gru-lbr", "rnn", "gru-lbr0-unfused"],
)
@pytest.mark.parametrize("layout", [0, 1])
def test_steps_fuse_into_one_node(op, extra, fused, layout):
    seq, batch, hidden = 5, 2, 32
    model = _rnn_model(
        op, direction="bidirectional", seq=seq, batch=batch, hidden=hidden, init_h=True,
        init_c=True, layout=layout, **extra,
    )  # fmt: skip
    graph, records = run_passes(onnx_to_graph(model), fused_passes())
    steps = _steps(graph)
    stats = next(r["stats"] for r in records if r["name"] == "expand-rnn")
    if not fused:
        assert not steps and not stats.get("fused_steps")
        return
    assert len(steps) == 2 * seq == stats["fused_steps"]
    for s in steps:
        # [H/U, H, G*U]: U hidden units of every gate per block, G*U at most 64 columns
        j, k, cols = graph.values[s.inputs[3 if op == "LSTM" else 2]].shape
        assert k == hidden and j * cols == _GATES[op] * hidden and cols <= 64
        assert s.attrs["row_stride"] == (seq if layout else 1)
    rows = sorted(s.attrs["row0"] for s in steps)
    per_step = 1 if layout else batch
    assert rows == sorted(2 * [t * per_step for t in range(seq)])
    # Only the input projections remain MatMuls: the recurrence is inside the steps.
    assert graph.op_counts()["MatMul"] == 2


def test_packed_step_weight_holds_the_recurrent_weight():
    """rp[j, k, g*U + u] = R^T[k, g*H + j*U + u]: the packing is a permutation of R."""
    hidden = 32
    model = _rnn_model("LSTM", seq=2, hidden=hidden, init_h=True, init_c=True)
    r = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "R"))[0]
    graph, _ = run_passes(onnx_to_graph(model), fused_passes())
    (step, *_rest) = _steps(graph)
    rp = graph.constants[step.inputs[3]]
    block = step.attrs["block"]
    rt = r.T  # [H, 4H]
    for g in range(4):
        for j in range(hidden // block):
            cols = rt[:, g * hidden + j * block : g * hidden + (j + 1) * block]
            np.testing.assert_array_equal(rp[j, :, g * block : (g + 1) * block], cols)


@pytest.mark.parametrize(
    "model",
    [
        lambda: _rnn_model("LSTM", init_h=True, init_c=True, peepholes=True),
        lambda: _rnn_model("LSTM", init_h=True, init_c=True, const_weights=False),
    ],
    ids=["peepholes", "weights-as-inputs"],
)
def test_steps_not_fused(model):
    """Negative: peepholes and a non-constant R (nothing to pack) keep primitive steps."""
    graph, _ = run_passes(onnx_to_graph(model()), fused_passes())
    assert not _steps(graph)
    assert graph.op_counts()["MatMul"] > 1


def test_fused_steps_are_the_targets_choice():
    """The default pipeline leaves ``fuse_steps`` to the target's ``PASS_DEFAULTS`` (off on
    every target today: slower on 2 cores, unschedulable on CUDA) and off with no target;
    a target that turns it on gets it, and an option the user set, in code or pipeline
    text, wins over the target's."""
    from graphopt.passes import build_pipeline, with_target_defaults
    from graphopt.targets import TargetSpec

    model = _rnn_model("GRU", init_h=True, linear_before_reset=1)

    def fused(passes) -> bool:
        return bool(_steps(run_passes(onnx_to_graph(model), passes)[0]))

    for name in ("x86", "arm", "cuda"):
        assert not fused(default_passes(TargetSpec(name).pass_defaults)), name
    assert not fused(default_passes())
    x86 = {"expand-rnn": {"fuse_steps": True}}  # a target that turns it on
    assert fused(default_passes(x86))
    assert not fused(with_target_defaults(unfused_passes(), x86))
    off = build_pipeline("fold-constants,expand-rnn{fuse-steps=false}")
    assert not fused(with_target_defaults(off, x86))
    assert fused(with_target_defaults(build_pipeline("fold-constants,expand-rnn"), x86))
    assert fused(build_pipeline("fold-constants,expand-rnn{fuse-steps=true}"))
