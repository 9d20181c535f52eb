"""Tuning tasks: the fused kernels graphopt's own pipeline produces for a model.

The model goes through the same lowering and the target's Relax phases that ``compile``
runs, in the same layout, up to (not including) the ``schedule`` phase: so each task is
exactly a PrimFunc the compile-time :func:`~graphopt.tuning.ApplyTuningDatabase` pass
will look up when ``compile`` uses that layout. (Kernels of another layout are other
workloads: a database tuned in one layout simply has no records for them.)
Identical kernels (same structure) are one task, weighted by how often the model calls it.
Kernels the built model never runs are no tasks (:func:`views`): a reshape, or a layout
transform that only reshapes (NCHWc to NCHW of a 1x1 map before a flatten), becomes a
view of its input after the ``schedule`` phase, so trials spent on it bought nothing and a
record for it counted as "used" in compile's report while no call of it was left.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import relax, tirx

from graphopt.lower import _rnn_sequence
from graphopt.targets import pipeline_phases
from graphopt.tuning._database import workload_mod

__all__ = ["Task", "extract_tasks", "phases_before_schedule", "views"]


@dataclass
class Task:
    """One kernel to tune: ``mod`` is the normalized PrimFunc module (the DB key)."""

    name: str
    mod: tvm.IRModule
    func: tirx.PrimFunc  # as it sits in the model (for the default schedule)
    flops: float
    calls: int
    measured_secs: float | None = None  # its default schedule's time, once measured

    @property
    def weight(self) -> float:
        """Its share of a model run: measured time x calls once known, else FLOPs x calls."""
        if self.measured_secs is not None:
            return self.measured_secs * self.calls
        return max(self.flops, 1.0) * self.calls


def phases_before_schedule(
    spec, target, layout: str | None = None, precision: str = "fp32"
) -> list:  # noqa: ANN001, E501 - TargetSpec, tvm Target
    """The Relax passes ``build`` runs (in ``layout``, at ``precision``) before the
    target's ``schedule`` phase."""
    passes = []
    for name, phase in pipeline_phases(spec, target, layout, precision=precision).items():
        if name == "schedule":
            return passes
        passes.extend(phase)
    raise ValueError(f"target {spec.name} has no 'schedule' phase to tune")


def _call_counts(mod: tvm.IRModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    calls = [tvm.ir.Op.get(n) for n in ("relax.call_tir", "relax.call_tir_inplace")]

    def visit(expr) -> None:  # noqa: ANN001
        if isinstance(expr, relax.Call) and any(expr.op.same_as(op) for op in calls):
            gvar = expr.args[0]
            counts[gvar.name_hint] = counts.get(gvar.name_hint, 0) + 1

    for _gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def views(mod: tvm.IRModule) -> set[str]:
    """The PrimFuncs of ``mod`` (a model before its ``schedule`` phase) that the built model
    never calls: every call of theirs is one that the ``dataflow_lower`` phase's
    ``RewriteDataflowReshape`` turns into a view (``vm.builtin.reshape``). The tuner makes
    no task of them and ``compile`` applies no record to them."""
    before = _call_counts(mod)
    after = _call_counts(relax.transform.RewriteDataflowReshape()(mod))
    return {name for name in before if not after.get(name)}


def _flops(mod: tvm.IRModule) -> float:
    try:
        return float(tvm.s_tir.analysis.estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - data movement kernels may not be countable
        return 0.0


def extract_tasks(
    relax_mod: tvm.IRModule,
    spec,  # noqa: ANN001 - TargetSpec
    target,  # noqa: ANN001 - tvm Target
    pattern: str | None = None,
    layout: str | None = None,
    precision: str = "fp32",
) -> list[Task]:
    """Tasks of a lowered model in ``layout`` (default: the target's), largest weight
    first; ``pattern`` filters by name (glob). At ``precision`` "bf16"/"fp16" the tasks are
    the lower-precision kernels ``compile(..., precision=)`` builds. Kernels of the
    tensorized rules (x86 bf16, ARM fp16) are tasks too: graphopt's space varies them and
    keeps the tensorization (the kernel modules' ``TUNABLE``); a generic record applies
    only when it measured faster."""
    with target:
        passes = phases_before_schedule(spec, target, layout, precision)
        mod = tvm.transform.Sequential(passes)(relax_mod)
    counts = _call_counts(mod)
    skipped = views(mod)
    tasks: list[Task] = []
    by_hash: dict[int, list[Task]] = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
            continue
        if _rnn_sequence.spec_of(func) is not None:
            continue  # a hand-written loop nest (no blocks): nothing for a search to vary
        name = gvar.name_hint
        if name in skipped:
            continue  # the built model runs a view instead
        calls = counts.get(name, 1)
        wmod = workload_mod(func)
        h = tvm_ffi.structural_hash(wmod)
        same = [t for t in by_hash.get(h, []) if tvm_ffi.structural_equal(t.mod, wmod)]
        if same:
            same[0].calls += calls
            continue
        task = Task(name=name, mod=wmod, func=func, flops=_flops(wmod), calls=calls)
        by_hash.setdefault(h, []).append(task)
        tasks.append(task)
    if pattern:
        globs = [p.strip() for p in pattern.split(",") if p.strip()]
        tasks = [t for t in tasks if any(fnmatch.fnmatch(t.name, g) or g in t.name for g in globs)]
    tasks.sort(key=lambda t: (-t.weight, t.name))
    return tasks
