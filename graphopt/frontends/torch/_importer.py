"""The fx → IR importer: walks a decomposed ExportedProgram and fills a graph.

Parameters, buffers and constant subgraphs are evaluated by torch at import (``folded``);
every other node goes through the ``ATEN`` table, whose parts sit beside their converters
(:mod:`._shape_ops`, :mod:`._compute_ops`, :mod:`._resize`, :mod:`._recurrent`). Every node
the table cannot translate is named, with the user's source line (:func:`source_location`),
in one :class:`UnsupportedOpsError`.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import replace
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from graphopt.errors import UnsupportedOpsError
from graphopt.frontends.torch._builder import Convert, GraphBuilder, Poisoned, Refuse, dtype_name
from graphopt.frontends.torch._compute_ops import COMPUTE_OPS
from graphopt.frontends.torch._quiet import TorchImportError
from graphopt.frontends.torch._recurrent import RECURRENT_OPS
from graphopt.frontends.torch._resize import UPSAMPLE_OPS
from graphopt.frontends.torch._shape_ops import SHAPE_OPS
from graphopt.ir import Graph, Node

__all__ = ["ATEN", "Importer", "source_location"]

# The table: ATen overload name -> converter. Everything else is refused, with its source.
ATEN: dict[str, Convert] = {**SHAPE_OPS, **COMPUTE_OPS, **UPSAMPLE_OPS, **RECURRENT_OPS}
# Never evaluated at import, even with constant inputs: they draw random numbers.
_NEVER_FOLD = ("aten.rand", "aten.bernoulli", "aten.normal", "aten.native_dropout")

# --- source locations -------------------------------------------------------------------
_FRAME = re.compile(
    r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>[^\n]+)'
    r'(?:\n[ \t]+(?P<code>(?![ \t]*File ")[^\n]*))?'  # the code line, absent for <stdin>
)
_TORCH_DIR = os.path.dirname(torch.__file__)


def source_location(node: torch.fx.Node) -> str:
    """``file:line in fn: code`` of the last user frame (outside torch) that made ``node``."""
    frames = list(_FRAME.finditer(node.meta.get("stack_trace") or ""))
    if not frames:
        return "source location unknown"
    user = [f for f in frames if not f["file"].startswith(_TORCH_DIR)]
    f = (user or frames)[-1]
    where = f"{f['file']}:{f['line']} in {f['fn'].strip()}"
    return f"{where}: {f['code'].strip()}" if f["code"] else where


class Importer(GraphBuilder):
    """Walks an ExportedProgram's graph and fills a :class:`Graph` (see :class:`GraphBuilder`).

    ``refused`` collects ``(op, node, reason)`` for every node no converter translates.
    """

    def __init__(self, program: ExportedProgram, name: str) -> None:
        super().__init__(name)
        self.program = program
        self.refused: list[tuple[str, str, str]] = []

    def run(self) -> Graph:
        """Walk the program's nodes in order; raise one error naming every refused op."""
        program = self.program
        sig = program.graph_signature
        lifted = {
            **sig.inputs_to_parameters,
            **sig.inputs_to_buffers,
            **sig.inputs_to_lifted_tensor_constants,
            **getattr(sig, "inputs_to_lifted_custom_objs", {}),
        }
        tensors = {**program.state_dict, **program.constants}
        user = set(sig.user_inputs)
        output_node = None
        for node in program.graph.nodes:
            if node.op == "placeholder":
                if node.target in lifted:
                    self.folded[node.name] = tensors[lifted[node.target]]
                elif node.target in user:
                    self._add_input(node)
                continue
            if node.op == "output":
                output_node = node
                continue
            self._call(node)
        if self.refused:
            raise UnsupportedOpsError(self.refused)
        self._add_outputs(output_node)
        return self.graph

    def _add_input(self, node: torch.fx.Node) -> None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise TorchImportError(f"input {node.name!r} is not a tensor ({type(val).__name__})")
        if not all(isinstance(d, int) for d in val.shape):
            raise TorchImportError(f"input {node.name!r} has a dynamic shape {tuple(val.shape)}")
        try:
            dtype = dtype_name(val.dtype)
        except Refuse as exc:
            raise TorchImportError(f"input {node.name!r}: {exc}") from None
        self.graph.add_input(node.name, tuple(val.shape), dtype)
        self.env[node.name] = node.name

    def _call(self, node: torch.fx.Node) -> None:
        key = _key(node)
        if key.startswith(("aten._assert", "aten.sym_constrain")):
            return
        inputs = node.all_input_nodes
        if any(i.name in self.poisoned for i in inputs):
            self.poisoned.add(node.name)
            return
        if all(i.name in self.folded for i in inputs) and not key.startswith(_NEVER_FOLD):
            if key not in RECURRENT_OPS:
                self.folded[node.name] = _evaluate(node, self.folded)
                return
        convert = ATEN.get(key)
        try:
            if convert is None:
                raise Refuse("no ONNX translation")
            self.env[node.name] = convert(self, node)
        except Poisoned:
            self.poisoned.add(node.name)
        except Refuse as exc:
            self.poisoned.add(node.name)
            self.refused.append((key, node.name, f"{exc} (at {source_location(node)})"))

    def _add_outputs(self, output_node: torch.fx.Node) -> None:
        """Name the outputs ``out0, out1, ...``: the producing node's value is renamed."""
        names: list[str] = []
        renamed: dict[str, str] = {}
        for i, arg in enumerate(pytree.tree_leaves(output_node.args[0])):
            out = f"out{i}"
            if not isinstance(arg, torch.fx.Node):
                raise TorchImportError(f"output {i} is {arg!r}, not a tensor")
            src = self.value(arg)
            if src in renamed:
                src = renamed[src]
            elif self.graph.producer(src) is not None and src not in self.graph.inputs:
                _rename(self.graph, src, out)
                renamed[src] = out
                names.append(out)
                continue
            names.append(out)
            if self.graph.is_constant(src):  # a constant output is a constant of that name
                self.graph.add_constant(out, self.graph.constants[src])
                continue
            # An input, or an output twice: a copy (eliminate-identity keeps these).
            self.graph.values[out] = replace(self.graph.values[src], name=out)
            node_name = self.fresh(f"Identity_{out}")
            self.graph.add_node(Node(node_name, "Identity", [src], [out]))
        self.graph.outputs = names


def _key(node: torch.fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target)


def _evaluate(node: torch.fx.Node, folded: dict[str, Any]) -> Any:
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: folded[n.name])
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _rename(graph: Graph, old: str, new: str) -> None:
    """Make the node producing ``old`` produce ``new`` instead, consumers rewired."""
    prod = graph.producer(old)
    graph.remove_node(prod.name)
    prod.outputs = [new if o == old else o for o in prod.outputs]
    graph.values[new] = replace(graph.values.pop(old), name=new)
    graph.add_node(prod)
    graph.replace_uses(old, new)
