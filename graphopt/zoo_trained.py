"""Two small classifiers trained here in seconds, with labelled test data to evaluate on.

- ``digits``: a CNN on scikit-learn's 8x8 handwritten digits (``load_digits`` ships
  inside scikit-learn: no download), written as ONNX (input ``image`` 1x1x8x8 float32,
  pixels scaled to [0, 1]; output ``logits`` 1x10), so onnxruntime is its reference.
- ``sequence``: an LSTM classifier (:class:`graphopt.zoo_torch.LSTMClassifier`, small)
  on a synthetic task: 16 tokens from 0..7, the class is whichever of the tokens 0..3
  occurs most often (ties: the smallest). Written as a ``.pt2`` file (input ``tokens``
  1x16 int64), so torch eager is its reference.

Training is seeded and single-threaded, so the same seed gives the same weights.
``graphopt example digits --eval-data DIR`` writes the model and the held-out split as
``.npz`` batches (the format of :mod:`graphopt.evaluate`). Needs torch; ``digits`` also
needs scikit-learn (``pip install 'graphopt[torch,eval]'``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphopt.errors import GraphoptError
from graphopt.zoo_torch import LSTMClassifier

__all__ = [
    "EXAMPLES",
    "TrainedExample",
    "digits",
    "digits_cnn",
    "digits_data",
    "digits_onnx",
    "sequence",
    "sequence_data",
    "sequence_model",
    "train",
]

SEQ_LEN = 16
SEQ_VOCAB = 8
SEQ_CLASSES = 4


@dataclass(frozen=True)
class TrainedExample:
    """A trained model and its held-out split: ``write(path)`` saves the model as
    ``suffix`` says; ``inputs`` maps the model's input name to test samples (dim 0)."""

    name: str
    suffix: str  # ".onnx" or ".pt2"
    model: object  # onnx.ModelProto or torch.export.ExportedProgram
    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    train_accuracy: float

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        if self.suffix == ".onnx":
            onnx.save(self.model, path)
        else:
            torch.export.save(self.model, path)
        return path


@contextlib.contextmanager
def _one_thread():
    """Same seed, same weights: the order of float sums must not depend on threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    seed: int = 0,
    lr: float = 1e-2,
) -> float:
    """Adam on cross-entropy, minibatches of 64 in a seeded order; returns the final
    training accuracy. ``model`` is left in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    with _one_thread():
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(xs), generator=gen)
            for i in range(0, len(xs), 64):
                idx = order[i : i + 64]
                opt.zero_grad()
                loss_fn(model(xs[idx]), ys[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            return float((model(xs).argmax(1) == ys).float().mean())


# --- digits ------------------------------------------------------------------------------
def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: the 1,797 digits in a seeded 80/20 split,
    images as float32 Nx1x8x8 in [0, 1], labels int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GraphoptError(
            "the digits example needs scikit-learn: pip install 'graphopt[eval]'"
        ) from None
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def digits_cnn(seed: int = 0) -> nn.Sequential:
    """conv3x3(16) relu maxpool, conv3x3(32) relu maxpool, flatten, linear(10)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )


def digits_onnx(model: nn.Sequential, batch: int = 1) -> onnx.ModelProto:
    """The trained :func:`digits_cnn` as ONNX, written node by node (no exporter)."""
    conv1, _, _, conv2, _, _, _, fc = model
    w = {
        "w1": conv1.weight,
        "b1": conv1.bias,
        "w2": conv2.weight,
        "b2": conv2.bias,
        "wf": fc.weight,
        "bf": fc.bias,
    }
    inits = [numpy_helper.from_array(t.detach().numpy().copy(), n) for n, t in w.items()]
    pads = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], **pads),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], **pool),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], **pads),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], **pool),
        helper.make_node("Flatten", ["p2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # what opset 17 needs; onnx's newest (14) is too new for older onnxruntime
    onnx.checker.check_model(proto)
    return proto


def digits(seed: int = 0, epochs: int = 30) -> TrainedExample:
    """Train the digits CNN (a few seconds on one core) and hold out 20% to evaluate."""
    x_train, y_train, x_test, y_test = digits_data(seed)
    model = digits_cnn(seed)
    acc = train(model, x_train, y_train, epochs=epochs, seed=seed)
    return TrainedExample("digits", ".onnx", digits_onnx(model), {"image": x_test}, y_test, acc)


# --- sequence ----------------------------------------------------------------------------
def sequence_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences of :data:`SEQ_LEN` tokens from 0..7 (int64) and their class: which
    of the tokens 0..3 occurs most often (ties: the smallest). One class token is
    favoured per sequence, so the classes are balanced and the task is learnable."""
    rng = np.random.default_rng(seed)
    favoured = rng.integers(0, SEQ_CLASSES, n)
    tokens = rng.integers(0, SEQ_VOCAB, (n, SEQ_LEN))
    extra = rng.random((n, SEQ_LEN)) < 0.25
    tokens = np.where(extra, favoured[:, None], tokens).astype(np.int64)
    counts = np.stack([(tokens == c).sum(1) for c in range(SEQ_CLASSES)], axis=1)
    return tokens, counts.argmax(1).astype(np.int64)


def sequence_model(seed: int = 0) -> LSTMClassifier:
    torch.manual_seed(seed)
    return LSTMClassifier(vocab=SEQ_VOCAB, embed=16, hidden=32, classes=SEQ_CLASSES)


def sequence(seed: int = 0, epochs: int = 12) -> TrainedExample:
    """Train the LSTM on 3,000 sequences (seconds on one core); 600 held out."""
    x_train, y_train = sequence_data(3000, seed)
    x_test, y_test = sequence_data(600, seed + 1)
    model = sequence_model(seed)
    acc = train(model, x_train, y_train, epochs=epochs, seed=seed)
    with warnings.catch_warnings():  # "tensor attributes ... assigned during export": LSTM's
        warnings.simplefilter("ignore", UserWarning)
        program = torch.export.export(model, (torch.from_numpy(x_test[:1]),))
    return TrainedExample("sequence", ".pt2", program, {"tokens": x_test}, y_test, acc)


EXAMPLES: dict[str, Callable[[], TrainedExample]] = {"digits": digits, "sequence": sequence}
