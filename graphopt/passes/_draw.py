"""Draw a graph as SVG with Graphviz (``dot``), fused groups boxed.

The DOT text is written here (no pydot needed); ``dot -Tsvg`` renders it. Op nodes show
their type and output shape; graph inputs and outputs are ellipses; constants are not
drawn (a node lists how many it reads). Nodes that ``annotate-conv-groups`` annotated with the
same ``group`` sit in one shaded cluster. A path ending in ``.dot`` gets the DOT text
itself, which needs no Graphviz.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.ir import Graph
from graphopt.passes.annotate_conv_groups import GROUP_ATTR

__all__ = ["to_dot", "write_svg", "require_dot"]


def _q(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _shape(graph: Graph, name: str) -> str:
    v = graph.values.get(name)
    if v is None or v.shape is None:
        return "?"
    return "x".join(str(d) for d in v.shape)


def to_dot(graph: Graph, title: str = "") -> str:
    """DOT text for ``graph``."""
    lines = [
        f"digraph {_q(graph.name)} {{",
        "  rankdir=TB; node [fontname=Helvetica fontsize=10]; edge [fontsize=8];",
    ]
    if title:
        lines.append(f"  label={_q(title)}; labelloc=t;")
    ids = {}
    for k, name in enumerate(graph.inputs):
        ids[name] = f"in{k}"
        label = f"{name}\n{_shape(graph, name)}"
        lines.append(
            f"  in{k} [shape=ellipse style=filled fillcolor=lightyellow label={_q(label)}]"
        )
    clusters: dict[str, list[str]] = {}
    producer_id = dict(ids)
    for k, node in enumerate(graph.nodes()):
        nid = f"n{k}"
        n_const = sum(1 for i in node.inputs if graph.is_constant(i))
        op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        label = op + (f" (+{n_const} const)" if n_const else "")
        if node.outputs and node.outputs[0]:
            label += f"\n{_shape(graph, node.outputs[0])}"
        decl = f"  {nid} [shape=box style=rounded label={_q(label)} tooltip={_q(node.name)}]"
        group = graph.nx_graph.nodes[node.name].get(GROUP_ATTR)
        if group is None:
            lines.append(decl)
        else:
            clusters.setdefault(group, []).append(decl)
        for out in node.outputs:
            if out:
                producer_id[out] = nid
    for k, (group, decls) in enumerate(clusters.items()):
        lines.append(f"  subgraph cluster_{k} {{")
        lines.append(
            f"    label={_q('fused: ' + group)}; style=filled; fillcolor=lightblue; fontsize=9;"
        )
        lines.extend("  " + d for d in decls)
        lines.append("  }")
    for k, node in enumerate(graph.nodes()):
        for i in node.inputs:
            if i in producer_id:
                lines.append(f"  {producer_id[i]} -> n{k}")
    for k, name in enumerate(graph.outputs):
        lines.append(f"  out{k} [shape=ellipse style=filled fillcolor=lightgrey label={_q(name)}]")
        if name in producer_id:
            lines.append(f"  {producer_id[name]} -> out{k}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def require_dot(path: str | Path) -> None:
    """Fail early, in one line, when ``path`` needs Graphviz and it is missing."""
    if Path(path).suffix != ".dot" and shutil.which("dot") is None:
        raise GraphoptError(
            f"--svg {path}: Graphviz's `dot` is not installed; install the Debian package "
            "`graphviz` (apt-get install graphviz), or write DOT text with a .dot path"
        )


def write_svg(graph: Graph, path: str | Path, title: str = "") -> Path:
    """Render ``graph`` to ``path`` (SVG via ``dot``; DOT text for a ``.dot`` path)."""
    path = Path(path)
    require_dot(path)
    text = to_dot(graph, title)
    if path.suffix == ".dot":
        path.write_text(text)
        return path
    proc = subprocess.run(
        ["dot", "-Tsvg", "-o", str(path)], input=text, text=True, capture_output=True
    )
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else "no message"
        raise GraphoptError(f"--svg {path}: dot failed: {msg}")
    return path
