"""graphopt: compile ONNX and torch CNN/RNN models with TVM, verified against a reference."""

from __future__ import annotations

from graphopt import frontends
from graphopt._version import __version__
from graphopt.artifact import Artifact, load
from graphopt.compiler import compile
from graphopt.errors import GraphoptError
from graphopt.evaluation import evaluate
from graphopt.profiling import profile

__all__ = [
    "Artifact",
    "GraphoptError",
    "compile",
    "evaluate",
    "from_torch",
    "load",
    "profile",
    "__version__",
]


def __getattr__(name: str):  # noqa: ANN202 - torch is imported only when asked for
    if name in ("from_torch", "TorchSource"):
        return getattr(frontends, name)  # the frontends package imports torch lazily
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
