"""The pass protocol: named, typed options, returns ``PassResult(graph, modified, stats)``."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from graphopt.errors import GraphoptError
from graphopt.ir import Graph

__all__ = ["Pass", "PassResult", "PassError", "run_passes"]


@dataclass
class PassResult:
    graph: Graph
    modified: bool
    stats: Counter = field(default_factory=Counter)


class PassError(GraphoptError):
    """A pass raised; the message names it and the passes that ran before it."""


@dataclass(frozen=True)
class Pass:
    """Base class. Subclasses set ``name``, a docstring, and implement :meth:`run`.

    ``after``/``before`` name passes this one must run after/before when both are in a
    pipeline; :func:`graphopt.passes.build_pipeline` orders by them (a topological sort).
    Option fields are dataclass fields with type hints (int, float, bool, str).
    """

    name: ClassVar[str] = ""
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, graph: Graph) -> PassResult:
        return self.run(graph)


def run_passes(
    graph: Graph,
    passes: list[Pass],
    observe: Callable[[int, Pass, str, Graph], None] | None = None,
) -> tuple[Graph, list[dict]]:
    """Run ``passes`` in order; return the final graph and one record per pass.

    ``observe(index, pass, "before" | "after", graph)``, when given, sees the graph around
    every pass (``--dump-ir`` writes it out).
    """
    records: list[dict] = []
    for index, p in enumerate(passes, start=1):
        if observe is not None:
            observe(index, p, "before", graph)
        start = time.perf_counter()
        try:
            result = p(graph)
        except GraphoptError:
            raise
        except Exception as exc:
            ran = ", ".join(r["name"] for r in records) or "none"
            raise PassError(
                f"pass {p.name!r} failed: {type(exc).__name__}: {exc} (passes run before it: {ran})"
            ) from exc
        graph = result.graph
        records.append(
            {
                "name": p.name,
                "modified": result.modified,
                "stats": dict(result.stats),
                "seconds": round(time.perf_counter() - start, 4),
            }
        )
        if observe is not None:
            observe(index, p, "after", graph)
    return graph, records
