"""Activation layouts, chosen per target at the Relax level, and the passes that make them.

Why at the Relax level: a conv's layout decides how every elementwise op, pool and
residual add between two convs walks memory. The layout passes change the convs (while
they are still Relax ops, before LegalizeOps), carry their layout through the ops that
can take it (elementwise ops, pools, mean, concat) and insert a transform only where an
op needs its original layout; so the transforms end up at the graph's edges (after the
model input, before a flatten/reshape or an output) and the middle of the network runs
in the new layout. ``nchwc`` does this per conv (:mod:`graphopt.targets._nchwc`: one op
it cannot carry costs a transform on that edge, never the whole model); ``nhwc`` uses
Relax's ``ConvertLayout``, which keeps the tensor rank. Weight transforms act on constants: the
FoldConstant after LegalizeOps runs them once, at compile time.

The layouts, by name (each target lists the ones it supports in its ``LAYOUTS`` table, the
first one its default; ``--layout`` picks another):

- ``nchw``: as imported; no conversion.
- ``nchwc``: NCHW[x]c activations, OIHW[x]i[y]o weights (x = SIMD lanes, or 8, 4, 2
  where the channel count needs it; grouped convs a block inside one group); the x86
  default, see :mod:`graphopt.targets._cpu_schedules`.
- ``nhwc``: NHWC activations. The weights are OHWI (cuDNN's and CUTLASS's convention:
  the reduction axis I is contiguous in both GEMM operands, which is what dlight's
  Matmul rule wants from an implicit-GEMM conv) on CUDA; on CPUs OHWI[x]o, OHWI with
  the output channels blocked by the SIMD width, so the register-tile conv of
  :mod:`graphopt.targets._cpu_nhwc` loads one contiguous weight vector per step and
  walks its whole reduction contiguously (grouped convs: b divides a group's outputs).

After the conversion, :func:`CancelTransposes` composes back-to-back ``permute_dims``
and drops identities (a model that transposes its NHWC input to NCHW for its first conv
then needs no transpose at all), and CSE merges the copies of the input transform that
ConvertLayout makes for each consumer of the input.

Nothing here imports TVM at import time: the tables are read by ``graphopt targets``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from graphopt.errors import TargetError

__all__ = [
    "Layout",
    "NCHW",
    "NCHWC",
    "NHWC_CPU",
    "NHWC_GPU",
    "LAYOUT_NAMES",
    "table",
    "choose",
    "ConvertToNHWC",
    "CancelTransposes",
]


@dataclass(frozen=True)
class Layout:
    """A layout a target offers: its name, what it means there, and its passes.

    ``passes(target)`` returns the Relax passes of the target's "layout" phase (they run
    before LegalizeOps) for a ``tvm.target.Target``.
    """

    name: str
    description: str
    passes: Callable[..., list]


def _no_passes(_target) -> list:  # noqa: ANN001
    return []


def _cpu_schedules():  # noqa: ANN202
    """The CPU schedule module, which builds TVM passes at import: imported when a CPU
    layout's passes are made, so reading these tables (``graphopt targets``) needs no TVM."""
    from graphopt.targets import _cpu_schedules as cpu

    return cpu


def _nchwc_passes(target) -> list:  # noqa: ANN001
    from tvm import relax

    cpu = _cpu_schedules()
    return [
        cpu.ConvertToNCHWc(cpu.vector_lanes(target)),
        relax.transform.EliminateCommonSubexpr(),
    ]


def _nhwc_cpu_passes(target) -> list:  # noqa: ANN001
    from tvm import relax

    cpu = _cpu_schedules()
    return [
        ConvertToNHWC(block=cpu.vector_lanes(target)),
        CancelTransposes(),
        relax.transform.EliminateCommonSubexpr(),
    ]


def _nhwc_gpu_passes(_target) -> list:  # noqa: ANN001
    from tvm import relax

    return [ConvertToNHWC(), CancelTransposes(), relax.transform.EliminateCommonSubexpr()]


NCHW = Layout("nchw", "NCHW as imported, OIHW weights (no conversion)", _no_passes)
NCHWC = Layout(
    "nchwc", "NCHW[x]c activations, OIHW[x]i[y]o weights (x = SIMD lanes)", _nchwc_passes
)
NHWC_CPU = Layout("nhwc", "NHWC activations, OHWI[x]o weights (x = SIMD lanes)", _nhwc_cpu_passes)
NHWC_GPU = Layout("nhwc", "NHWC activations, OHWI weights (implicit GEMM)", _nhwc_gpu_passes)
LAYOUT_NAMES = ("nchw", "nchwc", "nhwc")


def table(*layouts: Layout) -> dict[str, Layout]:
    """A target's layout table: name -> Layout, its default first."""
    return {layout.name: layout for layout in layouts}


def choose(target: str, layouts: dict[str, Layout], name: str | None) -> Layout:
    """The layout ``name`` (default: the table's first) or a TargetError saying why not."""
    if name is None:
        return next(iter(layouts.values()))
    key = str(name).strip().lower()
    if key in layouts:
        return layouts[key]
    offered = ", ".join(f"{n} (default)" if i == 0 else n for i, n in enumerate(layouts))
    if key not in LAYOUT_NAMES:
        raise TargetError(
            f"unknown layout {name!r}; graphopt knows {', '.join(LAYOUT_NAMES)} "
            f"(target {target}: {offered})"
        )
    raise TargetError(f"target {target} does not support layout {key!r}; it supports {offered}")


# --- NHWC --------------------------------------------------------------------------------
def _channel_block(channels: int, block: int) -> int | None:
    for b in (block, *(c for c in (8, 4) if c < block)):
        if channels % b == 0:
            return b
    return None


def _nhwc_kernel_layout(call, block: int | None) -> str | None:  # noqa: ANN001
    """The weight layout for one NCHW conv2d, or None to leave the conv alone.

    OHWI[b]o (b: ``block`` or a smaller power of two dividing the output channels) for
    float32 dense and depthwise convs when ``block`` is given, else plain OHWI; grouped
    convs (neither dense nor depthwise) get OHWI[b]o with b dividing the output channels
    of one group (so a block's lanes share their input channels), else plain OHWI.
    """
    a = call.attrs
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None
    shape = _cpu_schedules()._shape
    data, weight = shape(call.args[0]), shape(call.args[1])
    if data is None or weight is None or len(data) != 4 or len(weight) != 4:
        return None
    if block is None or str(call.args[0].ty.dtype) != "float32":
        return "OHWI"
    groups, cin, cout = int(a.groups), data[1], weight[0]
    depthwise = groups == cin == cout and weight[1] == 1
    b = _channel_block(cout if groups == 1 or depthwise else cout // groups, block)
    return f"OHWI{b}o" if b else "OHWI"


def ConvertToNHWC(block: int | None = None):  # noqa: ANN201, N802 - a pass, named like TVM's
    """Convert 2-D NCHW convs to NHWC; weights OHWI, or OHWI[b]o with ``block``.

    Put before LegalizeOps (ConvertLayout works on Relax ops). Convs of other ranks
    (conv1d/conv3d) and convs with symbolic shapes stay as they are. Falls back to the
    unconverted module if ConvertLayout rejects it, so the model still compiles.
    """
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="graphopt.ConvertToNHWC")
    def convert(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: ANN001
        def layout_cb(call):  # noqa: ANN001, ANN202
            if getattr(call.op, "name", "") != "relax.nn.conv2d":
                return {}
            kernel = _nhwc_kernel_layout(call, block)
            return {} if kernel is None else {"relax.nn.conv2d": ["NHWC", kernel]}

        try:
            return relax.transform.ConvertLayout({}, layout_cb)(mod)
        except (RuntimeError, ValueError):  # TVM's InternalError is a RuntimeError
            return mod

    return convert


# --- transpose cancellation ------------------------------------------------------------------
def _axes(call, rank: int) -> list[int]:  # noqa: ANN001
    axes = call.attrs.axes
    return list(range(rank))[::-1] if axes is None else [int(i) for i in axes]


def CancelTransposes():  # noqa: ANN201, N802 - a pass, named like TVM's
    """Compose ``permute_dims(permute_dims(x, a), b)`` into one, and drop identities.

    ``y = permute_dims(x, a)`` has ``y.shape[i] = x.shape[a[i]]``, so the composition
    permutes by ``c[i] = a[b[i]]``; when ``c`` is the identity, ``x`` itself is used.
    Put after a layout conversion, before LegalizeOps (each transpose left becomes a
    kernel that copies the whole tensor).
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    permute = tvm.ir.Op.get("relax.permute_dims")
    src = wildcard()
    pattern = is_op("relax.permute_dims")(src)

    def rewrite(call, matches):  # noqa: ANN001, ANN202
        rank = getattr(call.ty, "ndim", -1)
        if rank is None or rank < 0:
            return call
        x, axes = matches[src], _axes(call, rank)
        if isinstance(x, relax.Call) and x.op.same_as(permute):
            inner = _axes(x, rank)
            axes, x = [inner[i] for i in axes], x.args[0]
        if axes == list(range(rank)):
            return x
        if x.same_as(matches[src]):
            return call
        return relax.op.permute_dims(x, axes)

    @tvm.transform.module_pass(opt_level=0, name="graphopt.CancelTransposes")
    def cancel(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: ANN001
        updates = {
            gvar: rewrite_call(pattern, rewrite, func)
            for gvar, func in mod.functions_items()
            if isinstance(func, relax.Function)
        }
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return cancel
