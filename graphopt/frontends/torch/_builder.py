"""The IR-building state every ATen converter writes through: :class:`GraphBuilder`.

A converter is ``convert(builder, node) -> value`` (:data:`Convert`): it reads the fx
node's inputs as IR values (:meth:`GraphBuilder.value`), emits ONNX-semantics nodes into
``builder.graph`` and returns the IR value name of the node's result (a list of them for
a tuple result, ``None`` where an element is not translated). It raises :class:`Refuse`
to decline a node, with the reason the user sees. The walk over the program that calls
the converters is :class:`graphopt.frontends.torch._importer.Importer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx

from graphopt.ir import Graph
from graphopt.ir_builder import IRBuilder

__all__ = [
    "OPSET",
    "Convert",
    "GraphBuilder",
    "Poisoned",
    "Refuse",
    "dtype_name",
    "int_list",
    "named_args",
    "node_arg",
]

# Gelu became an ONNX op in opset 20; ReduceMean takes axes as an input from 18 on.
OPSET = 20


class Refuse(Exception):
    """Raised by a converter: the node cannot be translated, for the given reason."""


class Poisoned(Exception):
    """An input comes from a refused node: skip quietly, the refusal is reported."""


def dtype_name(t: torch.dtype) -> str:
    """The numpy name of a torch dtype (``"float32"``, ``"bool"``); refused if numpy has none."""
    name = str(t).removeprefix("torch.")
    if name == "bool":
        return "bool"
    try:
        return str(np.dtype(name))
    except TypeError:
        raise Refuse(f"dtype {name} is not supported") from None


def _onnx_type(dtype: str) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def node_arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of ``node``, given positionally or as keyword ``name``."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def named_args(node: torch.fx.Node) -> dict[str, Any]:
    """Every argument of an ATen ``node`` by its schema name, defaults filled in."""
    args: dict[str, Any] = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            args[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            args[arg.name] = node.kwargs[arg.name]
        else:
            args[arg.name] = arg.default_value if arg.has_default_value() else None
    return args


def int_list(v: Any, n: int) -> list[int]:
    """An int or int list as a list of ints; a single value stands for all ``n`` dims."""
    v = [int(x) for x in (v if isinstance(v, Sequence) else [v])]
    return v * n if len(v) == 1 else v


class GraphBuilder(IRBuilder):
    """The graph being built from an ExportedProgram, and the fx values already in it.

    Names, constants and nodes come from :class:`~graphopt.ir_builder.IRBuilder`; this
    adds the torch side.

    ``env`` maps an fx node name to its IR value name (or a list of them for tuple
    results, ``None`` where an element is not translated); ``folded`` holds the torch
    value of every node computed at import (parameters and constant subgraphs), added
    to the graph as a numpy constant only where a translated node reads it; ``poisoned``
    names the nodes that read a refused node's result.
    """

    def __init__(self, name: str) -> None:
        super().__init__(Graph(name, OPSET))
        self.env: dict[str, Any] = {}
        self.folded: dict[str, Any] = {}
        self.poisoned: set[str] = set()

    def value(self, arg: Any, dtype: str | None = None) -> str:
        """The IR value for an fx argument (a node, or a Python scalar as a constant)."""
        if isinstance(arg, torch.fx.Node):
            if arg.name in self.poisoned:
                raise Poisoned
            if arg.name in self.folded:
                if arg.name not in self.env:
                    tensor = self.folded[arg.name]
                    if not isinstance(tensor, torch.Tensor):
                        raise Refuse(f"input {arg.name!r} is not a tensor")
                    array = tensor.detach().cpu().contiguous().numpy()
                    self.env[arg.name] = self.const(array, arg.name)
                return self.cast(self.env[arg.name], dtype)
            v = self.env[arg.name]
            if not isinstance(v, str):
                raise Refuse(f"input {arg.name!r} is not a single tensor")
            return self.cast(v, dtype)
        if isinstance(arg, bool | int | float):
            return self.const(np.array(arg, dtype=dtype or np.asarray(arg).dtype), "scalar")
        raise Refuse(f"argument {arg!r} is not supported")

    def is_const(self, arg: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and arg.name in self.folded

    def constant(self, arg: torch.fx.Node) -> np.ndarray:
        return self.folded[arg.name].detach().cpu().contiguous().numpy()

    def emit(  # names the node after op and tag
        self,
        op: str,
        inputs: list[str],
        shape: Sequence[int],
        dtype: str,
        attrs: dict | None = None,
        tag: str = "v",
    ) -> str:
        """Add ``op``; its output is named after ``tag``, the node ``<op>_<tag>``.

        String attributes are stored as bytes, as the ONNX frontend has them (what
        ``onnx.helper.get_attribute_value`` returns), so both frontends give one IR.
        """
        attrs = {k: v.encode() if isinstance(v, str) else v for k, v in (attrs or {}).items()}
        return super().emit(
            op, inputs, shape, dtype, attrs, tag=tag, name=self.fresh(f"{op}_{tag}")
        )

    def out(self, node: torch.fx.Node, op: str, inputs: list[str], attrs: dict | None = None):
        """Emit ``op`` producing the value of ``node`` (its shape and dtype from meta)."""
        val = node.meta["val"]
        return self.emit(op, inputs, val.shape, dtype_name(val.dtype), attrs, tag=node.name)

    def cast(self, name: str, dtype: str | None) -> str:
        if dtype is None or self.dtype(name) == dtype:
            return name
        if self.graph.is_constant(name):
            return self.const(self.graph.constants[name].astype(dtype), name)
        return self.emit(
            "Cast", [name], self.shape(name), dtype, {"to": _onnx_type(dtype)}, tag=name
        )

    def ints(self, values: Sequence[int], tag: str = "idx") -> str:
        return self.const(np.array(list(values), dtype=np.int64), tag)

    def reshape(self, name: str, shape: Sequence[int], tag: str = "reshape") -> str:
        shape = tuple(int(d) for d in shape)
        if self.shape(name) == shape:
            return name
        if self.graph.is_constant(name):
            return self.const(self.graph.constants[name].reshape(shape), tag)
        return self.emit("Reshape", [name, self.ints(shape)], shape, self.dtype(name), tag=tag)

    def transpose(self, name: str, perm: Sequence[int], tag: str = "transpose") -> str:
        perm = [int(p) for p in perm]
        if perm == sorted(perm):
            return name
        if self.graph.is_constant(name):
            return self.const(self.graph.constants[name].transpose(perm), tag)
        shape = self.shape(name)
        moved = [d for d in perm if shape[d] != 1]
        if moved == sorted(moved):  # only size-1 dims move: a reshape, no data movement
            return self.reshape(name, [shape[p] for p in perm], tag)
        return self.emit(
            "Transpose",
            [name],
            [shape[p] for p in perm],
            self.dtype(name),
            {"perm": perm},
            tag=tag,
        )


# A converter: one fx node in, its IR value(s) out (see the module docstring).
Convert = Callable[[GraphBuilder, torch.fx.Node], Any]
