"""graphopt's graph IR: ONNX operator semantics held in a networkx graph.

A :class:`Graph` is a set of :class:`Node` objects (ONNX ops, attributes as plain
Python values) connected by named values. Edges of the networkx ``DiGraph`` run from
the producer of a value to each consumer; graph algorithms (topological order,
reachability) come from networkx. Constants (ONNX initializers) are numpy arrays.

This module does not import TVM: passes and their tests run without it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["Graph", "Node", "Value", "graph_to_onnx"]


@dataclass
class Node:
    """One operator. ``inputs`` may hold ``""`` for an omitted optional input."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""

    def attr_str(self, key: str, default: str) -> str:
        """String attribute ``key`` as text (ONNX hands string attributes over as bytes)."""
        v = self.attrs.get(key, default)
        return v.decode() if isinstance(v, bytes) else v


@dataclass(frozen=True)
class Value:
    """Static facts about a value: its shape (ints, or str for symbolic dims) and dtype."""

    name: str
    shape: tuple[int | str, ...] | None
    dtype: str

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


class Graph:
    """A dataflow graph of ONNX-semantics nodes.

    ``inputs``/``outputs`` are value names in signature order; ``values`` maps every
    known value name to its :class:`Value`; ``constants`` maps constant names to arrays.
    """

    def __init__(self, name: str = "graph", opset: int = 17) -> None:
        self.name = name
        self.opset = opset
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        # The outputs' names as the user's model has them. Passes may rewire an output
        # to another value (dropping an Identity, say); the names users see stay these.
        self.output_names: list[str] | None = None
        self.values: dict[str, Value] = {}
        self.constants: dict[str, np.ndarray] = {}
        self._nx = nx.DiGraph()
        self._producer: dict[str, str] = {}
        self._users: dict[str, set[str]] = {}
        self._order = itertools.count()

    # --- building -------------------------------------------------------------
    def add_input(self, name: str, shape: tuple, dtype: str) -> None:
        self.inputs.append(name)
        self.values[name] = Value(name, tuple(shape), dtype)

    def add_constant(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        self.constants[name] = array
        self.values[name] = Value(name, tuple(int(d) for d in array.shape), str(array.dtype))
        return name

    def add_node(self, node: Node) -> Node:
        if node.name in self._nx:
            raise ValueError(f"duplicate node name {node.name!r}")
        self._nx.add_node(node.name, node=node, order=next(self._order))
        for out in node.outputs:
            if out:
                self._producer[out] = node.name
        self._connect(node)
        return node

    def remove_node(self, name: str) -> None:
        node = self.node(name)
        for out in node.outputs:
            if self._producer.get(out) == name:
                del self._producer[out]
        for inp in node.inputs:
            self._users.get(inp, set()).discard(name)
        self._nx.remove_node(name)

    def set_inputs(self, name: str, inputs: list[str]) -> None:
        """Rewire ``name`` to read ``inputs``, keeping edges in step."""
        node = self.node(name)
        for pred in list(self._nx.predecessors(name)):
            self._nx.remove_edge(pred, name)
        for inp in node.inputs:
            self._users.get(inp, set()).discard(name)
        node.inputs = list(inputs)
        self._connect(node)

    def replace_uses(self, old: str, new: str) -> None:
        """Make every consumer of value ``old`` (and the graph outputs) read ``new``."""
        for node in self.consumers(old):
            self.set_inputs(node.name, [new if i == old else i for i in node.inputs])
        self.outputs = [new if o == old else o for o in self.outputs]

    def _connect(self, node: Node) -> None:
        for inp in node.inputs:
            if not inp:
                continue
            self._users.setdefault(inp, set()).add(node.name)
            src = self._producer.get(inp)
            if src is not None:
                self._nx.add_edge(src, node.name)
        for out in node.outputs:
            for user in self._users.get(out, ()):
                if user != node.name:
                    self._nx.add_edge(node.name, user)

    def public_outputs(self) -> list[tuple[str, str]]:
        """``(user-facing name, value name)`` per graph output, in order."""
        names = self.output_names if self.output_names is not None else self.outputs
        return list(zip(names, self.outputs, strict=True))

    def unique_name(self, base: str) -> str:
        """A value/node name not used yet: ``base``, else ``base_1``, ``base_2``, ..."""

        def taken(name: str) -> bool:
            return name in self.values or name in self._nx or name in self._producer

        if not taken(base):
            return base
        for i in itertools.count(1):
            if not taken(f"{base}_{i}"):
                return f"{base}_{i}"
        raise AssertionError("unreachable")

    # --- queries --------------------------------------------------------------
    @property
    def nx_graph(self) -> nx.DiGraph:
        """The underlying networkx graph (node name -> ``{"node": Node}``)."""
        return self._nx

    def node(self, name: str) -> Node:
        return self._nx.nodes[name]["node"]

    def nodes(self) -> list[Node]:
        """Nodes in a deterministic topological order."""
        order = nx.get_node_attributes(self._nx, "order")
        names = nx.lexicographical_topological_sort(self._nx, key=order.__getitem__)
        return [self.node(n) for n in names]

    def producer(self, value: str) -> Node | None:
        name = self._producer.get(value)
        return None if name is None else self.node(name)

    def consumers(self, value: str) -> list[Node]:
        found = [self.node(n) for n in self._users.get(value, ())]
        return sorted(found, key=lambda n: self._nx.nodes[n.name]["order"])

    def is_constant(self, value: str) -> bool:
        return value in self.constants

    def op_counts(self) -> Counter:
        return Counter(n.op_type for n in self.nodes())

    def __len__(self) -> int:
        return self._nx.number_of_nodes()

    def copy(self) -> Graph:
        other = Graph(self.name, self.opset)
        other.inputs = list(self.inputs)
        other.outputs = list(self.outputs)
        other.output_names = None if self.output_names is None else list(self.output_names)
        other.values = dict(self.values)
        other.constants = dict(self.constants)
        for node in self.nodes():
            other.add_node(
                Node(
                    node.name,
                    node.op_type,
                    list(node.inputs),
                    list(node.outputs),
                    dict(node.attrs),
                    node.domain,
                )
            )
        return other


def graph_to_onnx(graph: Graph) -> onnx.ModelProto:
    """Write ``graph`` back to ONNX (for dumps and for checking passes with onnxruntime)."""
    helper = onnx.helper

    def info(name: str) -> onnx.ValueInfoProto:
        v = graph.values.get(name)
        if v is None:
            return helper.make_empty_tensor_value_info(name)
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(v.dtype))
        return helper.make_tensor_value_info(name, elem, v.shape)

    nodes = []
    for n in graph.nodes():
        nodes.append(
            helper.make_node(
                n.op_type, n.inputs, n.outputs, name=n.name, domain=n.domain or None, **n.attrs
            )
        )
    used = {i for n in graph.nodes() for i in n.inputs} | set(graph.outputs)
    inits = [
        numpy_helper.from_array(a, name) for name, a in graph.constants.items() if name in used
    ]
    g = helper.make_graph(
        nodes, graph.name, [info(i) for i in graph.inputs], [info(o) for o in graph.outputs], inits
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", graph.opset)])
