"""Read ONNX models (files or ``ModelProto``) into a :class:`graphopt.ir.Graph`.

Loading checks the model the way a user would want before any compile starts: the
file exists, parses as ONNX, passes ``onnx.checker``, and has static input shapes once
``--input-shape`` overrides are applied. Shapes of every value come from ONNX shape
inference.

Dynamic batch (``--dynamic-batch``, or a symbol as dim 0 of ``--input-shape x=N,3,224,224``)
keeps dim 0 of the inputs the model leaves symbolic as one shared symbol; every other
dim must still be static. Values then hold that symbol (a ``str``) as their dim 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from graphopt.errors import InputError, ModelLoadError, first_line
from graphopt.ir import Graph, Node, Value, graph_to_onnx

__all__ = [
    "load_onnx",
    "onnx_to_graph",
    "parse_input_shapes",
    "graph_to_onnx",
    "onnx_dtype",
    "BATCH_SYMBOL",
]

BATCH_SYMBOL = "N"  # the batch dim's name when the model's own is missing or not a name


def onnx_dtype(elem_type: int) -> str:
    """The numpy dtype name of an ONNX element type; an unknown one is a ModelLoadError."""
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError):
        raise ModelLoadError(f"unknown ONNX element type {elem_type}") from None


def _array(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    """``numpy_helper.to_array``, with a malformed tensor (data that does not fit its
    dims or type, an unknown type) a ModelLoadError naming it: onnx.checker lets some
    through (more bytes than the dims need, a changed data type)."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:
        raise ModelLoadError(f"{what} cannot be read: {first_line(exc)}") from exc


def _dim(d: int | str, first: bool) -> int | str:
    """A dim of ``--input-shape``: a positive int, or (dim 0 only) a symbol for a dynamic
    batch; anything else is a ValueError."""
    if isinstance(d, str):
        d = d.strip()
        if first and d.isidentifier():
            return d
    d = int(d)
    if d <= 0:
        raise ValueError
    return d


def parse_input_shapes(specs: list[str] | dict | None) -> dict[str, tuple[int | str, ...]]:
    """Parse ``["x=1,3,224,224", ...]`` (or check a dict) into ``{name: shape}``; dim 0
    may be a symbol (``x=N,3,224,224``): a dynamic batch."""
    if not specs:
        return {}
    if isinstance(specs, dict):
        try:
            return {k: tuple(_dim(d, i == 0) for i, d in enumerate(v)) for k, v in specs.items()}
        except (TypeError, ValueError):
            raise InputError(f"malformed input_shapes {specs!r}") from None
    shapes: dict[str, tuple[int | str, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            shape = tuple(_dim(d, i == 0) for i, d in enumerate(dims.split(",")))
        except ValueError:
            raise InputError(
                f"malformed --input-shape {spec!r}: expected NAME=D1,D2,... with positive ints,"
                " e.g. input=1,3,224,224 (dim 0 may be a name for a dynamic batch: N,3,224,224)"
            ) from None
        shapes[name.strip()] = shape
    return shapes


def load_onnx(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load and check an ONNX model, raising :class:`ModelLoadError` with a clear reason.

    External data is read here, from the model's folder only (:func:`_load_external_data`).
    """
    if isinstance(model, onnx.ModelProto):
        proto = model
        external = next(_external_tensors(proto), None)
        if external is not None:
            where, tensor = external
            raise ModelLoadError(
                f"tensor {tensor.name!r} in {where} keeps its data in an external file "
                f"({_location(tensor)!r}), and a ModelProto in memory has no folder to read"
                " it from: pass the model's file path instead"
            )
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
                f"{path} is not a readable ONNX model (truncated or not protobuf): "
                f"{first_line(exc)}"
            ) from exc
        if not proto.graph.node and not proto.graph.output:
            raise ModelLoadError(f"{path} is not an ONNX model: it holds no graph")
        _load_external_data(proto, path)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # ValidationError, and C++ errors on hostile input
        raise ModelLoadError(f"model fails onnx.checker: {first_line(exc)}") from exc
    _check_opsets(proto)
    return proto


def _check_opsets(proto: onnx.ModelProto) -> None:
    """onnx.checker accepts a domain imported twice and opsets it has never heard of;
    graphopt would read ops by the first import and onnxruntime by another, or by no
    known semantics at all."""
    seen: dict[str, int] = {}
    for o in proto.opset_import:
        domain = "" if o.domain == "ai.onnx" else o.domain
        if domain in seen:
            raise ModelLoadError(
                f"the model imports opset domain {o.domain or 'ai.onnx'!r} twice (versions "
                f"{seen[domain]} and {o.version}): which one applies is ambiguous"
            )
        seen[domain] = o.version
    newest = onnx.defs.onnx_opset_version()
    if not 1 <= seen.get("", 1) <= newest:
        raise ModelLoadError(
            f"the model's ONNX opset {seen['']} is not one onnx {onnx.__version__} knows "
            f"(1 to {newest})"
        )


def _graph_tensors(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    yield from ((f"the initializers{where}", t) for t in graph.initializer)
    for sparse in graph.sparse_initializer:
        yield from ((f"the sparse initializers{where}", t) for t in (sparse.values, sparse.indices))
    yield from _node_tensors(graph.node, where)


def _node_tensors(
    nodes: Iterable[onnx.NodeProto], where: str
) -> Iterator[tuple[str, onnx.TensorProto]]:
    for node in nodes:
        for attr in node.attribute:
            yield from _attribute_tensors(
                attr, f"{node.op_type} node {node.name!r} attribute {attr.name!r}{where}"
            )


def _attribute_tensors(
    attr: onnx.AttributeProto, here: str
) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Tensors in an attribute, whatever its declared type says: a hostile model may set
    ``t`` on an INT attribute, and what is there is what some reader may read."""
    if attr.HasField("t"):
        yield here, attr.t
    yield from ((here, t) for t in attr.tensors)
    sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
    yield from (
        (here, t) for s in sparse + list(attr.sparse_tensors) for t in (s.values, s.indices)
    )
    inside = f" (in the subgraph of {here})"
    if attr.HasField("g"):
        yield from _graph_tensors(attr.g, inside)
    for g in attr.graphs:
        yield from _graph_tensors(g, inside)


def _all_tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every TensorProto of the model with a phrase saying where it is: initializers
    (dense and sparse), node attributes and subgraphs (If/Loop/Scan bodies) at any depth,
    function bodies and their attribute defaults, training graphs.
    ``onnx.load_external_data_for_model`` skips sparse tensors, subgraph initializers
    inside functions and function attribute defaults, so graphopt walks the model itself."""
    yield from _graph_tensors(proto.graph, "")
    for f in proto.functions:
        yield from _node_tensors(f.node, f" (in function {f.name!r})")
        for attr in f.attribute_proto:
            yield from _attribute_tensors(
                attr, f"the default of attribute {attr.name!r} of function {f.name!r}"
            )
    for info in proto.training_info:
        yield from _graph_tensors(info.initialization, " (in a training graph)")
        yield from _graph_tensors(info.algorithm, " (in a training graph)")


def _external_tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    return (
        (where, t)
        for where, t in _all_tensors(proto)
        if t.data_location == onnx.TensorProto.EXTERNAL
    )


def _location(tensor: onnx.TensorProto) -> str:
    """The ``location`` key of an external tensor (the last one, as onnx reads it)."""
    return {e.key: e.value for e in tensor.external_data}.get("location", "")


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Read every external tensor into the proto, from ``path``'s folder and nowhere else,
    so that nothing later (``numpy_helper.to_array``, onnxruntime) resolves a location
    against the current directory."""
    folder = os.path.realpath(path.parent)
    for where, tensor in _external_tensors(proto):
        tensor.raw_data = _external_bytes(
            tensor, folder, f"{path}: tensor {tensor.name!r} in {where}"
        )
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _external_bytes(tensor: onnx.TensorProto, folder: str, where: str) -> bytes:
    """The bytes an external tensor names, or :class:`ModelLoadError`.

    A location is refused when it is absolute or resolves (``..``, symlinks followed)
    outside ``folder``, when it is not a regular file, or when offset/length do not fit
    the file: a model must not be able to pull other files (keys, ``/etc/passwd``) into
    an artifact, and a fifo or a huge length must not hang or exhaust the compile.
    """
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")

    def refuse(why: str) -> ModelLoadError:
        return ModelLoadError(f"{where} has external data at {location!r}, which {why}")

    if not location or "\0" in location:
        raise refuse("is not a file name")
    if os.path.isabs(location):
        raise refuse("is an absolute path (only files in the model's folder are read)")
    target = os.path.realpath(os.path.join(folder, location))
    if os.path.commonpath([folder, target]) != folder:
        raise refuse(f"resolves outside the model's folder {folder}")
    if not os.path.isfile(target):
        raise refuse(f"is not a file in the model's folder {folder}")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise refuse("has a non-integer offset or length") from None
    try:
        with open(target, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not 0 <= offset <= size or (length is not None and not 0 <= length <= size - offset):
                raise refuse(f"is {size} bytes: offset {offset}, length {length} do not fit")
            f.seek(offset)
            return f.read(size - offset if length is None else length)
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None


def _graph_inputs(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The inputs that are not initializers (those are weights a user may override)."""
    init_names = {i.name for i in proto.graph.initializer}
    return {i.name: i for i in proto.graph.input if i.name not in init_names}


def _fix_input_shapes(proto: onnx.ModelProto, shapes: dict[str, tuple[int | str, ...]]) -> None:
    inputs = _graph_inputs(proto)
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
            dim = tensor_type.shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d


def _symbolic_batch(proto: onnx.ModelProto, shapes: dict[str, tuple[int | str, ...]]) -> str:
    """Make dim 0 of every input that leaves it symbolic one shared symbol (a dynamic
    batch) and return it: the one ``shapes`` names, else the model's own when its inputs
    agree on one, else ``BATCH_SYMBOL``. An input with a fixed dim 0 keeps it."""
    given = {s[0] for s in shapes.values() if s and isinstance(s[0], str)}
    if len(given) > 1:
        raise InputError(f"--input-shape names several batch symbols ({', '.join(sorted(given))})")
    free = [
        vi.type.tensor_type.shape.dim[0]
        for vi in _graph_inputs(proto).values()
        if vi.type.tensor_type.HasField("shape")
        and vi.type.tensor_type.shape.dim
        and not vi.type.tensor_type.shape.dim[0].HasField("dim_value")
    ]
    if not free:
        raise InputError(
            "dynamic batch: no input has a symbolic dim 0 (the model fixes every batch "
            "size); export it with a dynamic batch axis"
        )
    own = {d.dim_param for d in free}
    symbol = given.pop() if given else own.pop() if len(own) == 1 else BATCH_SYMBOL
    symbol = symbol if symbol.isidentifier() else BATCH_SYMBOL
    for d in free:
        d.dim_param = symbol
    return symbol


def _shape_of(type_proto: onnx.TypeProto) -> tuple[int | str, ...] | None:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
    )


def onnx_to_graph(
    model: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, tuple[int | str, ...]] | None = None,
    require_static: bool = True,
    *,
    dynamic_batch: bool = False,
    checked: bool = False,
) -> Graph:
    """Load ``model`` and convert it to a :class:`Graph`.

    With ``require_static`` (needed to compile), a symbolic input dim is an error that
    says how to fix it; ``graphopt inspect`` passes False to show the model as it is.
    ``dynamic_batch`` (implied by a symbol in ``input_shapes``) keeps dim 0 symbolic:
    see the module docstring. ``checked``: ``model`` is a ModelProto :func:`load_onnx`
    returned, not checked again (onnx.checker serializes the model: 2 s for VGG-11's
    530 MB of weights).
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model if checked and isinstance(model, onnx.ModelProto) else load_onnx(model))
    if not proto.graph.output:  # onnx.checker allows it; nothing would run
        raise ModelLoadError("the model's graph has no outputs: there is nothing to compile")
    for kind, infos in (("input", proto.graph.input), ("output", proto.graph.output)):
        for vi in infos:  # onnx.checker allows both; graphopt compiles tensors only
            if not vi.type.HasField("tensor_type"):
                raise ModelLoadError(f"graph {kind} {vi.name!r} is not a tensor")
            if not vi.type.tensor_type.elem_type:  # and onnxruntime refuses the model
                raise ModelLoadError(f"graph {kind} {vi.name!r} declares no element type")
    _fix_input_shapes(proto, input_shapes or {})
    batch = None
    if dynamic_batch or any(s and isinstance(s[0], str) for s in (input_shapes or {}).values()):
        batch = _symbolic_batch(proto, input_shapes or {})
    try:
        proto = shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelLoadError(f"ONNX shape inference failed: {first_line(exc)}") from exc

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    graph = Graph(proto.graph.name or "graph", opset)
    init_names = set()
    for init in proto.graph.initializer:
        graph.add_constant(init.name, _array(init, f"initializer {init.name!r}"))
        init_names.add(init.name)
    for inp in proto.graph.input:
        if inp.name in init_names:
            continue
        shape = _shape_of(inp.type)
        dims = () if shape is None else shape[1:] if shape[:1] == (batch,) else shape
        if require_static and (shape is None or not all(isinstance(d, int) for d in dims)):
            raise InputError(
                f"input {inp.name!r} has a symbolic shape {shape}; fix it with "
                f"--input-shape {inp.name}=D1,D2,... (Python: input_shapes={{...}})"
                + ("" if batch else ", or keep a symbolic dim 0 with --dynamic-batch")
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
    return Value(vi.name, _shape_of(vi.type), onnx_dtype(vi.type.tensor_type.elem_type))


def _constant_value(node: onnx.NodeProto, attrs: dict) -> np.ndarray:
    if "value" in attrs:
        return _array(attrs["value"], f"the value of Constant node {node.name!r}")
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    raise ModelLoadError(f"Constant node {node.name!r} has an unsupported value attribute")
