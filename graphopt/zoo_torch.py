"""Built-in torch example models: the recurrent and small ones the tests and benchmarks share.

Needs torch (``pip install -e '.[torch]'``). ``graphopt.from_torch(Model().eval(),
example_inputs)`` compiles any of them; ``benchmarks/bench_rnn.py`` measures them against
onnxruntime and torch eager, and ``tests/frontends/test_torch.py`` checks them.
"""

from __future__ import annotations

from torch import nn

__all__ = ["LSTMClassifier", "GRUTagger", "CRNN", "ElmanRNN", "TinyCNN"]


class LSTMClassifier(nn.Module):
    """Embedding -> 2-layer LSTM (hidden 256) -> last step -> Linear; 32 tokens."""

    def __init__(self, vocab=1000, embed=128, hidden=256, classes=4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        y, _ = self.lstm(self.emb(tokens))
        return self.head(y[:, -1])


class GRUTagger(nn.Module):
    """Embedding -> bidirectional GRU (hidden 128) -> per-token Linear -> log_softmax."""

    def __init__(self, vocab=5000, embed=128, hidden=128, tags=17) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, tags)

    def forward(self, tokens):
        y, _ = self.gru(self.emb(tokens))
        return self.head(y).log_softmax(-1)


class CRNN(nn.Module):
    """Two conv blocks, image width as time (32 steps), a bidirectional LSTM, classes."""

    def __init__(self, height=32, hidden=128, classes=37) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.rnn = nn.LSTM(64 * (height // 4), hidden, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, image):
        f = self.cnn(image)
        n, c, h, w = f.shape
        f = f.permute(3, 0, 1, 2).reshape(w, n, c * h)
        y, _ = self.rnn(f)
        return self.head(y).log_softmax(-1)


class ElmanRNN(nn.Module):
    """2-layer Elman RNN (tanh, hidden 128) over [1, T, 64] features -> last step -> Linear."""

    def __init__(self, features=64, hidden=128, classes=10) -> None:
        super().__init__()
        self.rnn = nn.RNN(features, hidden, num_layers=2, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


class TinyCNN(nn.Module):
    """Three 3x3 convs (16, 32, 64 channels) with ReLU and pooling on a 32x32 RGB image."""

    def __init__(self, classes=10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, image):
        return self.head(self.features(image).flatten(1))
