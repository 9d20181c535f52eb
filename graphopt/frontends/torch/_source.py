"""Torch models in, :class:`TorchSource` out: the torch frontend's entry points.

``from_torch`` exports an ``nn.Module``/``GraphModule`` (or takes an ``ExportedProgram``),
``load_pt2`` reads a ``torch.export.save`` file (through :mod:`._safe_load` unless the
file is trusted), ``as_source`` is what ``graphopt.compile`` makes of a torch model. Each
fixes the input shapes, decomposes the program to core ATen (except ``_KEEP``), imports it
(:mod:`._importer`) and pairs the graph with its reference (the module or program run
eagerly), example inputs and a hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from graphopt.errors import InputError, ModelLoadError
from graphopt.frontends.torch._importer import Importer
from graphopt.frontends.torch._quiet import TorchImportError, first_line, quiet
from graphopt.frontends.torch._resize import UPSAMPLE_OPS
from graphopt.frontends.torch._safe_load import TRUST_HINT, load_untrusted
from graphopt.ir import Graph
from graphopt.verify import random_inputs

__all__ = ["TorchSource", "as_source", "from_torch", "load_pt2"]

# Kept out of run_decompositions: they map onto ONNX more directly than what they
# decompose into (the recurrent ones decompose into an unrolled loop, the upsampling ones
# other than nearest/bilinear 2-D into index arithmetic; each is one Resize).
_KEEP = (
    ("linear.default", "matmul.default")
    + tuple(f"{op}.input" for op in ("lstm", "gru", "rnn_tanh", "rnn_relu"))
    + tuple(key.removeprefix("aten.") for key in UPSAMPLE_OPS)
)


@dataclass
class TorchSource:
    """A torch model read into the graph IR, with torch eager as its reference.

    ``reference(inputs)`` maps ``{input name: array}`` to ``{output name: array}`` by
    running the original module (or program) in eager mode. ``sha256`` hashes the state
    dict and the exported graph's code (the file's bytes for a ``.pt2`` file).
    """

    graph: Graph
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    name: str
    sha256: str
    example_inputs: dict[str, np.ndarray]
    program: ExportedProgram | None = field(default=None, repr=False)


# --- the entry points ---------------------------------------------------------------------
def from_torch(obj: Any, example_inputs: Any = None, *, name: str | None = None) -> TorchSource:
    """Read ``obj`` (``nn.Module``, ``GraphModule`` or ``ExportedProgram``) into the IR.

    ``example_inputs``: a tensor or a tuple of tensors (numpy arrays are accepted), passed
    positionally; for an ``ExportedProgram`` it defaults to the program's own example
    inputs. Modules are put in eval mode and exported with ``torch.export.export``.
    """
    if isinstance(obj, ExportedProgram):
        args = _example_args(example_inputs) if example_inputs is not None else None
        return _from_program(obj, args, name or "ExportedProgram", module=None)
    if isinstance(obj, torch.nn.Module):
        if example_inputs is None:
            raise InputError(
                f"from_torch({type(obj).__name__}) needs example_inputs to export the module"
            )
        args = _example_args(example_inputs)
        obj.eval()
        program = _export(obj, args, name or type(obj).__name__)
        return _from_program(program, args, name or type(obj).__name__, module=obj)
    raise InputError(
        f"from_torch takes an nn.Module, a torch.fx.GraphModule or an ExportedProgram, "
        f"not {type(obj).__name__}"
    )


def load_pt2(
    path: str | os.PathLike,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    trust_pickle: bool = False,
) -> TorchSource:
    """Load a ``torch.export.save`` file; shapes come from its example inputs.

    ``input_shapes`` fixes dynamic dimensions (the program is re-exported for them) or
    must agree with the program's static shapes.

    ``torch.export.load`` can run code from the file it reads (pickles, AOTInductor
    libraries, shape expressions sympy evaluates, modules imported by name, Python
    functions the graph calls), so by default none of that is allowed: what cannot be
    loaded without it is refused with one :class:`TorchImportError` line. Sample inputs
    that only pickle can read are skipped with a warning (seeded random inputs stand in;
    a dynamic program then needs ``input_shapes``). ``trust_pickle=True`` loads the file
    exactly as ``torch.export.load`` does: only for a file you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    data = path.read_bytes()  # one read: what is checked is what is loaded and hashed
    skipped = None
    if trust_pickle:
        try:
            with quiet():
                program = torch.export.load(io.BytesIO(data))
        except Exception as exc:
            raise TorchImportError(
                f"{path} is not a readable torch.export file: {first_line(exc)}"
            ) from None
    else:
        program, skipped = load_untrusted(path, data)
    if skipped is not None:
        if not input_shapes and not _is_static(program):
            raise TorchImportError(
                f"{path} has dynamic input shapes and its sample inputs were not loaded "
                f"({skipped}): give input shapes, or {TRUST_HINT}"
            )
        warnings.warn(
            f"{path}: sample inputs not loaded ({skipped}); seeded random inputs stand in; "
            f"to load them, {TRUST_HINT}",
            stacklevel=2,
        )
    if input_shapes:
        args = _inputs_for_shapes(program, input_shapes)
    else:
        args = _program_example_args(program)
    # A program with example inputs becomes a module (run_decompositions does that) with
    # guard code from the file compiled by exec: graphopt keeps the inputs itself.
    program.example_inputs = None
    source = _from_program(program, args, path.name, module=None)
    source.sha256 = hashlib.sha256(data).hexdigest()
    return source


def as_source(
    model: Any,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    trust_pickle: bool = False,
) -> TorchSource:
    """What ``graphopt.compile`` makes of a torch model: a :class:`TorchSource` as it is,
    a ``.pt2`` path loaded (``trust_pickle``: see :func:`load_pt2`), an ``ExportedProgram``
    read (with its own example inputs)."""
    if isinstance(model, str | os.PathLike):
        return load_pt2(model, input_shapes, trust_pickle=trust_pickle)
    if isinstance(model, ExportedProgram):
        args = _inputs_for_shapes(model, input_shapes) if input_shapes else None
        return _from_program(model, args, "ExportedProgram", module=None)
    if isinstance(model, TorchSource):
        for name, shape in (input_shapes or {}).items():
            have = model.graph.values.get(name) if name in model.graph.inputs else None
            if have is None or tuple(have.shape) != tuple(shape):
                raise InputError(
                    f"--input-shape {name}={','.join(map(str, shape))} does not fit "
                    f"{model.name}, read with fixed shapes "
                    + ", ".join(f"{n}={model.graph.values[n].shape}" for n in model.graph.inputs)
                )
        return model
    raise InputError(
        f"graphopt.compile cannot take a {type(model).__name__} directly: read it with "
        "graphopt.from_torch(module, example_inputs) and compile the result"
    )


# --- from a model to a source ------------------------------------------------------------
def _example_args(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    items = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    args = []
    for i, a in enumerate(items):
        if isinstance(a, np.ndarray):
            a = torch.from_numpy(a)
        if not isinstance(a, torch.Tensor):
            raise InputError(f"example input {i} is a {type(a).__name__}, not a tensor")
        args.append(a)
    return tuple(args)


def _export(module: torch.nn.Module, args: tuple, name: str) -> ExportedProgram:
    try:
        with torch.no_grad(), quiet():
            return torch.export.export(module, args)
    except Exception as exc:
        raise TorchImportError(f"torch.export cannot export {name}: {first_line(exc)}") from None


def _user_placeholders(program: ExportedProgram) -> list[torch.fx.Node]:
    names = set(program.graph_signature.user_inputs)
    return [n for n in program.graph.nodes if n.op == "placeholder" and n.target in names]


def _is_static(program: ExportedProgram) -> bool:
    for node in _user_placeholders(program):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not all(isinstance(d, int) for d in val.shape):
            return False
    return True


def _inputs_for_shapes(program: ExportedProgram, shapes: dict) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs of the requested shapes (others from the program's own)."""
    nodes = _user_placeholders(program)
    unknown = sorted(set(shapes) - {n.name for n in nodes})
    if unknown:
        raise InputError(
            f"--input-shape names unknown input(s) {', '.join(unknown)}; "
            f"model inputs are: {', '.join(n.name for n in nodes) or '(none)'}"
        )
    own = _program_example_args(program)
    gen = torch.Generator().manual_seed(0)
    args = []
    for i, node in enumerate(nodes):
        val = node.meta["val"]
        if node.name not in shapes:
            if own is None:
                raise InputError(f"input {node.name!r} needs a shape (--input-shape)")
            args.append(own[i])
            continue
        shape = tuple(int(d) for d in shapes[node.name])
        if len(shape) != val.dim():
            raise InputError(
                f"--input-shape {node.name}: model input has rank {val.dim()}, "
                f"got {len(shape)} dims"
            )
        if val.dtype.is_floating_point:
            args.append(torch.randn(shape, generator=gen, dtype=val.dtype))
        else:
            args.append(torch.randint(0, 10, shape, generator=gen, dtype=val.dtype))
    return tuple(args)


def _program_example_args(program: ExportedProgram) -> tuple | None:
    example = getattr(program, "example_inputs", None)
    if not example:
        return None
    args, kwargs = example
    if kwargs:
        raise TorchImportError("programs with keyword inputs are not supported")
    return tuple(args)


def _from_program(
    program: ExportedProgram, args: tuple | None, name: str, module: torch.nn.Module | None
) -> TorchSource:
    sig = program.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        raise TorchImportError(
            f"{name} mutates buffers or inputs (exported in training mode?); export it "
            "after model.eval()"
        )
    if args is None:
        args = _program_example_args(program)
        if args is None and not _is_static(program):
            raise TorchImportError(
                f"{name} has dynamic input shapes and no example inputs: give input shapes"
            )
    placeholders = _user_placeholders(program)
    if args is not None and len(args) != len(placeholders):
        raise InputError(
            f"{name} takes {len(placeholders)} tensor input(s), got {len(args)} example input(s)"
        )
    static = _is_static(program)
    if args is not None and (not static or not _static_match(placeholders, args)):
        if static:
            want = ", ".join(f"{n.name}={tuple(n.meta['val'].shape)}" for n in placeholders)
            raise InputError(f"{name} was exported for fixed input shapes {want}")
        program = _export(program.module(), args, name)  # specialise the dynamic dims
    eager = module if module is not None else program.module()
    try:
        with quiet():
            decomposed = program.run_decompositions(_decomposition_table())
    except Exception as exc:
        raise TorchImportError(f"cannot decompose {name} to core ATen: {first_line(exc)}") from None
    graph = Importer(decomposed, name).run()
    if args is None:  # static program without example inputs: seeded random ones
        specs = [
            {"name": n, "shape": graph.values[n].shape, "dtype": graph.values[n].dtype}
            for n in graph.inputs
        ]
        example = random_inputs(specs, seed=0)
    else:
        example = {n: a.detach().cpu().numpy() for n, a in zip(graph.inputs, args, strict=True)}
    return TorchSource(
        graph=graph,
        reference=_reference(eager, graph.inputs, graph.outputs),
        name=name,
        sha256=_sha256(program),
        example_inputs=example,
        program=program,
    )


def _static_match(placeholders: list[torch.fx.Node], args: tuple) -> bool:
    return all(
        tuple(n.meta["val"].shape) == tuple(a.shape) and n.meta["val"].dtype == a.dtype
        for n, a in zip(placeholders, args, strict=True)
    )


def _decomposition_table() -> dict:
    table = torch.export.default_decompositions()
    for key in _KEEP:
        op, overload = key.split(".")
        table.pop(getattr(getattr(torch.ops.aten, op), overload), None)
    return table


def _reference(fn: Callable, input_names: list[str], output_names: list[str]) -> Callable:
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in input_names]
        with torch.no_grad():
            out = fn(*args)
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return {n: t.detach().cpu().numpy() for n, t in zip(output_names, leaves, strict=True)}

    return run


def _sha256(program: ExportedProgram) -> str:
    h = hashlib.sha256(program.graph_module.code.encode())
    for key, tensor in sorted({**program.state_dict, **program.constants}.items()):
        if isinstance(tensor, torch.Tensor):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
