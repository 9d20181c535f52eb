"""``--dump-ir``: the graph as ONNX text before and after each pass, numbered in order.

Files in the dump directory, for a pipeline of N passes::

    00-input.onnx.txt                      the graph as imported
    01-eliminate-identity.before.onnx.txt  (same text as 00)
    01-eliminate-identity.after.onnx.txt
    ...
    NN-<pass>.after.onnx.txt               what is lowered
    (N+1)-relax.py                         the Relax module after lowering (mod.script())

The text is ``onnx.printer`` output; constants with more than ``MAX_SHOWN`` elements
show their type and shape but not their data. ``diff 03-*.before.* 03-*.after.*``
shows what pass 3 did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import printer

from graphopt.errors import GraphoptError
from graphopt.ir import Graph
from graphopt.passes._base import Pass
from graphopt.passes._functions import to_onnx

__all__ = ["graph_text", "IRDumper", "MAX_SHOWN"]

MAX_SHOWN = 16


def graph_text(graph: Graph) -> str:
    """``graph`` as ONNX text, large constants elided."""
    proto = to_onnx(graph)
    for init in proto.graph.initializer:
        n = int(np.prod(init.dims)) if len(init.dims) else 1
        if n > MAX_SHOWN:
            dims, dtype, name = list(init.dims), init.data_type, init.name
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
            init.data_location = onnx.TensorProto.EXTERNAL
            entry = init.external_data.add()
            entry.key, entry.value = "location", f"{n} elements not shown"
    return printer.to_text(proto)


class IRDumper:
    """An ``observe`` callback for :func:`~graphopt.passes.run_passes` writing to ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GraphoptError(f"--dump-ir: cannot create {self.root}: {exc}") from None
        self.last = 0

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def __call__(self, index: int, p: Pass, when: str, graph: Graph) -> None:
        if index == 1 and when == "before":
            self.write("00-input.onnx.txt", graph_text(graph))
        self.write(f"{index:02d}-{p.name}.{when}.onnx.txt", graph_text(graph))
        self.last = index

    def relax(self, script: str) -> Path:
        return self.write(f"{self.last + 1:02d}-relax.py", script)
