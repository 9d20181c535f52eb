"""Mark Conv/Gemm + bias + activation chains as groups, for drawings.

What it does: it *annotates* (hence the name; it was ``fuse-conv-act``, which promised a
fusion it never did, and that name still works in pipelines). Each ``Conv``,
``ConvTranspose``, ``Gemm`` or ``MatMul`` followed (through single-user values) by an
``Add`` of a constant bias and/or an activation (``Relu``, ``Clip``, ``LeakyRelu``,
``Sigmoid``, ``HardSigmoid``, ``HardSwish``, ``Tanh``, ``Gelu``, ``graphopt.SiLU``) gets a
``group`` attribute on its networkx node naming the group, which ``--svg`` drawings show
as one box. It does not change what is computed or how it is lowered: TVM's
``FuseOps``/``FuseTIR`` (in every target's pipeline) already fuse such elementwise tails
into the producer's kernel. A bias ``Add`` after a Conv is folded into the Conv itself by
``fold-conv-mul-add``.

Run it late (after the folds and ``fuse-silu``): passes that replace a node drop its
annotation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from graphopt.ir import Graph, Node
from graphopt.passes._base import Pass, PassResult

__all__ = ["AnnotateConvGroups", "FuseConvAct", "GROUP_ATTR", "groups"]

GROUP_ATTR = "group"
_ANCHORS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_ACTIVATIONS = (
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Gelu",
    "SiLU",
)


def _only_user(graph: Graph, node: Node) -> Node | None:
    out = node.outputs[0]
    users = graph.consumers(out)
    if len(users) != 1 or out in graph.outputs or len([o for o in node.outputs if o]) != 1:
        return None
    return users[0]


def _is_bias(graph: Graph, node: Node, previous: Node) -> bool:
    if node.op_type != "Add" or node.domain:
        return False
    other = [i for i in node.inputs if i != previous.outputs[0]]
    return len(other) == 1 and graph.is_constant(other[0])


def _is_activation(node: Node) -> bool:
    if node.op_type == "SiLU":
        return node.domain == "graphopt"
    return node.op_type in _ACTIVATIONS and not node.domain


def groups(graph: Graph) -> dict[str, list[str]]:
    """Group name -> member node names, from the ``group`` annotations."""
    found: dict[str, list[str]] = {}
    for node in graph.nodes():
        group = graph.nx_graph.nodes[node.name].get(GROUP_ATTR)
        if group is not None:
            found.setdefault(group, []).append(node.name)
    return found


@dataclass(frozen=True)
class AnnotateConvGroups(Pass):
    """Annotate Conv/Gemm + bias + activation chains as groups (for drawings)."""

    name = "annotate-conv-groups"
    after = ("fold-batchnorm", "fold-conv-mul-add", "fuse-silu")

    def run(self, graph: Graph) -> PassResult:
        stats: Counter = Counter()
        nxg = graph.nx_graph
        for node in graph.nodes():
            if node.op_type not in _ANCHORS or node.domain or GROUP_ATTR in nxg.nodes[node.name]:
                continue
            members = [node]
            nxt = _only_user(graph, node)
            if nxt is not None and _is_bias(graph, nxt, node):
                members.append(nxt)
                nxt = _only_user(graph, nxt)
            if nxt is not None and _is_activation(nxt):
                members.append(nxt)
            if len(members) == 1:
                continue
            for m in members:
                nxg.nodes[m.name][GROUP_ATTR] = node.name
            stats["+".join(m.op_type for m in members)] += 1
        return PassResult(graph, bool(stats), stats)


FuseConvAct = AnnotateConvGroups  # the old name, kept for plugins and scripts that use it
