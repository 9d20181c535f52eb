"""Remove nodes and constants that no graph output depends on."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import networkx as nx

from graphopt.ir import Graph
from graphopt.passes._base import Pass, PassResult


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    """Drop every node from which no graph output is reachable, then unused constants."""

    name = "dead-code"

    def run(self, graph: Graph) -> PassResult:
        g = graph.nx_graph
        live = set()
        for out in graph.outputs:
            prod = graph.producer(out)
            if prod is not None:
                live |= {prod.name} | nx.ancestors(g, prod.name)
        stats: Counter = Counter()
        for name in [n for n in g.nodes if n not in live]:
            graph.remove_node(name)
            stats["nodes"] += 1
        used = {i for n in graph.nodes() for i in n.inputs} | set(graph.outputs)
        for name in [c for c in graph.constants if c not in used]:
            del graph.constants[name]
            stats["constants"] += 1
        return PassResult(graph, bool(stats), stats)
