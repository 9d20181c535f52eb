"""Software prefetch of weights that stream from memory, inserted into scheduled kernels.

A kernel whose weights are too large to stay in a cache between calls (ResNet-50's last
stage: about 80 MB of them, each call) reads them from memory inside a model. The
hardware prefetcher follows a run of addresses but does not jump ahead to where the next
parallel iteration reads, so each iteration starts waiting on memory while the FMA units
idle. The Winograd products (``_winograd.prefetch_products``) and the dense convs that
stream their weights (``_cpu_schedules.prefetch_streamed``) ask for the lines of that
next read one step ahead, a few lines at a time, with :func:`insert_at_loop`,
:func:`prefetch` and (the address: the kernel's own indexing at the next iteration)
:func:`next_read`.

Tried and left out (2-core Zen 5, ResNet-50 paired in one process, 21 rounds, one build
order): the dense convs' streamed reductions prefetching a whole step's weights (128
lines for a 1x1 conv's step) at once at the step's start, 1, 2, 4 or 8 steps ahead:
1.010-1.020x the time; the Winograd products 2 or 3 iterations ahead instead of 1:
1.006x. (Two builds timed in one process without huge pages later ran 4-7% apart by
build order alone, so such one-order figures are weak; the kept prefetches were also
measured in both orders, as artifacts, and inside the model with ``graphopt profile``.)

Also tried and left out (the same machine, 2026-12-06): each kernel prefetching the
*next* kernel's weights (256 KB or more; passed to it as an extra argument, spread over
its parallel iterations). Inside ResNet-50 the receivers gained (the 28x28 Winograd
convs 0.71 -> 0.59 ms a run) what the senders lost: the prefetched lines crowd the
sender's own L2 (the stage-1 1x1 convs 0.04-0.08 ms slower, the 1x1 convs that stream
their own weights 0.18-0.26); the whole model was within its A/A spread.

Where: at the top of a reduction loop whose body holds whole register tiles, never in
the innermost loop: a prefetch is a memory access LLVM cannot tell apart from the
accumulators (a workspace buffer in a parallel loop), so there it stored them to memory
at every step (2.7x slower). Into L2 (``prefetcht1``): the lines are read within
microseconds, and L1 is the register tile's working set.

Inserted into the scheduled loop nest (``ScheduleState.replace``), not by a schedule
instruction: a tuning record's trace replays without it; compile puts it into an applied
record's nest as into the default's, and the search measures each candidate with it
(``tuning._apply.as_built``), so the search varies the tiles around it, not it.
``GRAPHOPT_PREFETCH=0`` in the environment turns every prefetch off (for comparisons;
numbers do not change).
"""

from __future__ import annotations

import os

import tvm
from tvm import s_tir, tirx

__all__ = [
    "MIN_BYTES",
    "dtype",
    "enabled",
    "insert_at_loop",
    "loop_var",
    "next_read",
    "param_read",
    "prefetch",
    "read_indices",
    "serial",
]

_ENV = "GRAPHOPT_PREFETCH"
# Weights at least this large are prefetched: smaller ones stay in L2/L3 between calls
# (the dense convs' streaming threshold, _cpu_schedules._STREAM_WEIGHT_BYTES).
MIN_BYTES = 1 << 20


def enabled() -> bool:
    """Whether kernels prefetch their streamed weights (not ``GRAPHOPT_PREFETCH=0``)."""
    return os.environ.get(_ENV, "1") != "0"


def prefetch(buffer, indices: list) -> tirx.Stmt:  # noqa: ANN001 - a buffer Var
    """A statement prefetching into L2 the cache line of ``buffer[indices]``."""
    call = tirx.call_llvm_intrin(
        "void",
        "llvm.prefetch.p0",
        tirx.address_of(tirx.BufferLoad(buffer, indices)),
        tirx.const(0, "int32"),  # a read
        tirx.const(2, "int32"),  # locality 2: L2 (prefetcht1)
        tirx.const(1, "int32"),  # data
    )
    return tirx.Evaluate(call)


def loop_var(sch: s_tir.Schedule, loop) -> tirx.Var:  # noqa: ANN001
    """The variable of the loop ``loop`` (a LoopRV)."""
    return sch.get(loop).loop_var


def dtype(var: tirx.Var) -> str:
    """A loop variable's integer type."""
    return str(var.ty.dtype)


def insert_at_loop(sch: s_tir.Schedule, loop, stmt: tirx.Stmt) -> None:  # noqa: ANN001
    """Put ``stmt`` first in the body of ``loop`` (a LoopRV) of ``sch``, in place."""
    old = sch.get(loop)
    new = tirx.For(
        old.loop_var,
        old.min,
        old.extent,
        old.kind,
        tirx.SeqStmt([stmt, old.body]),
        old.thread_binding,
        old.annotations,
    )
    sch.state.replace(sch.get_sref(loop), new)


def serial(var: tirx.Var, extent: int, body: tirx.Stmt, start=None) -> tirx.For:  # noqa: ANN001
    """``for var in range(start, start + extent): body`` (start 0 by default)."""
    dt = dtype(var)
    first = tirx.const(0, dt) if start is None else start
    return tirx.For(var, first, tirx.const(extent, dt), tirx.ForKind.SERIAL, body)


def param_read(sch: s_tir.Schedule, block, ndim: int):  # noqa: ANN001, ANN201
    """The buffer of the kernel's parameters that ``block`` reads with ``ndim``
    dimensions (its weight), or None."""
    params = sch.mod["main"].params
    return next(
        (
            r.source
            for r in sch.get(block).reads
            if len(r.source.shape) == ndim and any(r.source.same_as(p) for p in params)
        ),
        None,
    )


def _read_map(sch: s_tir.Schedule, block, buffer):  # noqa: ANN001, ANN202
    """(the nest's loop variables, a function from their values to the indices where
    ``block`` reads ``buffer``: its read region's first element), or None if it does not
    read it or two loops share a name. The nest's own binding and read region, as
    IndexMaps built once."""
    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    read = next((r for r in realize.block.reads if r.source.same_as(buffer)), None)
    nest = [sch.get(lp).loop_var for lp in sch.get_loops(block)]
    if read is None or len({v.name for v in nest}) < len(nest):
        return None
    binding = tirx.IndexMap(nest, list(realize.iter_values), None)
    region = tirx.IndexMap(
        [v.var for v in realize.block.iter_vars], [r.min for r in read.region], None
    )
    return nest, lambda point: region.map_indices(binding.map_indices(point))


def read_indices(sch: s_tir.Schedule, block, buffer):  # noqa: ANN001, ANN201
    """A function from values of ``block``'s loops (outermost first) to the indices, as
    ints, where ``block`` reads ``buffer`` (its read region's first element) there; None
    if it does not read it. The nest's own binding, evaluated: what a prefetch must
    match."""
    found = _read_map(sch, block, buffer)
    if found is None:
        return None
    nest, indices = found
    dt = dtype(nest[0])

    def at(values: list[int]) -> list[int]:
        return [int(x) for x in indices([tirx.const(v, dt) for v in values])]

    return at


def next_read(sch: s_tir.Schedule, block, buffer, values: list):  # noqa: ANN001, ANN201
    """The indices where ``block`` reads ``buffer`` in the next iteration of its outermost
    (parallel) loop (the last iteration: its own), with the loops in ``values`` ((LoopRV,
    expression) pairs) at those expressions: the address a prefetch of the next
    iteration's lines asks for. None if the block does not read ``buffer``, or its first
    two iterations read the same element (the parallel loop is not over what streams)."""
    found = _read_map(sch, block, buffer)  # built once: evaluated, then substituted
    if found is None:
        return None
    nest, indices = found
    i, dt = nest[0], dtype(nest[0])
    zero = [tirx.const(0, dt)] * len(nest)
    first, second = indices(zero), indices([tirx.const(1, dt), *zero[1:]])
    if [int(x) for x in first] == [int(x) for x in second]:
        return None
    extent = int(sch.get(sch.get_loops(block)[0]).extent)
    at = {i.name: tirx.min(i + tirx.const(1, dt), tirx.const(extent - 1, dt))}
    at.update((sch.get(lp).loop_var.name, v) for lp, v in values)
    analyzer = tvm.sym.Analyzer()
    return [analyzer.simplify(x) for x in indices([at.get(v.name, v) for v in nest])]
