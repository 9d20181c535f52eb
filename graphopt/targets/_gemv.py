"""The CPU schedule of a fused recurrent step (``graphopt::RNNStep``, lowered by
``graphopt.lower.relax.rnn_step_te``): a batch-1 GEMV over a packed weight plus the gate
math, one kernel per time step.

The kernel computes ``acc[b, j, q] = sum_k h[b, k] * rp[j, k, q]`` (``rp`` [H/U, H, G*U]:
the U columns of every gate for hidden units ``j*U ...``, side by side), then each gate's
activation and the state update, over [B, H/U, U]. Schedule, two weight blocks per pass::

    for j in 0, 2, 4, ...: for b:
        acc[j:j+2, 0:G*U] = 0                     # 2*G*U/lanes registers (8 for an LSTM)
        for k in H: acc[j+i, :] += h[b, k] * rp[j+i, k, :]   for i in 0, 1 (unrolled)
      each gate's activation, C_t, H_t for units j*U ... (j+2)*U   # vectorized

so the weight is read once, front to back (two streams), and every vector op is one
register wide (LLVM splits a 48- or 64-float vector with lane shuffles).

A weight of ``PARALLEL_MIN_BYTES`` or more (an LSTM of hidden 256: 1 MB) has its weight
blocks (the ``j`` loop) split across the cores in a ``parallel`` loop: each core then
streams its share of the weight, which fits its own L2 (1 MB on Zen 4) instead of coming
from L3 every step. The gate math of a weight block's hidden units follows its GEMV in
the same iteration, so each core finishes its own units while their accumulators are in
L1 and a step is one parallel launch (LSTM T=128, quiet, 2 threads: 2.36 ms against 2.44
for the unfused expansion; with the gate math serial after the loop it was 2.90 against
2.74). A smaller weight stays serial: already in one core's L2, it gains less than a
parallel launch per step costs.

Registration (``graphopt/targets/_cpu_schedules.py``): ``("rnn_step", _gemv.rule_rnn_step)``
first in ``RULES``. Without it the generic ``matmul`` rule schedules the kernel (correct,
slower).

A whole recurrent layer (``graphopt::RNNSequence``, :mod:`graphopt.lower._rnn_sequence`)
is a hand-written loop nest, not a TE compute: lowering emits its plain form, and
:func:`rule_rnn_sequence` swaps in the form built for the target's vector width (same
spec, vectorized and parallel). It goes first in ``RULES``: no other rule can read a
kernel without blocks.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from graphopt.lower import _rnn_sequence
from graphopt.targets._simd import vector_lanes

__all__ = [
    "ANNOTATION",
    "KIND",
    "PARALLEL_MIN_BYTES",
    "SEQUENCE_KIND",
    "rule_rnn_sequence",
    "rule_rnn_step",
]

ANNOTATION = "graphopt.kernel"
KIND = "rnn_step"
SEQUENCE_KIND = "rnn_sequence"
# Recurrent weights of at least this size split their GEMV across cores (see above).
PARALLEL_MIN_BYTES = 256 * 1024


def _vectorize(sch: s_tir.Schedule, loop, lanes: int) -> None:  # noqa: ANN001
    """Vectorize ``loop`` one register wide, the registers of a wider loop unrolled: LLVM
    splits a vector wider than a register (48, 96 floats) with lane shuffles."""
    extent = _extent(sch, loop)
    if extent > lanes and extent % lanes == 0:
        outer, loop = sch.split(loop, [None, lanes])
        sch.unroll(outer)
    sch.vectorize(loop)


def _annotated(sch: s_tir.Schedule, block) -> bool:  # noqa: ANN001
    ann = sch.get(block).annotations
    return ANNOTATION in ann and str(ann[ANNOTATION]) == KIND


def _extent(sch: s_tir.Schedule, loop) -> int:  # noqa: ANN001
    return int(sch.get(loop).extent)


def rule_rnn_step(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Schedule an ``rnn_step`` kernel (see the module docstring); None for any other."""
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except s_tir.schedule.ScheduleError:
        return None  # a kernel without a root block (an extern call, a loop nest)
    blocks = list(sch.get_child_blocks(root))
    matmuls = [b for b in blocks if _annotated(sch, b)]
    if len(matmuls) != 1:
        return None
    mm = matmuls[0]
    temps = {b.name for b in sch.get(root).alloc_buffers}  # the rest are the outputs
    # Inline the elementwise intermediates (pre-activations, the polynomials' parts) into
    # the activation blocks (``*_act``, kept) and the outputs.
    for block in blocks:
        name = sch.get(block).name_hint
        if name == sch.get(mm).name_hint or name.endswith("_act"):
            continue
        if all(w.source.name in temps for w in sch.get(block).writes):
            sch.compute_inline(block)
    blocks = list(sch.get_child_blocks(root))
    outs = [b for b in blocks if sch.get(b).name_hint != sch.get(mm).name_hint]
    lanes = vector_lanes(target)
    # The GEMV: per weight block j, per row b, the reduction outside and the block's G*U
    # columns inside, vectorized: G*U/lanes accumulators, in a local (register) buffer
    # written back once per (j, b).
    # Two weight blocks per pass (unrolled) give 2*G*U/lanes independent FMA chains, which
    # hide the FMA latency when the weight sits in L1/L2 (GRU/RNN of hidden 128).
    write_back = sch.cache_write(mm, 0, "local")
    b_loop, j_loop, q_loop, k_loop = sch.get_loops(mm)
    weight_bytes = 4 * _extent(sch, j_loop) * _extent(sch, k_loop) * _extent(sch, q_loop)
    pair = 2 if _extent(sch, j_loop) % 2 == 0 else 1
    jo, ji = sch.split(j_loop, [None, pair])
    sch.reorder(jo, b_loop, k_loop, ji, q_loop)
    sch.unroll(ji)
    if weight_bytes >= PARALLEL_MIN_BYTES and _extent(sch, jo) > 1:
        sch.parallel(jo)  # each core its own weight blocks (and its accumulators)
    _vectorize(sch, q_loop, lanes)
    sch.reverse_compute_at(write_back, b_loop)
    _vectorize(sch, sch.get_loops(write_back)[-1], lanes)
    init = sch.decompose_reduction(mm, k_loop)
    _vectorize(sch, sch.get_loops(init)[-1], lanes)
    # The gate math (each gate's activation, C_t, H_t) right after the weight blocks it
    # reads, inside the same (parallel) loop: each core finishes its own hidden units
    # while their accumulators are in L1, and a step is one parallel launch.
    for block in outs:
        try:
            sch.reverse_compute_at(block, jo)
        except (RuntimeError, ValueError):  # TVM's check failures
            pass  # a block TVM cannot place per weight block stays after the loop
        _vectorize(sch, sch.get_loops(block)[-1], lanes)
    return sch


class _Built:
    """What a rule returns when it builds the kernel rather than scheduling it: the
    ``mod`` of a schedule (``apply_rules`` reads ``sch.mod["main"]``)."""

    def __init__(self, func: tirx.PrimFunc) -> None:
        self.mod = tvm.IRModule({"main": func})


def rule_rnn_sequence(func: tirx.PrimFunc, target: tvm.target.Target) -> _Built | None:
    """The target's form of a lowered ``rnn_sequence`` kernel; None for any other."""
    spec = _rnn_sequence.spec_of(func)
    if spec is None:
        return None
    built = _rnn_sequence.sequence_func(spec, vector_lanes(target))
    return _Built(built.with_attrs({k: v for k, v in func.attrs.items() if k != "global_symbol"}))
