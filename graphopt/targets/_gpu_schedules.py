"""Default GPU schedules beyond TVM's dlight rules, and the check that every kernel got one.

``Conv2dDirect`` takes the convolutions dlight's ``Matmul`` rule declines (depthwise and
grouped convs, whose per-group reduction is too small to be a GEMM) and pools: each
thread keeps a row of ``vx`` adjacent outputs in registers and walks the filter window
for them, so the overlapping input pixels are read once per row instead of once per
output. Without it those convs fall to ``Reduction``/``GeneralReduction``, which spread a
3x3 window over a whole thread block. In NCHW the row is the innermost axis; in NHWC the
channels come after it and become the fastest-moving part of the thread index, so a warp
reads 32 consecutive channels of one pixel (coalesced) instead of 32 strided rows.

``RequireThreadBinding`` runs after the schedule rules: a kernel no rule scheduled would
fail later inside TVM with an unhelpful message, or worse, run on one GPU thread.
"""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import IRModule
from tvm.ir.transform import module_pass
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target
from tvm.tirx.analysis import undefined_vars

from graphopt.errors import TargetError

__all__ = ["Conv2dDirect", "RequireThreadBinding", "default_rules", "unbound_kernels"]

_THREADS = 128  # per block: small blocks keep enough of them in flight for 7x7 layers
_ROW = (4, 2)  # outputs per thread along x, the largest that divides the width


def default_rules() -> list:
    """dlight's CUDA rule list with ``Conv2dDirect`` before the reduction rules.

    Position is priority: Matmul claims the convs it can treat as a GEMM (implicit
    im2col); what it declines must reach ``Conv2dDirect`` before ``Reduction`` or
    ``GeneralReduction`` take it; ``Fallback`` binds anything left.
    """
    return [
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        Conv2dDirect(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]


def _window_axes(block: tirx.SBlock) -> list[int]:
    """Positions of a conv's or pool's window axes among the block's spatial iterators.

    A window axis is added to a reduction iterator in some read index (``y + ry``) and
    indexes only that one buffer: a grouped conv's channel index also adds one
    (``c // k * k + rc``) but the channel also indexes the weights. Empty for anything
    that is not a conv or a pool.
    """
    spatial = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduce = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    windowed: set[int] = set()
    buffers: dict[int, set] = {i: set() for i in range(len(spatial))}
    for region in block.reads:
        for rng in region.region:
            used = set(undefined_vars(rng.min))
            for i, v in enumerate(spatial):
                if v in used:
                    buffers[i].add(region.source)
                    if used & reduce:
                        windowed.add(i)
    return sorted(i for i in windowed if len(buffers[i]) == 1)


class Conv2dDirect(GPUScheduleRule):
    """Direct convolution: blocks x threads over output pixels, a register row per thread."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        # One conv block, then at most one elementwise epilogue (bias, activation, residual).
        # normalize_prim_func drops unit iterators (batch 1, one channel per group), so a
        # depthwise NCHW conv reads "SSSRR": 2-4 spatial then 1-3 reduction iterators.
        if not 1 <= len(infos) <= 2:
            return None
        kinds = infos[0].dom_kind()
        n_spatial = len(kinds) - len(kinds.lstrip("S"))
        if not (2 <= n_spatial <= 4 and 1 <= len(kinds) - n_spatial <= 3):
            return None
        if kinds[n_spatial:] != "R" * (len(kinds) - n_spatial):
            return None
        if len(infos) == 2 and not infos[1].is_injective():
            return None
        conv = infos[0].block_rv
        window = _window_axes(sch.get(conv))
        if not window:
            return None

        # The row runs along the last window axis (x); axes after it (NHWC's channels)
        # go innermost in the thread index, so neighbouring threads read neighbouring
        # addresses. normalize_prim_func made loop i the block's iterator i.
        loops = sch.get_loops(conv)
        at = window[-1]
        outer, x, inner = loops[:at], loops[at], loops[at + 1 : n_spatial]
        reduce = loops[n_spatial:]
        width = sch.get(x).extent
        row = next((r for r in _ROW if isinstance(width, tirx.IntImm) and width % r == 0), 1)
        xo, xi = sch.split(x, [None, row])
        if inner:
            sch.reorder(xo, *inner, xi)
        bx, tx = sch.split(sch.fuse(*outer, xo, *inner), [None, _THREADS])
        sch.reorder(bx, tx, *reduce, xi)
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")

        # Accumulate the row in registers; write it back (with the epilogue) once.
        write_back = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(write_back, tx, preserve_unit_loops=True)
        if len(infos) == 2:
            try:
                sch.reverse_compute_inline(infos[1].block_rv)
            except s_tir.ScheduleError:
                sch.reverse_compute_at(infos[1].block_rv, tx, preserve_unit_loops=True)
        sch.decompose_reduction(conv, reduce[0])
        sch.annotate(tx, "pragma_auto_unroll_max_step", 64)
        sch.annotate(tx, "pragma_unroll_explicit", 1)
        return sch


def _is_bound(func: tirx.PrimFunc) -> bool:
    found = []

    def on_for(node: tirx.For) -> None:
        if node.kind == tirx.ForKind.THREAD_BINDING:
            found.append(node)

    def on_attr(node: tirx.AttrStmt) -> None:
        if node.attr_key == "thread_extent":
            found.append(node)

    tvm_ffi.structural_walk(func.body, [(tirx.For, on_for), (tirx.AttrStmt, on_attr)])
    return bool(found)


def unbound_kernels(mod: IRModule) -> list[str]:
    """Names of the PrimFuncs in ``mod`` with no blockIdx/threadIdx binding."""
    return sorted(
        gv.name_hint
        for gv, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc) and not _is_bound(func)
    )


@module_pass(opt_level=0, name="RequireThreadBinding")
class RequireThreadBinding:
    """Fail, naming the kernels, when a PrimFunc has no GPU thread binding.

    Put it after the schedule rules and before any pass that lowers the PrimFuncs.
    """

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:  # noqa: ANN001
        missing = unbound_kernels(mod)
        if missing:
            # Registered so the error crosses TVM's FFI as itself, not as RuntimeError.
            tvm_ffi.register_error("graphopt.errors.TargetError", TargetError)
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            shown = ", ".join(missing[:8]) + more
            raise TargetError(
                f"no CUDA schedule rule fits kernel(s) {shown}: they would run unbound to GPU "
                "threads; add a rule in graphopt/targets/_gpu_schedules.py or tune them"
            )
        return mod
