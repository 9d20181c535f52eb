"""Reuse TVM's ONNX converters (``tvm.relax.frontend.onnx``) for ops graphopt does not
lower by hand.

TVM's importer converts an ONNX node by calling its ``OnnxOpConverter`` class's
``get_converter(opset)(bb, inputs, attrs, params)``. :func:`tvm_onnx` makes that call
for one graphopt node: inputs are the Relax expressions already built (constants as
``relax.Constant``, so TVM folds shape inputs), attributes as TVM's ``_parse_attr``
gives them (tuples for lists, bytes for strings). Which ops go this way, and the static
checks that refuse what TVM's converters get wrong, are in :mod:`graphopt.lower._ops`
(``OpRule(check, "tvm_onnx")``).

What the converter returns is checked against ONNX shape inference (shape and element
type of every output) before it is used: a converter that disagrees is a refusal
naming the node, never a silent wrong answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _tvm

from graphopt.errors import UnsupportedOpsError, first_line
from graphopt.ir import Node

__all__ = ["tvm_onnx"]


def _attr(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _refuse(node: Node, why: str) -> UnsupportedOpsError:
    return UnsupportedOpsError([(node.op_type, node.name, why)])


def _outputs(bb: relax.BlockBuilder, sym: relax.Expr) -> list[relax.Expr]:
    if isinstance(sym, relax.Tuple):
        return list(sym.fields)
    if isinstance(sym.ty, relax.TupleType):
        return [bb.emit(relax.TupleGetItem(sym, i)) for i in range(len(sym.ty.fields))]
    return [sym]


def _check_output(ctx, node: Node, name: str, expr: relax.Expr) -> None:  # noqa: ANN001
    """The converter's output against ONNX shape inference: same element type, same
    dims where ONNX knows them (a symbolic dim, e.g. a dynamic batch, may stay one)."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise _refuse(node, f"output {name!r} is not a tensor of known shape")
    dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]
    value = ctx.graph.values.get(name)
    onnx_dims = list(value.shape) if value is not None and value.shape is not None else None
    if onnx_dims is None or len(onnx_dims) != len(dims):
        onnx_dims = [None] * len(dims)
    for got, want in zip(dims, onnx_dims, strict=True):
        if got is None and not isinstance(want, str):
            raise _refuse(node, f"the shape of output {name!r} is only known at run time")
    if value is None:
        return
    if str(ty.dtype) != value.dtype:
        raise _refuse(node, f"output {name!r} comes out {ty.dtype}, ONNX says {value.dtype}")
    if value.shape is None:
        return
    fits = len(value.shape) == len(dims) and all(
        not isinstance(w, int) or g == w for g, w in zip(dims, value.shape, strict=True)
    )
    if not fits:
        raise _refuse(
            node, f"output {name!r} comes out with shape {dims}, ONNX says {list(value.shape)}"
        )


def tvm_onnx(ctx, node: Node, known: dict[int, np.ndarray] | None = None) -> list[relax.Expr]:  # noqa: ANN001 - relax._Ctx
    """Convert ``node`` with TVM's converter for its op and the graph's opset.

    ``known``: inputs (by position) given at run time whose values the static shapes fix
    (Split's sizes, Resize's sizes): TVM's converter sees them as constants."""
    known = known or {}
    inputs = _tvm.onnx_input(
        relax.const(known[i], str(known[i].dtype)) if i in known else ctx.x(name) if name else None
        for i, name in enumerate(node.inputs)
    )
    attrs = {key: _attr(value) for key, value in node.attrs.items()}
    attrs["tvm_custom"] = {"name": node.name, "num_outputs": len(node.outputs)}
    convert = _tvm._get_convert_map()[node.op_type].get_converter(ctx.graph.opset)
    try:
        sym = ctx.bb.normalize(convert(ctx.bb, inputs, attrs, [dict(ctx.env), {}]))
    except UnsupportedOpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - TVM raises anything; name the node instead
        raise _refuse(node, f"TVM's ONNX converter failed: {first_line(exc)}") from exc
    names = [o for o in node.outputs if o]
    outs = _outputs(ctx.bb, sym)
    if len(outs) < len(names):
        raise _refuse(node, f"TVM's converter gives {len(outs)} outputs, the node has {len(names)}")
    result = []
    for name, expr in zip(names, outs, strict=False):
        if not isinstance(expr, relax.Var | tvm.ir.GenericConst):
            expr = ctx.emit(expr)
        _check_output(ctx, node, name, expr)
        result.append(expr)
    return result
