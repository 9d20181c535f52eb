"""Lowering: graphopt's graph IR to a TVM Relax IRModule.

This is the one place that knows both the graph IR and Relax. ``CONVERTERS`` is the
explicit table of ONNX ops graphopt can compile, each with its :class:`OpRule` (a check
and the name of its converter); :func:`unsupported_nodes` reports every node outside it
(or with attribute values a check refuses) before anything compiles, without TVM.
"""

from graphopt.lower._ops import CONVERTERS, OpRule, unsupported_nodes

__all__ = ["CONVERTERS", "OpRule", "unsupported_nodes", "to_relax"]


def to_relax(graph):  # noqa: ANN001, ANN201 - imports TVM lazily
    """Lower ``graph`` (static shapes, supported ops only) to a Relax ``IRModule``."""
    from graphopt.lower.relax import to_relax as _to_relax

    return _to_relax(graph)
