"""graphopt: compile ONNX and torch CNN/RNN models with TVM, verified against a reference."""

from __future__ import annotations

__version__ = "0.1.0"

from graphopt.artifact import Artifact, load  # noqa: E402
from graphopt.compiler import compile  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402

__all__ = ["Artifact", "GraphoptError", "compile", "from_torch", "load", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - torch is imported only when asked for
    if name in ("from_torch", "TorchSource"):
        from graphopt.frontends import torch as torch_frontend

        return getattr(torch_frontend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
