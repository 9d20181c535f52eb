"""ATen converters for the ops that move or pick data without computing: tuple items,
aliases, views and reshapes, expand, permutes, concatenation, gathers and indexing,
slices, flips, splits, constant padding and strided views.

Each converter emits ONNX-semantics nodes through a :class:`GraphBuilder` (see
:mod:`._builder`); ``SHAPE_OPS`` at the bottom is this module's part of the ``ATEN``
table. Shapes are static here, so views become ``Reshape`` to the result's shape and
slice bounds are normalised at import.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx

from graphopt.frontends.torch._builder import (
    Convert,
    GraphBuilder,
    Poisoned,
    Refuse,
    dtype_name,
    node_arg,
)

__all__ = ["SHAPE_OPS"]

# A Slice end that runs past the first element: flips slice with step -1 down to it.
_INT64_MIN = int(np.iinfo(np.int64).min)
# Copies and views of a tensor as it is: the same IR value.
_ALIASES = {
    "aten.clone.default",
    "aten.alias.default",
    "aten.detach.default",
    "aten.lift_fresh_copy.default",
    "aten.contiguous.default",
}


def _getitem(imp: GraphBuilder, node: torch.fx.Node):
    src, index = node.args
    if src.name in imp.poisoned:
        raise Poisoned
    items = imp.env[src.name]
    item = items[index]
    if item is None:
        raise Refuse(f"output {index} of {src.name!r} is not supported")
    return item


def _alias(imp: GraphBuilder, node: torch.fx.Node):
    return imp.value(node.args[0])


def _reshape(imp: GraphBuilder, node: torch.fx.Node):
    """view / reshape / squeeze / unsqueeze / flatten: the result's shape is static."""
    x = imp.value(node.args[0])
    shape = tuple(int(d) for d in node.meta["val"].shape)
    if imp.shape(x) == shape:
        return x
    return imp.out(node, "Reshape", [x, imp.ints(shape)])


def _expand(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    val = node.meta["val"]
    shape = tuple(int(d) for d in val.shape)
    if imp.shape(x) == shape:
        return x
    dtype = dtype_name(val.dtype)
    if dtype == "bool":
        raise Refuse("expanding a bool tensor is not supported")
    # Broadcasting against zeros is Expand in ops that lower (Expand itself does not).
    return imp.out(node, "Add", [x, imp.const(np.zeros(shape, dtype), "zeros")])


def _permute(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    rank = len(imp.shape(x))
    perm = [int(p) % rank for p in node.args[1]]
    return imp.out(node, "Transpose", [x], {"perm": perm})


def _transpose(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    rank = len(imp.shape(x))
    perm = list(range(rank))
    if rank >= 2:
        d0, d1 = (
            int(node_arg(node, 1, "dim0", 0)) % rank,
            int(node_arg(node, 2, "dim1", 1)) % rank,
        )
        if node.target == torch.ops.aten.t.default:
            d0, d1 = 0, rank - 1
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return imp.out(node, "Transpose", [x], {"perm": perm})


def _cat(imp: GraphBuilder, node: torch.fx.Node):
    val = node.meta["val"]
    dim = int(node_arg(node, 1, "dim", 0)) % val.dim()
    dtype = dtype_name(val.dtype)
    parts = [imp.value(t, dtype) for t in node.args[0]]
    parts = [p for p in parts if np.prod(imp.shape(p)) > 0]  # torch skips empty tensors
    if len(parts) == 1:
        return parts[0]
    return imp.out(node, "Concat", parts, {"axis": dim})


def _stack(imp: GraphBuilder, node: torch.fx.Node):
    val = node.meta["val"]
    dim = int(node_arg(node, 1, "dim", 0)) % val.dim()
    parts = []
    for t in node.args[0]:
        x = imp.value(t)
        shape = list(imp.shape(x))
        parts.append(imp.reshape(x, shape[:dim] + [1] + shape[dim:], tag=f"{node.name}_part"))
    return imp.out(node, "Concat", parts, {"axis": dim})


def _embedding(imp: GraphBuilder, node: torch.fx.Node):
    weight, indices = imp.value(node.args[0]), imp.value(node.args[1])
    return imp.out(node, "Gather", [weight, indices], {"axis": 0})


def _index_select(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    dim = int(node.args[1]) % len(imp.shape(x))
    return imp.out(node, "Gather", [x, imp.value(node.args[2])], {"axis": dim})


def _index(imp: GraphBuilder, node: torch.fx.Node):
    """``x[..., idx]`` with one integer index tensor: a Gather on its axis."""
    x = imp.value(node.args[0])
    indices = list(node.args[1])
    given = [i for i, t in enumerate(indices) if t is not None]
    if len(given) != 1:
        raise Refuse("indexing with several index tensors is not supported")
    idx_node = indices[given[0]]
    if idx_node.meta["val"].dtype == torch.bool:
        raise Refuse("boolean mask indexing is not supported")
    return imp.out(node, "Gather", [x, imp.value(idx_node)], {"axis": given[0]})


def _select(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    shape = imp.shape(x)
    dim = int(node.args[1]) % len(shape)
    index = int(node.args[2]) % shape[dim]
    scalar = imp.const(np.array(index, np.int64), "index")
    return imp.out(node, "Gather", [x, scalar], {"axis": dim})


def _slice(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    shape = imp.shape(x)
    dim = int(node_arg(node, 1, "dim", 0)) % len(shape)
    start, end = node_arg(node, 2, "start"), node_arg(node, 3, "end")
    step = int(node_arg(node, 4, "step", 1))
    picked = range(*slice(start, end, step).indices(shape[dim]))
    if picked == range(shape[dim]):
        return x
    if not picked:
        raise Refuse("an empty slice is not supported")
    # Bounds are normalised here, so the graph never holds torch's INT64_MAX "to the end".
    bounds = [imp.ints([v]) for v in (picked.start, picked.stop, dim, step)]
    return imp.out(node, "Slice", [x] + bounds)


def _flip(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    shape = imp.shape(x)
    dims = sorted({int(d) % len(shape) for d in node.args[1]})
    starts = [shape[d] - 1 for d in dims]
    ends = [_INT64_MIN] * len(dims)
    bounds = [imp.ints(v) for v in (starts, ends, dims, [-1] * len(dims))]
    return imp.out(node, "Slice", [x] + bounds)


def _split(imp: GraphBuilder, node: torch.fx.Node):
    """split / split_with_sizes / unbind: one Slice (or Gather) per piece."""
    x = imp.value(node.args[0])
    shape = imp.shape(x)
    dtype = imp.dtype(x)
    key = str(node.target)
    if key.startswith("aten.unbind"):
        dim = int(node_arg(node, 1, "dim", 0)) % len(shape)
        out_shape = shape[:dim] + shape[dim + 1 :]
        return [
            imp.emit(
                "Gather",
                [x, imp.const(np.array(i, np.int64), "index")],
                out_shape,
                dtype,
                {"axis": dim},
                tag=f"{node.name}_{i}",
            )
            for i in range(shape[dim])
        ]
    dim = int(node_arg(node, 2, "dim", 0)) % len(shape)
    sizes = node.args[1]
    if isinstance(sizes, int):
        sizes = [min(sizes, shape[dim] - s) for s in range(0, shape[dim], sizes)]
    pieces, start = [], 0
    for i, size in enumerate(sizes):
        out_shape = list(shape)
        out_shape[dim] = size
        bounds = [imp.ints([v]) for v in (start, start + size, dim)]
        pieces.append(
            imp.emit("Slice", [x] + bounds, out_shape, dtype, tag=f"{node.name}_{i}")
            if size != shape[dim]
            else x
        )
        start += size
    return pieces


def _as_strided(imp: GraphBuilder, node: torch.fx.Node):
    """A view by strides: the identity where it restates the input's own strides (as the
    decompositions of channels-last ops do), else a Gather from the flattened input, which
    is the tensor's storage only where the input is contiguous and starts it.
    """
    x = imp.value(node.args[0])
    src = node.args[0].meta["val"]
    size, stride = [int(d) for d in node.args[1]], [int(s) for s in node.args[2]]
    offset = int(node_arg(node, 3, "storage_offset", None) or 0)
    same = all(n == 1 or s == t for n, s, t in zip(size, stride, src.stride(), strict=False))
    if list(src.shape) == size and same and offset == src.storage_offset():
        return x
    if not src.is_contiguous() or src.storage_offset() != 0:
        raise Refuse("as_strided on a non-contiguous tensor is not supported")
    index = np.full(size, offset, np.int64)
    for dim, (n, s) in enumerate(zip(size, stride, strict=True)):
        index += (np.arange(n, dtype=np.int64) * s).reshape([n] + [1] * (len(size) - dim - 1))
    if index.size and index.max() >= src.numel():
        raise Refuse("as_strided reads past the end of its input")
    flat = imp.reshape(x, [src.numel()], tag=f"{node.name}_flat")
    return imp.out(node, "Gather", [flat, imp.const(index, "strided")], {"axis": 0})


def _pad(imp: GraphBuilder, node: torch.fx.Node):
    x = imp.value(node.args[0])
    rank = len(imp.shape(x))
    pad = [int(p) for p in node.args[1]]
    if any(p < 0 for p in pad):
        raise Refuse("negative padding (cropping) is not supported")
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):  # torch lists the last dim first
        begin[rank - 1 - i], end[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    value = float(node_arg(node, 2, "value", 0.0))
    dtype = imp.dtype(x)
    fill = imp.const(np.array(value, dtype), "pad_value")
    return imp.out(node, "Pad", [x, imp.ints(begin + end, "pads"), fill])


# ATen overload name -> converter, for the ops this module translates.
SHAPE_OPS: dict[str, Convert] = {
    "getitem": _getitem,
    **dict.fromkeys(_ALIASES, _alias),
    "aten.view.default": _reshape,
    "aten._unsafe_view.default": _reshape,
    "aten.reshape.default": _reshape,
    "aten.squeeze.dim": _reshape,
    "aten.squeeze.dims": _reshape,
    "aten.squeeze.default": _reshape,
    "aten.unsqueeze.default": _reshape,
    "aten.flatten.using_ints": _reshape,
    "aten.expand.default": _expand,
    "aten.permute.default": _permute,
    "aten.transpose.int": _transpose,
    "aten.t.default": _transpose,
    "aten.cat.default": _cat,
    "aten.stack.default": _stack,
    "aten.embedding.default": _embedding,
    "aten.index_select.default": _index_select,
    "aten.index.Tensor": _index,
    "aten.select.int": _select,
    "aten.slice.Tensor": _slice,
    "aten.flip.default": _flip,
    "aten.split.Tensor": _split,
    "aten.split_with_sizes.default": _split,
    "aten.unbind.int": _split,
    "aten.constant_pad_nd.default": _pad,
    "aten.as_strided.default": _as_strided,
}
