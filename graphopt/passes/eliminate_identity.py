"""Remove ops that are the identity at inference: ``Identity`` and ``Dropout``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from graphopt.ir import Graph
from graphopt.passes._base import Pass, PassResult


@dataclass(frozen=True)
class EliminateIdentity(Pass):
    """Drop Identity and inference-mode Dropout, rewiring consumers to the input."""

    name = "eliminate-identity"

    def run(self, graph: Graph) -> PassResult:
        stats: Counter = Counter()
        for node in graph.nodes():
            if node.op_type not in ("Identity", "Dropout") or node.domain:
                continue
            # Dropout's optional mask output, or a training_mode input, keeps the node.
            if node.op_type == "Dropout" and (
                len([o for o in node.outputs if o]) > 1 or (len(node.inputs) > 2 and node.inputs[2])
            ):
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if dst in graph.outputs and (src in graph.inputs or src in graph.outputs):
                continue  # an output that is an input needs the copy
            graph.remove_node(node.name)
            graph.replace_uses(dst, src)
            stats[node.op_type] += 1
        return PassResult(graph, bool(stats), stats)
