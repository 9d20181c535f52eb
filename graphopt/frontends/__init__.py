"""Frontends read user models into graphopt's graph IR (:mod:`graphopt.ir`).

``onnx`` reads ONNX files and protos; ``torch`` reads torch models (``nn.Module``,
``GraphModule``, ``ExportedProgram``, ``.pt2`` files). The torch frontend is imported only
when a torch model is given, so graphopt runs without torch installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from graphopt.frontends.onnx import load_onnx, onnx_to_graph, parse_input_shapes

__all__ = [
    "load_onnx",
    "onnx_to_graph",
    "parse_input_shapes",
    "is_torch_model",
    "from_torch",
    "TorchSource",
    "TorchImportError",
]

_TORCH_NAMES = ("from_torch", "TorchSource", "TorchImportError", "as_source")


def is_torch_model(model: Any) -> bool:
    """True for what the torch frontend reads: a ``.pt2`` path or a torch object."""
    if isinstance(model, str | os.PathLike):
        return Path(model).suffix == ".pt2"
    if type(model).__module__ == "graphopt.frontends.torch":
        return True
    torch = sys.modules.get("torch")  # a torch object means torch is imported already
    return torch is not None and isinstance(model, torch.nn.Module | torch.export.ExportedProgram)


def __getattr__(name: str) -> Any:
    """The torch frontend's names, importing torch (seconds) only when one is asked for:
    graphopt runs without torch installed."""
    if name in _TORCH_NAMES:
        from graphopt.frontends import torch as torch_frontend

        return getattr(torch_frontend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
