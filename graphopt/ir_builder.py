"""Adding constants and nodes to a graph under fresh names: :class:`IRBuilder`.

The one "emit a node, fold constants, pick a fresh name" core, shared by the torch
frontend's ``GraphBuilder``, the ``expand-rnn`` pass and the rewrite engine's
replacement builder (``op`` in a rule's replacement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphopt.ir import Graph, Node, Value

__all__ = ["IRBuilder"]


class IRBuilder:
    """Adds constants and nodes to ``graph``, each under a name no value or node has.

    Names are ``base``, else ``base_1``, ``base_2``, ... (as ``Graph.unique_name``), or,
    given a ``prefix``, ``prefix_base_1``, ``prefix_base_2``, ... with one count over all
    bases, so the nodes a source node expands into read as its parts. Either way the
    next number is remembered, not searched for from 1: an unrolled LSTM makes thousands
    of nodes from a handful of bases. A name handed out is never handed out again, even
    before anything carries it in the graph (the rewrite engine records nodes first).
    """

    def __init__(self, graph: Graph, prefix: str = "") -> None:
        self.graph = graph
        self.prefix = prefix
        self._next: dict[str, int] = {}  # base -> next suffix to try (no prefix)
        self._count = 0  # the one running count (with a prefix)
        self._issued: set[str] = set()

    def taken(self, name: str) -> bool:
        """Whether ``name`` is a value or node of the graph, or was handed out already."""
        g = self.graph
        return (
            name in self._issued
            or name in g.values
            or name in g.nx_graph
            or g.producer(name) is not None
        )

    def fresh(self, base: str) -> str:
        """A new value/node name made from ``base`` (see the class docstring)."""
        if self.prefix:
            while True:
                self._count += 1
                name = f"{self.prefix}_{base}_{self._count}"
                if not self.taken(name):
                    self._issued.add(name)
                    return name
        k = self._next.get(base, 0)
        name = base if k == 0 else f"{base}_{k}"
        while self.taken(name):
            k += 1
            name = f"{base}_{k}"
        self._next[base] = k + 1
        self._issued.add(name)
        return name

    def const(self, array: Any, tag: str) -> str:
        """Add ``array`` as a constant under a fresh name from ``tag``; returns the name."""
        return self.graph.add_constant(self.fresh(tag), np.asarray(array))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.graph.values[name].shape)

    def dtype(self, name: str) -> str:
        return self.graph.values[name].dtype

    def emit(
        self,
        op: str,
        inputs: Sequence[str],
        shape: Sequence[int],
        dtype: str,
        attrs: dict | None = None,
        *,
        tag: str | None = None,
        out: str | None = None,
        name: str | None = None,
        fold: Callable[..., np.ndarray] | None = None,
        const_inputs: Sequence[str] = (),
    ) -> str:
        """Add node ``op(*inputs, *const_inputs)`` with one output; returns the output's name.

        The output is ``out``, else a fresh name from ``tag`` (default: ``op`` in lower
        case), of ``shape`` and ``dtype``. The node is ``name``, else the output's name
        when that is fresh, else a fresh name from ``tag``. With ``fold`` given and every
        one of ``inputs`` a constant, no node is added: the output is the constant
        ``fold(*arrays)``.
        """
        tag = tag or op.lower()
        if fold is not None and all(self.graph.is_constant(i) for i in inputs):
            result = np.asarray(fold(*(self.graph.constants[i] for i in inputs)))
            return self.graph.add_constant(out, result) if out else self.const(result, tag)
        value = out or self.fresh(tag)
        node = name or (value if out is None else self.fresh(tag))
        self.graph.values[value] = Value(value, tuple(int(d) for d in shape), dtype)
        self.graph.add_node(Node(node, op, [*inputs, *const_inputs], [value], dict(attrs or {})))
        return value
