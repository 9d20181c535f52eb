"""Compilation targets: one module per target, one table that names them.

Each target module defines ``TARGET``, a :class:`~graphopt.targets._contract.Target`
record: its name, options, layouts (the default first), ``tvm_target(**options)``,
``phases(target, layout, extra_schedule_passes)`` (Relax pass lists per phase, in the
shape of TVM's ``relax/backend/<target>/pipeline.py``), ``export``, ``load`` and the
optional parts with defaults (features, cross compiler, ``cannot_run_here``, tunable).
``TARGETS`` maps names to those records; nothing else in graphopt branches on target
names. :func:`build` runs a target's phases and ``tvm.compile`` (for CPU targets its
steps, with the kernels built on every core: :mod:`graphopt.targets._link`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from graphopt.errors import TargetError
from graphopt.targets import _layout, _link, _precision, arm, cuda, x86
from graphopt.targets._contract import Target

__all__ = [
    "TARGETS",
    "Target",
    "TargetSpec",
    "resolve",
    "target_named",
    "check_layout",
    "build",
    "pipeline_phases",
    "check_precision",
    "tvm_version",
]

TARGETS: dict[str, Target] = {t.name: t for t in (x86.TARGET, arm.TARGET, cuda.TARGET)}

# Graph-pass options each target chooses ({pass name: {option: value}}, its module's
# ``PASS_DEFAULTS``): they fill the options a pipeline leaves None (graphopt.prepare).
_PASS_DEFAULTS: dict[str, dict] = {m.NAME: m.PASS_DEFAULTS for m in (x86, arm, cuda)}


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: graphopt's name for it plus the TVM target dict."""

    name: str
    tvm: dict = field(default_factory=dict)

    @property
    def target(self) -> Target:
        return target_named(self.name)

    @property
    def pass_defaults(self) -> dict[str, dict]:
        """Options this target chooses for graph passes, e.g. ``{"expand-rnn":
        {"fuse_steps": True}}``; ``compile``, ``profile`` and ``tune`` hand them to
        :func:`graphopt.prepare.prepare`."""
        return _PASS_DEFAULTS.get(self.name, {})


def target_named(name: str) -> Target:
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
        for name, target in TARGETS.items():
            if target.accepts(spec):
                return TargetSpec(name, target.check_tvm_dict(spec))
        raise TargetError(
            f"no graphopt target accepts TVM target {json.dumps(spec)}; "
            f"available: {', '.join(TARGETS)}"
        )
    if not isinstance(spec, str):
        raise TargetError(f"target must be a name or a dict, got {type(spec).__name__}")
    target = target_named(spec)
    unknown = sorted(set(options) - set(target.options))
    if unknown:
        raise TargetError(f"target {spec!r} has no option(s) {', '.join(unknown)}")
    return TargetSpec(target.name, target.tvm_target(**options))


def check_layout(spec: TargetSpec, layout: str | None) -> str:
    """The layout name ``spec``'s target compiles with: ``layout`` if the target offers
    it, its default when None; else a :class:`TargetError` naming what it offers."""
    return _layout.choose(spec.name, spec.target.layouts, layout).name


def check_precision(spec: TargetSpec, precision: str) -> str:
    """``precision`` if ``spec``'s target computes in it, else a :class:`TargetError`
    naming the missing feature (avx512_bf16, +fullfp16, sm_80, ...)."""
    why = _precision.refusal(spec.tvm, precision)
    if why is not None:
        raise TargetError(why)
    return precision


def build(
    mod,  # noqa: ANN001
    spec: TargetSpec,
    layout: str,
    extra_schedule_passes: Sequence = (),
    precision: str = "fp32",
):  # noqa: ANN201
    """``tvm.compile`` of a Relax module with ``spec``'s phases in ``layout``; the caller's
    ``extra_schedule_passes`` (a tuning database's) schedule first. With ``precision``
    "bf16"/"fp16", a ``precision`` phase right after the layout phase converts convs and
    weight matmuls (:mod:`graphopt.targets._precision`). Returns the VM executable
    ``spec.target.export`` writes."""
    import tvm

    target = tvm.target.Target(spec.tvm)
    phases = pipeline_phases(spec, target, layout, extra_schedule_passes, precision)

    @tvm.transform.module_pass(opt_level=0, name=f"graphopt_{spec.name}_pipeline")
    def pipeline(m, _ctx):  # noqa: ANN001, ANN202
        with target:
            return tvm.transform.Sequential([p for ps in phases.values() for p in ps])(m)

    if target.kind.name == "llvm":  # CPU kernels build on every core (_link)
        return _link.build(mod, target, pipeline)
    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def pipeline_phases(
    spec: TargetSpec,
    target,  # noqa: ANN001 - a tvm Target
    layout: str | None,
    extra_schedule_passes: Sequence = (),
    precision: str = "fp32",
) -> dict[str, list]:
    """The Relax passes :func:`build` runs, by phase: the target's phases in ``layout``
    with a ``precision`` phase after ``layout`` (first without one), where convs are in
    their final layout and LegalizeOps has not run yet. Tuning extracts its tasks from
    the phases before ``schedule``, so that they are the kernels ``build`` schedules."""
    phases = spec.target.phases(target, layout, extra_schedule_passes)
    lower = _precision.LowerPrecision(precision, spec.target.keeps_fp32)
    out = {} if "layout" in phases else {"precision": [lower]}
    for name, passes in phases.items():
        out[name] = passes
        if name == "layout":
            out["precision"] = [lower]
    return out


def tvm_version() -> str:
    import tvm

    return tvm.__version__
