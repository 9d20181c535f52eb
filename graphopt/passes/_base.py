"""The pass protocol: named, typed options, returns ``PassResult(graph, modified, stats)``."""

from __future__ import annotations

import time
from collections import Counter
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
    """Base class. Subclasses set ``name`` and ``doc`` and implement :meth:`run`."""

    name: ClassVar[str] = ""

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, graph: Graph) -> PassResult:
        return self.run(graph)


def run_passes(graph: Graph, passes: list[Pass]) -> tuple[Graph, list[dict]]:
    """Run ``passes`` in order; return the final graph and one record per pass."""
    records: list[dict] = []
    for p in passes:
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
    return graph, records
