"""The one door for models: any accepted model becomes a checked graph here.

``compile``, ``verify``, ``inspect`` and ``tune`` all go through this module, so a model
is read, its shapes fixed and checked, and its reference chosen the same way for each:

- :func:`load_model`: an ONNX path or ``ModelProto``, or a torch model (a ``.pt2`` path,
  an ``ExportedProgram``, what ``graphopt.from_torch`` returns), into ``(source, graph)``;
- :func:`check_sizes`: shapes no kernel can run, refused before any work;
- :func:`prepare`: the above, then the graph passes and the check that every op lowers;
- :func:`reference_for`: what the model's numbers are checked against (onnxruntime, or
  torch eager for a torch model).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import onnx

from graphopt import frontends
from graphopt.errors import InputError, ModelLoadError, UnsupportedOpsError
from graphopt.frontends import is_torch_model
from graphopt.frontends.onnx import load_onnx, onnx_to_graph, parse_input_shapes
from graphopt.ir import Graph
from graphopt.lower import unsupported_nodes
from graphopt.passes import Pass, default_passes, run_passes, with_target_defaults
from graphopt.passes._draw import require_dot, write_svg
from graphopt.passes._dump import IRDumper
from graphopt.verify import onnxruntime_reference

__all__ = ["load_model", "prepare", "check_sizes", "reference_for", "fixed_proto"]


def load_model(
    model,  # noqa: ANN001
    input_shapes=None,  # noqa: ANN001 - {name: shape} or ["name=1,3,224,224", ...]
    *,
    trust_pickle: bool = False,
    require_static: bool = True,
    dynamic_batch: bool = False,
):  # noqa: ANN201 - (onnx.ModelProto | TorchSource, Graph)
    """``(source, graph)``: ``source`` is the checked ``onnx.ModelProto`` or the torch
    model's ``TorchSource``; ``graph`` a fresh copy the caller may rewrite.

    ``require_static=False`` (``graphopt inspect``) lets ONNX inputs keep symbolic dims;
    ``trust_pickle``: see :func:`graphopt.frontends.torch.load_pt2`; ``dynamic_batch``
    (or a symbol as dim 0 in ``input_shapes``): ONNX inputs keep a symbolic batch dim.
    """
    shapes = parse_input_shapes(input_shapes)
    if is_torch_model(model):  # the frontends package imports torch only now
        if dynamic_batch or any(isinstance(d, str) for s in shapes.values() for d in s):
            raise InputError(
                "dynamic batch is supported for ONNX models only (yet); export the torch "
                "model to ONNX with a dynamic batch axis, or compile it for a fixed batch"
            )
        source = frontends.as_source(model, shapes, trust_pickle=trust_pickle)
        return source, source.graph.copy()  # passes rewrite in place; keep the source
    source = load_onnx(model)
    return source, onnx_to_graph(
        source, shapes, require_static=require_static, dynamic_batch=dynamic_batch, checked=True
    )


def prepare(  # noqa: ANN201
    model,  # noqa: ANN001
    input_shapes=None,  # noqa: ANN001
    passes: list[Pass] | None = None,
    dump_ir: str | os.PathLike | None = None,
    svg: str | os.PathLike | None = None,
    *,
    trust_pickle: bool = False,
    dynamic_batch: bool = False,
    pass_defaults: dict[str, dict] | None = None,
):
    """Load, rewrite and check a model: ``(source, graph, pass_records)``, or raise with
    every node that cannot compile. ``dynamic_batch``: see :func:`load_model`.

    ``passes`` (None: the default pipeline) run with the options they leave to the target
    (None-valued, e.g. ``expand-rnn``'s ``fuse_steps``) taken from ``pass_defaults``, the
    target's choices (``TargetSpec.pass_defaults``); unfilled, such options are off.

    ``dump_ir``: a directory for the graph before and after each pass
    (:mod:`graphopt.passes._dump`); ``svg``: draw the graph after the passes there.

    ``source`` is the checked ``onnx.ModelProto``, or for a torch model (a
    ``graphopt.from_torch`` result, an ``ExportedProgram`` or a ``.pt2`` path) its
    ``TorchSource``.
    """
    source, graph = load_model(
        model, input_shapes, trust_pickle=trust_pickle, dynamic_batch=dynamic_batch
    )
    check_sizes(graph)  # before a pass folds a huge constant or TVM meets a negative dim
    if svg is not None:
        require_dot(svg)  # before any work
    observe = IRDumper(dump_ir) if dump_ir is not None else None
    if graph.output_names is None:
        graph.output_names = list(graph.outputs)
    chosen = with_target_defaults(default_passes() if passes is None else passes, pass_defaults)
    graph, records = run_passes(graph, chosen, observe=observe)
    if svg is not None:
        write_svg(graph, svg, title=f"{graph.name} after {len(records)} passes")
    bad = unsupported_nodes(graph)
    if bad:
        raise UnsupportedOpsError(bad)
    return source, graph, records


def check_sizes(graph: Graph, available: int | None = None) -> None:
    """Refuse shapes no kernel can run: input dims below 1, negative dims anywhere, and
    tensors that cannot fit in memory (``available`` bytes; default: this machine's
    total memory), judged from the shapes ONNX shape inference gives every value."""
    for name in graph.inputs:
        shape = graph.values[name].shape or ()
        if any(isinstance(d, int) and d < 1 for d in shape):
            raise InputError(
                f"input {name!r} has shape {tuple(shape)}: every dim must be at least 1 "
                "(fix it in the model or with --input-shape)"
            )
    worst = None  # (bytes, name, shape)
    for name, value in graph.values.items():
        if value.shape is None or not value.is_static:
            continue
        if any(d < 0 for d in value.shape):
            raise ModelLoadError(f"value {name!r} has a negative dim: shape {value.shape}")
        try:
            itemsize = np.dtype(value.dtype).itemsize
        except TypeError:
            continue
        size = math.prod(value.shape) * itemsize
        if worst is None or size > worst[0]:
            worst = (size, name, value.shape)
    if available is None:
        import psutil

        available = psutil.virtual_memory().total
    if worst is not None and worst[0] > available:
        size, name, shape = worst
        raise InputError(
            f"value {name!r} of shape {tuple(shape)} needs {size / 2**30:.1f} GiB, more than "
            f"this machine's {available / 2**30:.1f} GiB of memory; compile with smaller "
            "input shapes (--input-shape)"
        )


def fixed_proto(proto: onnx.ModelProto, graph: Graph) -> onnx.ModelProto:
    """The user's model with the input shapes graphopt compiled for (for onnxruntime);
    a symbolic dim (dynamic batch) stays symbolic."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    shapes = {name: graph.values[name].shape for name in graph.inputs}
    for inp in fixed.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape
            dims.ClearField("dim")
            for d in shapes[inp.name]:
                dim = dims.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = d
    return fixed


def reference_for(source, graph: Graph) -> tuple[str, Callable[[], Callable]]:  # noqa: ANN001
    """``(name, make)``: ``make()`` returns the reference, ``inputs dict -> outputs
    dict``; made on demand, since building an onnxruntime session costs time."""
    if isinstance(source, onnx.ModelProto):
        return "onnxruntime", lambda: onnxruntime_reference(fixed_proto(source, graph))
    return "torch", lambda: source.reference
