"""The search spaces ``tune`` offers: MetaSchedule's generic one, graphopt's rules, or both.

``graphopt``: a MetaSchedule :class:`ScheduleFn` that schedules a kernel with the same
ordered rules the default schedules use (``_cpu.schedule_rules()``: the kernel modules'
rules, such as the x86 bf16 ones, then ``_cpu_nhwc.RULES``, then ``_cpu_schedules.RULES``;
first fitting rule wins), but with the tunable rules' numeric choices (the register
tile's pixels and rows, a matmul's vector tile, the bf16 matmul's output blocks) emitted
as ``sample_categorical`` instructions whose decision is the default. The tunable rules
are those in ``_cpu_schedules.TUNABLE``, ``_cpu_nhwc.TUNABLE`` and each kernel module's
``TUNABLE``. Each structural alternative of a rule (``Plan``: parallel loop split, row
tile, kernel loops outside the channel chunk, kw unrolled) is one more design space, the
default plan first; so the first point of the first space is exactly the default
schedule (``default_trace`` checks it), and the evolutionary search mutates tile sizes
around it. A rule without choices (injective,
fallback) gives its default schedule as the only point: the search has nothing to try
there and the task ends as "search space exhausted" without a trial.

``generic``: MetaSchedule's post-order-apply with the target's schedule rules (the space
that finds what the rules do not know). ``both`` (the default): graphopt's space, then
the generic one (:func:`phases_of`), except for the kernels a kernel module keeps to its
own space (``OWN_SPACE_ONLY``: Winograd's; :func:`phases_for`).

Why a ScheduleFn and not dlight: dlight rules return one finished schedule with no
sampling instructions, so MetaSchedule could only measure it; a ScheduleFn's trace keeps
its sampled decisions, which the search's mutators change.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir.meta_schedule.space_generator import (
    PostOrderApply,
    ScheduleFn,
    SpaceGenerator,
    SpaceGeneratorUnion,
)

from graphopt.targets import _cpu, _cpu_nhwc, _cpu_schedules
from graphopt.targets._profile import packed_kernel as kernel_kind
from graphopt.tuning._options import SPACES

__all__ = [
    "SPACES",
    "space_generator",
    "graphopt_design_spaces",
    "default_trace",
    "has_choices",
    "phases_for",
    "phases_of",
]


def _rules() -> tuple[list, dict]:
    """The default schedule rules in their order (the CPU pipeline's own list, so the
    space and the default schedules cannot disagree), and the tunable ones' search
    functions: the fp32 rules' and each kernel module's (``TUNABLE``, optional)."""
    tunable = {**_cpu_schedules.TUNABLE, **_cpu_nhwc.TUNABLE}
    for module in _cpu.kernel_modules():
        tunable.update(getattr(module, "TUNABLE", {}))
    return _cpu.schedule_rules(), tunable


def graphopt_design_spaces(sch: s_tir.Schedule, target: tvm.target.Target) -> list:
    """The design spaces of the first rule that takes ``sch``'s kernel (its default plan
    first); ``[sch]`` unscheduled when no rule does."""
    rules, tunable = _rules()
    func = sch.mod["main"]
    for name, rule in rules:
        if name in tunable:
            schedule, plans = tunable[name]
            spaces = []
            for plan in plans:
                space = _try(schedule, sch.copy(), target, plan)
                if space is None and not spaces:
                    break  # the default plan declines: so does the rule
                if space is not None:
                    spaces.append(space)
            if spaces:
                return spaces
            continue
        try:
            found = rule(func, target)
        except Exception:  # noqa: BLE001 - a rule that cannot apply declines, as in apply_rules
            found = None
        if found is not None:
            return [found]
    return [sch]


def _try(schedule, sch: s_tir.Schedule, target, plan):  # noqa: ANN001, ANN202
    try:
        return schedule(sch, target, _cpu_schedules.SampledDecisions(), plan)
    except Exception:  # noqa: BLE001 - a plan that does not fit this kernel
        return None


def _graphopt_space(target: tvm.target.Target) -> ScheduleFn:
    def space(sch: s_tir.Schedule) -> list:
        return graphopt_design_spaces(sch, target)

    # no extra schedule rules: the space is what the function samples
    return ScheduleFn(space, sch_rules=[], postprocs="from-target", mutator_probs="from-target")


def phases_of(space: str) -> tuple[str, ...]:
    """The spaces a task is searched in, in order, for ``--space space``.

    ``both`` is graphopt's space first, then the generic one: graphopt's is small (tens of
    points around a default that is already good) and cheap to build, so it is searched
    to exhaustion or to its patience first; the generic space then gets what is left.
    (A ``SpaceGeneratorUnion`` would sample both at once, and spend most early trials on
    generic candidates far below the default.)"""
    if space not in SPACES:
        raise ValueError(f"unknown search space {space!r}; use one of {', '.join(SPACES)}")
    return ("graphopt", "generic") if space == "both" else (space,)


def phases_for(space: str, mod: tvm.IRModule) -> tuple[str, ...]:
    """The spaces the workload ``mod`` is searched in, in order, for ``--space space``:
    :func:`phases_of`, except that ``both`` leaves out the generic space for a kernel a
    kernel module lists in its ``OWN_SPACE_ONLY`` (by the ``graphopt.kernel`` annotation
    of its compute; ``_winograd``: the transforms and products, which the generic rules
    schedule as unrelated stages, many times slower than the default). An explicit
    ``--space generic`` still searches them."""
    phases = phases_of(space)
    if space == "both" and kernel_kind(mod) in _own_space_only():
        return ("graphopt",)
    return phases


def _own_space_only() -> frozenset:
    kinds: set = set()
    for module in _cpu.kernel_modules():
        kinds.update(getattr(module, "OWN_SPACE_ONLY", ()))
    return frozenset(kinds)


def space_generator(kind: str, target: tvm.target.Target) -> SpaceGenerator:
    """The space generator for one phase: "generic", "graphopt", or "union" (both at
    once, for a caller that wants one search over both)."""
    if kind == "generic":
        return PostOrderApply()
    if kind == "graphopt":
        return _graphopt_space(target)
    if kind == "union":
        return SpaceGeneratorUnion([_graphopt_space(target), PostOrderApply()])
    raise ValueError(f"unknown search space {kind!r}")


_ATTRS = ("graphopt.schedule_rule", "graphopt.fast_path", "tirx.is_scheduled")


def default_trace(
    mod: tvm.IRModule, target: tvm.target.Target, default: tvm.IRModule
) -> s_tir.Trace | None:
    """The trace of the graphopt space's first point for the workload ``mod``, if it
    schedules the kernel exactly as ``default`` (the default schedule) does; else None.

    Seeded into the search's database with the default's measured time, it is where the
    evolutionary search starts mutating from."""
    spaces = graphopt_design_spaces(s_tir.Schedule(mod), target)
    first = spaces[0]
    if first.trace is None or not same_kernel(first.mod, default):
        return None
    return first.trace


def same_kernel(a: tvm.IRModule, b: tvm.IRModule) -> bool:
    """Whether two scheduled workload modules are the same kernel (graphopt's bookkeeping
    attributes aside)."""
    fa, fb = a["main"], b["main"]
    for key in _ATTRS:
        if fa.attrs is not None and key in fa.attrs:
            fa = fa.without_attr(key)
        if fb.attrs is not None and key in fb.attrs:
            fb = fb.without_attr(key)
    return bool(tvm_ffi.structural_equal(fa, fb))


_SAMPLING = ("SampleCategorical", "SamplePerfectTile", "SampleComputeLocation")


def has_choices(mod: tvm.IRModule, target: tvm.target.Target) -> bool:
    """Whether the graphopt space of the workload ``mod`` holds more than its default (a
    rule without choices offers only the default, already measured)."""
    spaces = graphopt_design_spaces(s_tir.Schedule(mod), target)
    if len(spaces) > 1:
        return True
    trace = spaces[0].trace
    return trace is not None and any(inst.kind.name in _SAMPLING for inst in trace.insts)
