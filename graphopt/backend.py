"""graphopt as an ONNX backend: ``onnx.backend.base.Backend`` on top of :func:`graphopt.compile`.

The convention onnxruntime (``onnxruntime.backend``) and other runtimes follow, so code
written against ONNX's backend API (and ONNX's own backend test suite,
``onnx.backend.test.BackendTest``) runs graphopt unchanged::

    import graphopt.backend as backend
    rep = backend.prepare(model)            # compiles for x86 (device "CUDA": the cuda target)
    (y,) = rep.run([x])                     # outputs in the model's output order
    y = rep.run({"x": x})["y"]              # or by name

``prepare`` compiles with ``verify=False``: the caller compares the outputs (ONNX's test
harness against its expected values). A model graphopt cannot compile raises graphopt's
own error (:class:`~graphopt.errors.UnsupportedOpsError`, ``CompileError``, ...) at
``prepare``, never a wrong answer later. Keyword arguments go to ``graphopt.compile``
(``target=``, ``input_shapes=``, ``target_options=``, ``layout=``, ``output=``, ...).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep, Device, DeviceType, namedtupledict

from graphopt.artifact import Artifact
from graphopt.compiler import compile as compile_model
from graphopt.errors import InputError, TargetError, UnsupportedOpsError
from graphopt.targets import TARGETS, resolve

__all__ = [
    "GraphoptBackend",
    "GraphoptRep",
    "SpecializingRep",
    "prepare",
    "run_model",
    "run_node",
    "supports_device",
]

# ONNX device type -> the graphopt target a model compiles for when no target= is given
DEVICE_TARGETS = {DeviceType.CPU: "x86", DeviceType.CUDA: "cuda"}


class GraphoptRep(BackendRep):
    """A compiled model: ``run(inputs)`` returns its outputs in the model's output order,
    as a tuple that also takes output names (``outputs["y"]``).

    ``inputs``: a list (one array per graph input that is not an initializer, in order),
    a dict by name, or one array for a one-input model. The artifact lives in a temporary
    folder removed with the rep (or by :meth:`close`), unless ``output=`` named a file.
    """

    def __init__(self, artifact: Artifact, model: onnx.ModelProto) -> None:
        self.artifact = artifact
        inits = {i.name for i in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.output_names = [o.name for o in model.graph.output]
        # closing the artifact also removes the temporary folder compile built it in
        self._finalizer = weakref.finalize(self, artifact.close)

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:  # noqa: ARG002 - API
        feed = self._feed(inputs)
        outputs = self.artifact.run(feed)
        missing = [n for n in self.output_names if n not in outputs]
        if missing:  # the artifact's outputs are the graph's: this would be a graphopt bug
            raise InputError(f"the compiled model has no output(s) {', '.join(missing)}")
        values = [outputs[n] for n in self.output_names]
        return namedtupledict("Outputs", self.output_names)(*values)

    def _feed(self, inputs: Any) -> dict[str, np.ndarray]:
        given = _named(inputs, self.input_names)
        # inputs no computation reads may be gone from the artifact: only those it takes
        wanted = {s["name"] for s in self.artifact.input_specs}
        return {n: v for n, v in given.items() if n in wanted}

    def close(self) -> None:
        """Release the loaded code and remove the temporary artifact. Idempotent."""
        self._finalizer()


def _named(inputs: Any, input_names: list[str]) -> dict[str, np.ndarray]:
    """``inputs`` (a list in ``input_names`` order, a dict, or one array) by name."""
    if isinstance(inputs, Mapping):
        given = dict(inputs)
    else:
        if isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence):
            inputs = [inputs]
        if len(inputs) != len(input_names):
            raise InputError(
                f"got {len(inputs)} input(s), the model takes {len(input_names)}: "
                + ", ".join(input_names)
            )
        given = dict(zip(input_names, inputs, strict=True))
    unknown = sorted(set(given) - set(input_names))
    if unknown:
        raise InputError(
            f"the model has no input(s) {', '.join(unknown)}; its inputs: " + ", ".join(input_names)
        )
    return {n: np.asarray(v) for n, v in given.items()}


class SpecializingRep(BackendRep):
    """A model whose shapes depend on the values of some of its inputs (pads, axes,
    sizes, repeats given as graph inputs rather than constants), which ``graphopt.compile``
    refuses: each ``run`` bakes those inputs' values into the model as constants and
    compiles it (once per distinct set of values; the artifacts are cached), as a
    shape-specializing runtime would. Which inputs: scalars, integer vectors of at most 64
    elements, and empty tensors (graphopt refuses empty inputs; as constants they are
    only a shape and a type, CastLike's ``target_type`` for one). A specialized model
    graphopt cannot compile either raises that refusal from ``run``; nothing ever runs
    unspecialized.
    """

    def __init__(self, proto: onnx.ModelProto, shape_inputs: list[str], kwargs: dict) -> None:
        self.proto = proto
        self.shape_inputs = shape_inputs
        self.kwargs = kwargs
        inits = {i.name for i in proto.graph.initializer}
        self.input_names = [i.name for i in proto.graph.input if i.name not in inits]
        self.output_names = [o.name for o in proto.graph.output]
        self._reps: dict[tuple, GraphoptRep] = {}

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:  # noqa: ARG002 - API
        feed = _named(inputs, self.input_names)
        missing = [n for n in self.shape_inputs if n not in feed]
        if missing:
            raise InputError(f"input(s) {', '.join(missing)} are needed to compile the model")
        values = {n: feed.pop(n) for n in self.shape_inputs}
        key = tuple((n, v.dtype.str, v.shape, v.tobytes()) for n, v in values.items())
        rep = self._reps.get(key)
        if rep is None:
            rep = GraphoptBackend.prepare(_bake(self.proto, values), **self.kwargs)
            self._reps[key] = rep
        return rep.run(feed)

    def close(self) -> None:
        for rep in self._reps.values():
            rep.close()
        self._reps.clear()


_SHAPE_DTYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def _shape_inputs(proto: onnx.ModelProto) -> list[str]:
    """The graph inputs that may hold shapes, axes, sizes or pad values: scalars, small
    integer vectors, and empty tensors."""
    inits = {i.name for i in proto.graph.initializer}
    names = []
    for value in proto.graph.input:
        tensor = value.type.tensor_type
        dims = tensor.shape.dim if tensor.HasField("shape") else None
        if value.name in inits or dims is None:
            continue
        # a Pad value, a Clip bound: any number type
        scalar = len(dims) == 0 and tensor.elem_type != onnx.TensorProto.STRING
        small = len(dims) == 1 and 0 <= dims[0].dim_value <= 64
        empty = any(d.HasField("dim_value") and d.dim_value == 0 for d in dims)
        if not (scalar or empty or (small and tensor.elem_type in _SHAPE_DTYPES)):
            continue
        names.append(value.name)
    return names


def _bake(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``proto`` with ``values`` as initializers instead of graph inputs."""
    baked = onnx.ModelProto()
    baked.CopyFrom(proto)
    kept = [v for v in baked.graph.input if v.name not in values]
    del baked.graph.input[:]
    baked.graph.input.extend(kept)
    for name, value in values.items():
        baked.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    return baked


class GraphoptBackend(Backend):
    """ONNX's backend API over :func:`graphopt.compile` (see the module docstring)."""

    @classmethod
    def target_for(cls, device: str) -> str:
        """The graphopt target a device string (``"CPU"``, ``"CUDA"``, ``"CUDA:0"``) means."""
        try:
            kind = Device(device).type
        except (AttributeError, ValueError):
            raise TargetError(f"unknown ONNX device {device!r}; use CPU or CUDA") from None
        return DEVICE_TARGETS[kind]

    @classmethod
    def supports_device(cls, device: str) -> bool:
        """CPU always; CUDA where the cuda target's artifacts can run on this machine."""
        try:
            name = cls.target_for(device)
        except TargetError:
            return False
        if Device(device).device_id != 0:  # artifacts run on device 0
            return False
        return TARGETS[name].cannot_run_here(resolve(name).tvm) is None

    @classmethod
    def prepare(
        cls, model: Any, device: str = "CPU", **kwargs: Any
    ) -> GraphoptRep | SpecializingRep:
        """Compile ``model`` (a ``ModelProto``, its bytes, or a path) for ``device``.

        ``kwargs`` go to :func:`graphopt.compile`; ``target=`` overrides the device's
        target. Verification is off unless ``verify=True`` is passed. A model refused
        because shapes depend on the values of integer inputs (pads, axes, sizes as graph
        inputs) becomes a :class:`SpecializingRep`, compiled at ``run`` for those values.
        """
        source, proto = _source(model)
        kwargs.setdefault("target", cls.target_for(device))
        kwargs.setdefault("verify", False)
        # without output=, compile builds in a temporary folder the artifact removes when
        # closed (GraphoptRep.close, or the rep dropped), and leaves none if it fails
        temporary = kwargs.get("output") is None
        try:
            artifact = compile_model(source, **kwargs)
        except (UnsupportedOpsError, InputError):
            # Shapes that depend on input values: specialize on them at run time.
            shape_inputs = _shape_inputs(proto) if proto is not None and temporary else []
            if not shape_inputs:
                raise
            kwargs.pop("output", None)
            return SpecializingRep(proto, shape_inputs, kwargs)
        if proto is None:  # compiled from a path: only its graph's names are needed
            proto = onnx.load(os.fspath(source), load_external_data=False)
        return GraphoptRep(artifact, proto)

    @classmethod
    def run_model(
        cls, model: Any, inputs: Any, device: str = "CPU", **kwargs: Any
    ) -> tuple[Any, ...]:
        rep = cls.prepare(model, device, **kwargs)
        try:
            return rep.run(inputs)
        finally:
            rep.close()

    @classmethod
    def run_node(
        cls,
        node: onnx.NodeProto,
        inputs: Any,
        device: str = "CPU",
        outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Compile and run one node: a model is built around it (input types from the
        arrays; output types from ``outputs_info`` or ONNX shape inference).
        ``opset_version=`` picks the default domain's opset (default: onnx's newest)."""
        super().run_node(node, inputs, device, outputs_info, **kwargs)
        opset = kwargs.pop("opset_version", onnx.defs.onnx_opset_version())
        model = _node_model(node, inputs, outputs_info, opset)
        return cls.run_model(model, list(_arrays(node, inputs).values()), device, **kwargs)


def _source(model: Any) -> tuple[Any, onnx.ModelProto | None]:
    """What to compile, and its proto when already in memory. A path goes to compile as
    a path (compile checks the file, reads its external data, confined to its folder)."""
    if isinstance(model, onnx.ModelProto):
        return model, model
    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
        return proto, proto
    if isinstance(model, str | os.PathLike):
        return model, None
    raise InputError(f"prepare takes an onnx.ModelProto, its bytes or a path, not {type(model)}")


def _arrays(node: onnx.NodeProto, inputs: Any) -> dict[str, np.ndarray]:
    """The node's non-empty inputs by name, from a list (in the node's order) or a dict."""
    names = [n for n in node.input if n]
    if isinstance(inputs, Mapping):
        return {n: np.asarray(inputs[n]) for n in names}
    return {n: np.asarray(v) for n, v in zip(names, inputs, strict=True)}


def _node_model(
    node: onnx.NodeProto, inputs: Any, outputs_info: Sequence | None, opset: int
) -> onnx.ModelProto:
    helper = onnx.helper
    arrays = _arrays(node, inputs)
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in arrays.items()
    ]
    outs = [n for n in node.output if n]
    if outputs_info is not None:
        graph_outputs = [
            helper.make_tensor_value_info(
                n, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape
            )
            for n, (dtype, shape) in zip(outs, outputs_info, strict=True)
        ]
    else:
        graph_outputs = [onnx.ValueInfoProto(name=n) for n in outs]
    graph = helper.make_graph([node], f"run_node_{node.op_type}", graph_inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if outputs_info is None:  # the output types ONNX infers
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        by_name = {v.name: v for v in inferred.graph.value_info}
        for out in model.graph.output:
            if out.name in by_name:
                out.CopyFrom(by_name[out.name])
    return model


# the module-level functions of ONNX's backend convention (``onnxruntime.backend.prepare``)
prepare = GraphoptBackend.prepare
run_model = GraphoptBackend.run_model
run_node = GraphoptBackend.run_node
supports_device = GraphoptBackend.supports_device
