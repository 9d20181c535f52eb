"""Compilation targets: one module per target, one table that names them.

Each target module provides ``NAME``, ``DESCRIPTION``, ``OPTIONS`` (option -> help),
``LAYOUTS`` (layout name -> :class:`~graphopt.targets._layout.Layout`, its default
first, also named by ``DEFAULT_LAYOUT``), ``tvm_target(**options)``,
``phases(target, layout)`` (Relax pass lists per phase, in the shape of TVM's
``relax/backend/<target>/pipeline.py``), ``export(executable, path)`` and ``load(path)``.
``TARGETS`` maps names to modules; nothing else in graphopt branches on target names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import ModuleType

from graphopt.errors import TargetError
from graphopt.targets import _layout, arm, cuda, x86

__all__ = ["TARGETS", "TargetSpec", "resolve", "module_for", "check_layout"]

TARGETS: dict[str, ModuleType] = {x86.NAME: x86, arm.NAME: arm, cuda.NAME: cuda}


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: graphopt's name for it plus the TVM target dict."""

    name: str
    tvm: dict = field(default_factory=dict)

    @property
    def module(self) -> ModuleType:
        return TARGETS[self.name]


def module_for(name: str) -> ModuleType:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r}; available: {', '.join(TARGETS)}") from None


def resolve(spec: str | dict, **options) -> TargetSpec:
    """Turn ``"x86"`` or a TVM target dict (or its JSON text) into a :class:`TargetSpec`."""
    if isinstance(spec, str) and spec.strip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise TargetError(f"--target looks like JSON but does not parse: {exc}") from None
    if isinstance(spec, dict):
        if options:
            raise TargetError(
                f"with a TVM target dict, put {', '.join(sorted(options))} in the dict itself"
            )
        for name, module in TARGETS.items():
            if module.accepts(spec):
                return TargetSpec(name, module.check_tvm_dict(spec))
        raise TargetError(
            f"no graphopt target accepts TVM target {json.dumps(spec)}; "
            f"available: {', '.join(TARGETS)}"
        )
    if not isinstance(spec, str):
        raise TargetError(f"target must be a name or a dict, got {type(spec).__name__}")
    module = module_for(spec)
    unknown = sorted(set(options) - set(module.OPTIONS))
    if unknown:
        raise TargetError(f"target {spec!r} has no option(s) {', '.join(unknown)}")
    return TargetSpec(module.NAME, module.tvm_target(**options))


def check_layout(spec: TargetSpec, layout: str | None) -> str:
    """The layout name ``spec``'s target compiles with: ``layout`` if the target offers
    it, its default when None; else a :class:`TargetError` naming what it offers."""
    return _layout.choose(spec.name, spec.module.LAYOUTS, layout).name
