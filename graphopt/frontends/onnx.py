"""Read ONNX models (files or ``ModelProto``) into a :class:`graphopt.ir.Graph`.

Loading checks the model the way a user would want before any compile starts: the
file exists, parses as ONNX, passes ``onnx.checker``, and has static input shapes once
``--input-shape`` overrides are applied. Shapes of every value come from ONNX shape
inference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from graphopt.errors import InputError, ModelLoadError
from graphopt.ir import Graph, Node

__all__ = ["load_onnx", "onnx_to_graph", "parse_input_shapes", "graph_to_onnx", "onnx_dtype"]


def onnx_dtype(elem_type: int) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def parse_input_shapes(specs: list[str] | dict | None) -> dict[str, tuple[int, ...]]:
    """Parse ``["x=1,3,224,224", ...]`` (or pass a dict through) into ``{name: shape}``."""
    if not specs:
        return {}
    if isinstance(specs, dict):
        return {k: tuple(int(d) for d in v) for k, v in specs.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            shape = tuple(int(d) for d in dims.split(","))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputError(
                f"malformed --input-shape {spec!r}: expected NAME=D1,D2,... with positive ints,"
                " e.g. input=1,3,224,224"
            ) from None
        shapes[name.strip()] = shape
    return shapes


def load_onnx(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load and check an ONNX model, raising :class:`ModelLoadError` with a clear reason."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = Path(model)
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelLoadError(f"model path is a directory, not an ONNX file: {path}")
        data = path.read_bytes()
        if not data:
            raise ModelLoadError(f"{path} is empty")
        try:
            proto = onnx.load_from_string(data)
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise ModelLoadError(
                f"{path} is not a readable ONNX model (truncated or not protobuf): {exc}"
            ) from exc
        if not proto.graph.node and not proto.graph.output:
            raise ModelLoadError(f"{path} is not an ONNX model: it holds no graph")
        if proto.graph.initializer and any(
            init.HasField("data_location") and init.data_location == onnx.TensorProto.EXTERNAL
            for init in proto.graph.initializer
        ):
            onnx.load_external_data_for_model(proto, str(path.parent))
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"model fails onnx.checker: {first}") from exc
    return proto


def _fix_input_shapes(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    init_names = {i.name for i in proto.graph.initializer}
    inputs = {i.name: i for i in proto.graph.input if i.name not in init_names}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise InputError(
            f"--input-shape names unknown input(s) {', '.join(unknown)}; "
            f"model inputs are: {', '.join(inputs) or '(none)'}"
        )
    for name, shape in shapes.items():
        tensor_type = inputs[name].type.tensor_type
        old = tensor_type.shape.dim
        if len(old) and len(old) != len(shape):
            raise InputError(
                f"--input-shape {name}: model input has rank {len(old)}, got {len(shape)} dims"
            )
        for i, d in enumerate(old):
            if d.HasField("dim_value") and d.dim_value != shape[i]:
                raise InputError(
                    f"--input-shape {name}: dim {i} is fixed to {d.dim_value} in the model,"
                    f" got {shape[i]}"
                )
        tensor_type.shape.ClearField("dim")
        for d in shape:
            tensor_type.shape.dim.add().dim_value = d


def _shape_of(type_proto: onnx.TypeProto) -> tuple[int | str, ...] | None:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
    )


def onnx_to_graph(
    model: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    require_static: bool = True,
) -> Graph:
    """Load ``model`` and convert it to a :class:`Graph`.

    With ``require_static`` (needed to compile), a symbolic input dim is an error that
    says how to fix it; ``graphopt inspect`` passes False to show the model as it is.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(load_onnx(model))
    _fix_input_shapes(proto, input_shapes or {})
    try:
        proto = shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelLoadError(f"ONNX shape inference failed: {str(exc).splitlines()[0]}") from exc

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    graph = Graph(proto.graph.name or "graph", opset)
    init_names = set()
    for init in proto.graph.initializer:
        graph.add_constant(init.name, numpy_helper.to_array(init))
        init_names.add(init.name)
    for inp in proto.graph.input:
        if inp.name in init_names:
            continue
        shape = _shape_of(inp.type)
        if require_static and (shape is None or not all(isinstance(d, int) for d in shape)):
            raise InputError(
                f"input {inp.name!r} has a symbolic shape {shape}; fix it with "
                f"--input-shape {inp.name}=D1,D2,... (Python: input_shapes={{...}})"
            )
        graph.add_input(inp.name, shape, onnx_dtype(inp.type.tensor_type.elem_type))
    for vi in list(proto.graph.value_info) + list(proto.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            graph.values[vi.name] = graph.values.get(vi.name) or _value(vi)
    used = set()
    for i, n in enumerate(proto.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in used:
            name = f"{name}_{i}"
        used.add(name)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            graph.add_constant(n.output[0], _constant_value(n, attrs))
            continue
        graph.add_node(Node(name, n.op_type, list(n.input), list(n.output), attrs, n.domain))
    graph.outputs = [o.name for o in proto.graph.output]
    return graph


def _value(vi: onnx.ValueInfoProto):
    from graphopt.ir import Value

    return Value(vi.name, _shape_of(vi.type), onnx_dtype(vi.type.tensor_type.elem_type))


def _constant_value(node: onnx.NodeProto, attrs: dict) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    raise ModelLoadError(f"Constant node {node.name!r} has an unsupported value attribute")


def graph_to_onnx(graph: Graph) -> onnx.ModelProto:
    """Write ``graph`` back to ONNX (for dumps and for checking passes with onnxruntime)."""
    helper = onnx.helper

    def info(name: str) -> onnx.ValueInfoProto:
        v = graph.values.get(name)
        if v is None:
            return helper.make_empty_tensor_value_info(name)
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(v.dtype))
        return helper.make_tensor_value_info(name, elem, v.shape)

    nodes = []
    for n in graph.nodes():
        nodes.append(
            helper.make_node(
                n.op_type, n.inputs, n.outputs, name=n.name, domain=n.domain or None, **n.attrs
            )
        )
    used = {i for n in graph.nodes() for i in n.inputs} | set(graph.outputs)
    inits = [
        numpy_helper.from_array(a, name) for name, a in graph.constants.items() if name in used
    ]
    g = helper.make_graph(
        nodes, graph.name, [info(i) for i in graph.inputs], [info(o) for o in graph.outputs], inits
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", graph.opset)])
