"""graphopt: compile ONNX and torch CNN/RNN models with TVM, verified against a reference."""

from __future__ import annotations

__version__ = "0.1.0"

from graphopt.artifact import Artifact, load  # noqa: E402
from graphopt.compiler import compile  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402

__all__ = ["Artifact", "GraphoptError", "compile", "load", "__version__"]
