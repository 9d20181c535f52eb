"""Graph-level passes, the table that names them, and pipelines built from text.

A pass is a frozen dataclass with a ``name``, typed option fields and optional
``after``/``before`` ordering constraints; calling it on a :class:`~graphopt.ir.Graph`
returns :class:`PassResult`. ``PASSES`` is the explicit registry of built-in passes
(nothing registers itself on import); :func:`registry` adds users' passes from plugin
files and ``graphopt.passes`` entry points. ``DEFAULT_PIPELINE`` is what
``graphopt compile`` runs when no ``-p`` is given. Rewrite rules (``RewriteRule``) and
the passes made of them live in :mod:`graphopt.passes._rewrite`; see
``docs/writing-passes.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.passes._base import Pass, PassError, PassResult, run_passes
from graphopt.passes._functions import GRAPHOPT_DOMAIN
from graphopt.passes._pipeline import (
    ENTRY_POINT_GROUP,
    PipelineError,
    PluginError,
    entry_point_passes,
    load_plugin,
    merge_registry,
    order_passes,
    parse_pipeline,
    pass_options,
    pipeline_text,
)
from graphopt.passes._pipeline import build_pipeline as _build
from graphopt.passes._rewrite import Match, RewritePass, RewriteRule, apply_rules, rewrite_pass
from graphopt.passes.annotate_conv_groups import AnnotateConvGroups, FuseConvAct
from graphopt.passes.conv_transpose import ConvTransposeToConv
from graphopt.passes.cse import EliminateCommonSubexpressions
from graphopt.passes.dead_code import EliminateDeadCode
from graphopt.passes.eliminate_identity import EliminateIdentity
from graphopt.passes.eliminate_redundant import EliminateRedundant
from graphopt.passes.expand_rnn import ExpandRNN
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.fold_constants import FoldConstants
from graphopt.passes.fold_conv_mul_add import FoldConvMulAdd
from graphopt.passes.fuse_gelu import FuseGELU
from graphopt.passes.fuse_silu import FuseSiLU

__all__ = [
    "Pass",
    "PassError",
    "PassResult",
    "PipelineError",
    "PluginError",
    "RewriteRule",
    "RewritePass",
    "Match",
    "GRAPHOPT_DOMAIN",
    "ENTRY_POINT_GROUP",
    "run_passes",
    "apply_rules",
    "rewrite_pass",
    "PASSES",
    "DEFAULT_PIPELINE",
    "get_pass",
    "default_passes",
    "with_target_defaults",
    "registry",
    "build_pipeline",
    "parse_pipeline",
    "pipeline_text",
    "order_passes",
    "pass_options",
    "load_plugin",
    "EliminateCommonSubexpressions",
    "EliminateDeadCode",
    "EliminateIdentity",
    "EliminateRedundant",
    "ExpandRNN",
    "FoldBatchNorm",
    "FoldConstants",
    "FoldConvMulAdd",
    "AnnotateConvGroups",
    "ConvTransposeToConv",
    "FuseConvAct",
    "FuseSiLU",
    "FuseGELU",
]

PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        EliminateIdentity,
        FoldConstants,
        EliminateCommonSubexpressions,
        EliminateRedundant,
        ExpandRNN,
        FoldBatchNorm,
        FoldConvMulAdd,
        ConvTransposeToConv,
        FuseSiLU,
        FuseGELU,
        AnnotateConvGroups,
        EliminateDeadCode,
    )
}

# Order matters, and each pass declares what it must follow (``after``); this tuple is
# checked against those declarations. Identities go first so constant folding sees
# through them; CSE and redundant-op removal need folded shape constants; BatchNorm
# folding and the Conv Mul/Add fold need constant weights; RNN expansion precomputes
# transposed weights; ConvTranspose becomes a Conv once BatchNorm is folded into it; the
# conv+activation annotation sees the final ops; dead code last.
DEFAULT_PIPELINE: tuple[str, ...] = (
    "eliminate-identity",
    "fold-constants",
    "cse",
    "eliminate-redundant",
    "expand-rnn",
    "fold-batchnorm",
    "fold-conv-mul-add",
    "conv-transpose-to-conv",
    "fuse-silu",
    "fuse-gelu",
    "annotate-conv-groups",
    "dead-code",
)


def registry(plugin_files: Sequence[str | Path] = (), entry_points: bool = True) -> dict:
    """Built-in passes, plus those of installed entry points and of ``plugin_files``."""
    extra = []
    if entry_points:
        extra += [(f"entry point group {ENTRY_POINT_GROUP!r}", c) for c in entry_point_passes()]
    for path in plugin_files:
        extra += [(f"pass plugin {str(path)!r}", c) for c in load_plugin(path)]
    return merge_registry(PASSES, extra)


def build_pipeline(
    text: str | Sequence[str] | None = None,
    passes: dict[str, type[Pass]] | None = None,
    disable: Sequence[str] = (),
) -> list[Pass]:
    """Passes from pipeline text (None: the default pipeline), ordered by constraints."""
    return _build(text, PASSES if passes is None else passes, disable, DEFAULT_PIPELINE)


def get_pass(name: str) -> Pass:
    try:
        return PASSES[name]()
    except KeyError:
        raise GraphoptError(
            f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}"
        ) from None


def default_passes(defaults: Mapping[str, Mapping] | None = None) -> list[Pass]:
    """The default pipeline's passes; ``defaults`` (a target's ``pass_defaults``) fills
    the options they leave to the target (see :func:`with_target_defaults`)."""
    passes = [get_pass(n) for n in DEFAULT_PIPELINE]
    return with_target_defaults(passes, defaults) if defaults else passes


def with_target_defaults(
    passes: Sequence[Pass], defaults: Mapping[str, Mapping] | None
) -> list[Pass]:
    """``passes`` with each option that is None (left to the target, e.g. ``expand-rnn``'s
    ``fuse_steps``) set from ``defaults`` ({pass name: {option: value}}); options a user
    set, in pipeline text or by constructing the pass, stay as given."""
    out = []
    for p in passes:
        wanted = (defaults or {}).get(p.name, {})
        unset = {k: v for k, v in wanted.items() if getattr(p, k, False) is None}
        out.append(dataclasses.replace(p, **unset) if unset else p)
    return out
