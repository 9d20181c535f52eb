"""An example graphopt pass plugin: ``graphopt compile m.onnx --pass-plugin my_passes.py``.

The contract (docs/writing-passes.md): a plugin file defines ``PASSES``, a list of
``graphopt.passes.Pass`` subclasses, or a function ``graphopt_passes()`` returning one.
graphopt imports the file, adds these passes to its table, and a pipeline can then name
them: ``-p "fold-constants,fuse-hardswish,count-ops{op=HardSwish}"``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from graphopt.ir import Graph
from graphopt.passes import Match, Pass, PassResult, RewriteRule, rewrite_pass

# --- a rewrite rule: x * HardSigmoid(x) -> HardSwish(x) -----------------------------


def hard_sigmoid_mul(op, x):
    return op.Mul(x, op.HardSigmoid(x))


def hard_swish(op, x):
    return op.HardSwish(x)


def is_hard_swish(graph: Graph, match: Match) -> str | None:
    """HardSwish(x) = x * HardSigmoid(x) only for alpha = 1/6, beta = 0.5."""
    hs = match.node("HardSigmoid")
    alpha, beta = hs.attrs.get("alpha", 0.2), hs.attrs.get("beta", 0.5)
    if abs(alpha - 1 / 6) > 1e-6 or abs(beta - 0.5) > 1e-6:
        return f"HardSigmoid(alpha={alpha:g}, beta={beta:g}) is not HardSwish's"
    return None


FuseHardSwish = rewrite_pass(
    "fuse-hardswish",
    [RewriteRule(hard_sigmoid_mul, hard_swish, is_hard_swish)],
    "Replace x * HardSigmoid(x, alpha=1/6, beta=0.5) by HardSwish(x).",
    after=("fold-constants",),
)


# --- a plain pass with a typed option ------------------------------------------------


@dataclass(frozen=True)
class CountOps(Pass):
    """Count the nodes of one op type (changes nothing; see --print-pass-times)."""

    name = "count-ops"
    op: str = "Conv"

    def run(self, graph: Graph) -> PassResult:
        stats = Counter({self.op: graph.op_counts()[self.op]})
        return PassResult(graph, False, stats)


PASSES = [FuseHardSwish, CountOps]
