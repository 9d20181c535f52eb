"""Graph-level passes and the table that names them.

A pass is a frozen dataclass with a ``name`` and typed option fields; calling it on a
:class:`~graphopt.ir.Graph` returns :class:`PassResult`. ``PASSES`` is the explicit
registry (nothing registers itself on import); ``DEFAULT_PIPELINE`` is what
``graphopt compile`` runs when no ``-p`` is given.
"""

from __future__ import annotations

from graphopt.passes._base import Pass, PassError, PassResult, run_passes
from graphopt.passes.dead_code import EliminateDeadCode
from graphopt.passes.eliminate_identity import EliminateIdentity
from graphopt.passes.expand_rnn import ExpandRNN
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.fold_constants import FoldConstants

__all__ = [
    "Pass",
    "PassError",
    "PassResult",
    "run_passes",
    "PASSES",
    "DEFAULT_PIPELINE",
    "get_pass",
    "default_passes",
]

PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (EliminateIdentity, FoldConstants, ExpandRNN, FoldBatchNorm, EliminateDeadCode)
}

# Order matters: identities go first so constant folding sees through them; BatchNorm
# folding needs the Conv weights as constants (after folding); RNN expansion too (it
# precomputes transposed weights); dead code last.
DEFAULT_PIPELINE: tuple[str, ...] = (
    "eliminate-identity",
    "fold-constants",
    "expand-rnn",
    "fold-batchnorm",
    "dead-code",
)


def get_pass(name: str) -> Pass:
    from graphopt.errors import GraphoptError

    try:
        return PASSES[name]()
    except KeyError:
        raise GraphoptError(
            f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}"
        ) from None


def default_passes() -> list[Pass]:
    return [get_pass(n) for n in DEFAULT_PIPELINE]
