"""Read torch models into graphopt's graph IR, op by op, without going through ONNX files.

Accepted: an ``nn.Module`` (exported with ``torch.export.export`` in eval mode), a
``torch.fx.GraphModule`` (exported the same way, so ``symbolic_trace`` output works), an
``ExportedProgram``, or a ``.pt2`` file written by ``torch.export.save`` (read without
running code from it unless the caller trusts the file: see :func:`load_pt2`).

The program is decomposed to core ATen (``run_decompositions``) except for the ops that
map more directly onto ONNX than their decompositions do: ``linear``, ``matmul`` and the
recurrent layers ``lstm``/``gru``/``rnn_tanh``/``rnn_relu`` (whose decomposition would be
an already unrolled loop). Each remaining ATen node becomes ONNX-semantics nodes through
the ``ATEN`` table; recurrent layers become one ONNX ``LSTM``/``GRU``/``RNN`` node per
layer, with torch's gate order converted to ONNX's::

    LSTM  torch i f g o  ->  ONNX i o f c
    GRU   torch r z n    ->  ONNX z r h   (linear_before_reset=1, as torch computes it)

so the ``expand-rnn`` pass unrolls them like any imported ONNX model. Parameters and
buffers become numpy constants; nodes whose inputs are all constants (``full``,
``permute`` of a weight, ...) are evaluated by torch itself at import. Every op outside
the table is named, with the user's source line, in one :class:`UnsupportedOpsError`.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import io
import logging
import math
import operator
import os
import pickle
import re
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import sympy
import torch
import torch.fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from graphopt.errors import InputError, ModelLoadError, UnsupportedOpsError
from graphopt.ir import Graph, Node, Value

__all__ = ["ATEN", "TorchImportError", "TorchSource", "as_source", "from_torch", "load_pt2"]

# Gelu became an ONNX op in opset 20; ReduceMean takes axes as an input from 18 on.
_OPSET = 20
_INT64_MIN = int(np.iinfo(np.int64).min)
# Kept out of run_decompositions: they map onto ONNX more directly than what they
# decompose into (the recurrent ones decompose into an unrolled loop).
_KEEP = ("linear.default", "matmul.default") + tuple(
    f"{op}.input" for op in ("lstm", "gru", "rnn_tanh", "rnn_relu")
)
_ALIASES = {
    "aten.clone.default",
    "aten.alias.default",
    "aten.detach.default",
    "aten.lift_fresh_copy.default",
    "aten.contiguous.default",
}
_NEVER_FOLD = ("aten.rand", "aten.bernoulli", "aten.normal", "aten.native_dropout")
_TORCH_LOCK = threading.RLock()  # see _quiet; _Guard holds it too, so guards never stack


class TorchImportError(ModelLoadError):
    """A torch model that cannot be exported or read (data-dependent control flow, ...)."""


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


class _Refuse(Exception):
    """Raised by a converter: the node cannot be translated, for the given reason."""


class _Poisoned(Exception):
    """An input comes from a refused node: skip quietly, the refusal is reported."""


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
            with _quiet():
                program = torch.export.load(io.BytesIO(data))
        except Exception as exc:
            raise TorchImportError(
                f"{path} is not a readable torch.export file: {_first_line(exc)}"
            ) from None
    else:
        program, skipped = _load_untrusted(path, data)
    if skipped is not None:
        if not input_shapes and not _is_static(program):
            raise TorchImportError(
                f"{path} has dynamic input shapes and its sample inputs were not loaded "
                f"({skipped}): give input shapes, or {_TRUST_HINT}"
            )
        warnings.warn(
            f"{path}: sample inputs not loaded ({skipped}); seeded random inputs stand in; "
            f"to load them, {_TRUST_HINT}",
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
        with torch.no_grad(), _quiet():
            return torch.export.export(module, args)
    except Exception as exc:
        raise TorchImportError(f"torch.export cannot export {name}: {_first_line(exc)}") from None


@contextlib.contextmanager
def _quiet():  # noqa: ANN202
    """Hold back torch's warnings and log dumps: a failure becomes one error line instead.

    Also one torch job at a time (``_TORCH_LOCK``): export, loading and decomposition keep
    global state in torch, and the warning filters and stderr swapped here are global too.
    """
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:  # torch prints the failing graph to stderr on a data-dependent guard
        with _TORCH_LOCK, warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


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
        with _quiet():
            decomposed = program.run_decompositions(_decomposition_table())
    except Exception as exc:
        raise TorchImportError(
            f"cannot decompose {name} to core ATen: {_first_line(exc)}"
        ) from None
    graph = _Importer(decomposed, name).run()
    if args is None:  # static program without example inputs: seeded random ones
        from graphopt.artifact import random_inputs

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


# --- reading .pt2 files without running code from them --------------------------------------
# torch.export.load runs code from the file it reads along several paths: payloads it
# unpickles (weights and constants marked use_pickle, sample inputs, opaque and TorchScript
# objects), AOTInductor shared libraries, shape expressions given to sympy (which evaluates
# strings as Python), modules the pytree decoder imports by name, and any function
# reachable from torch/math/operator as a graph node, which graphopt then runs. Its own
# sanity checks stop none of them, so a file that is not trusted is read under _Guard.
_TRUST_HINT = "pass trust_pickle=True (CLI: --trust-pickle) only for a file you trust"
# What an exported graph may call besides torch operators: its symbolic-shape arithmetic.
_SHAPE_ARITHMETIC = (
    operator.getitem,
    *(operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv),
    *(operator.mod, operator.pow, operator.neg, operator.pos, operator.abs, operator.not_),
    *(operator.and_, operator.or_, operator.lshift, operator.rshift),
    *(operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge),
    *(math.ceil, math.floor, math.trunc, round),
    *(torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max, torch.sym_min),
    *(torch.sym_not, torch.sym_sqrt, torch.sym_sum),
)
# Shape expressions as torch writes them (sympy's srepr): no quote but ', no brackets.
_SYM_TEXT = re.compile(r"[\w .,'()+\-*/%<>=!&|~]*", re.ASCII)
_SYM_NODES = (
    *(ast.Expression, ast.Call, ast.keyword, ast.Name, ast.Constant, ast.Tuple, ast.Load),
    *(ast.UnaryOp, ast.BinOp, ast.BoolOp, ast.Compare),
    *(ast.unaryop, ast.operator, ast.boolop, ast.cmpop),
)
_SYM_STRINGS = {  # the string arguments srepr writes: a symbol's name, a float's digits
    "Symbol": re.compile(r"[A-Za-z_]\w*", re.ASCII),
    "Dummy": re.compile(r"[A-Za-z_]\w*", re.ASCII),
    "Float": re.compile(r"[+-]?(inf|nan|(\d+\.?\d*|\.\d+)(e[+-]?\d+)?)", re.ASCII | re.I),
}


class _Refused(Exception):
    """Raised inside torch's loader by :class:`_Guard`: this step would run file code."""


def _refusal(path: Path, what: str) -> str:
    return f"{path}: refused {what}: loading it could run code from the file; {_TRUST_HINT}"


def _load_untrusted(path: Path, data: bytes) -> tuple[ExportedProgram, str | None]:
    """Read ``data`` (the bytes of ``path``) with no code from it run.

    Returns the program and, when its sample inputs were skipped, why.
    """
    from torch.export.pt2_archive._package import load_pt2 as read_archive

    skip, skipped = _screen(path, data)
    program = None
    with _TORCH_LOCK, _Guard(skip) as guard:
        try:  # read_archive, not torch.export.load: no fallback to the legacy format
            with _quiet():
                program = read_archive(io.BytesIO(data)).exported_programs.get("model")
        except Exception as exc:
            if guard.refused is None:
                raise TorchImportError(
                    f"{path} is not a readable torch.export file: {_first_line(exc)}"
                ) from None
    if guard.refused is not None:  # also when torch caught the refusal and went on
        raise TorchImportError(_refusal(path, guard.refused))
    if program is None:
        raise TorchImportError(f"{path} is not a readable torch.export file: no program")
    _check_calls(program, path)
    return program, skipped


def _screen(path: Path, data: bytes) -> tuple[set[str], str | None]:
    """Check the archive before torch reads it: refuse the legacy format, find sample
    inputs that ``torch.load(weights_only=True)`` refuses.

    Returns those sample-input records (the guard reads them as empty, so the program
    loads without example inputs) and why they were refused.
    """
    from torch.export.pt2_archive import constants as pt2

    skip: set[str] = set()
    why = None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            root = names[0].partition("/")[0] + "/" if names else ""
            records = {name.removeprefix(root): name for name in names if name.startswith(root)}
            if len(records) != len(names) or pt2.ARCHIVE_FORMAT_PATH not in records:
                if "version" in names:  # what torch.export.load falls back to
                    raise TorchImportError(
                        _refusal(path, "the legacy torch.export format, which torch unpickles")
                    )
                raise TorchImportError(f"{path} is not a readable torch.export file: not PT2")
            prefix, suffix = pt2.MODELS_FILENAME_FORMAT.split("{}")
            for record in records:  # the records torch takes for programs, as it names them
                if not record.startswith(pt2.MODELS_DIR):
                    continue
                model = record[len(prefix) : -len(suffix)]
                sample = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
                if sample not in records:
                    continue
                try:
                    torch.load(io.BytesIO(archive.read(records[sample])), weights_only=True)
                except pickle.UnpicklingError as exc:
                    skip.add(sample)
                    why = f"pickled data{_needing(exc)}"
    except TorchImportError:
        raise
    except Exception as exc:  # a damaged zip, or a damaged payload in it
        raise TorchImportError(
            f"{path} is not a readable torch.export file: {_first_line(exc)}"
        ) from None
    return skip, why


def _needing(exc: BaseException) -> str:
    """`` needing mod.name``: the global that ``weights_only`` unpickling refused, if named."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f" needing {match[1]}" if match else ""


class _Guard:
    """Patches torch's loader so that, in this thread, it cannot run code from the file.

    While active: ``torch.load`` unpickles with ``weights_only=True`` whatever it is asked;
    ``pickle.loads``/``load``, TorchScript object unpickling and AOTInductor library
    loading are refused; sympy reads only plain shape expressions (:func:`_plain_sym_expr`);
    modules are imported by name only if already imported or part of torch; the records
    in ``skip`` read as empty. A refusal is kept in ``refused`` (torch wraps some errors
    in its own, or retries) and raised as :class:`_Refused`. Other threads get the
    original functions; the caller holds ``_TORCH_LOCK`` so that guards never stack; every
    patch is undone on exit, whatever happened.
    """

    def __init__(self, skip: set[str]) -> None:
        self.skip = skip
        self.refused: str | None = None
        self._thread = threading.get_ident()
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> _Guard:
        from torch._export.serde.serialize import GraphModuleDeserializer
        from torch.export.pt2_archive import _package

        try:
            self._patch(torch, "load", self._torch_load)
            self._patch(pickle, "loads", self._refuse("a pickled Python object"))
            self._patch(pickle, "load", self._refuse("a pickled Python object"))
            self._patch(torch._C, "_pickle_load_obj", self._refuse("a pickled TorchScript object"))
            self._patch(_package, "_load_aoti", self._refuse("AOTInductor compiled code"))
            self._patch(_package.PT2ArchiveReader, "read_bytes", self._read_bytes)
            self._patch(GraphModuleDeserializer, "_parse_sym_expr", self._parse_sym_expr)
            self._patch(importlib, "import_module", self._import_module)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _patch(self, owner: Any, name: str, check: Callable) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def patched(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._thread:
                return original(*args, **kwargs)
            return check(original, *args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, patched)

    def _restore(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)

    def _refused(self, what: str) -> _Refused:
        self.refused = self.refused or what
        return _Refused(what)

    def _refuse(self, what: str) -> Callable:
        def check(original: Callable, *args: Any, **kwargs: Any) -> Any:
            raise self._refused(what)

        return check

    def _torch_load(
        self, original: Callable, f: Any, *args: Any, weights_only: Any = None, **kwargs: Any
    ) -> Any:
        try:  # whatever weights_only the caller asked for
            return original(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            raise self._refused(f"pickled data{_needing(exc)}") from None

    def _read_bytes(self, original: Callable, reader: Any, name: str) -> bytes:
        return b"" if name in self.skip else original(reader, name)

    def _parse_sym_expr(
        self, original: Callable, deserializer: Any, expr_str: str, *args: Any, **kwargs: Any
    ) -> Any:
        names = {**deserializer.sympy_functions, **deserializer.symbol_name_to_symbol}
        if not _plain_sym_expr(expr_str, names):
            raise self._refused(f"a shape expression sympy would run as Python: {expr_str[:60]!r}")
        return original(deserializer, expr_str, *args, **kwargs)

    def _import_module(self, original: Callable, name: str, package: str | None = None) -> Any:
        full = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        if full not in sys.modules and full.partition(".")[0] != "torch":
            raise self._refused(f"an import of module {full!r}")
        return original(name, package)


def _plain_sym_expr(text: str, names: dict[str, Any]) -> bool:
    """Whether ``sympy.sympify`` can read ``text`` without running code from it.

    sympify evaluates a string as Python. Accepted is what torch writes: numbers, the
    deserializer's own symbols and functions (``names``), sympy classes and singletons
    called with such arguments and constant keywords; strings only as the name of a
    ``Symbol``/``Dummy`` or the digits of a ``Float``. No attributes, subscripts, lambdas.
    """
    if not _SYM_TEXT.fullmatch(text):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    strings: set[int] = set()  # ids of the string constants a call above allowed
    for node in ast.walk(tree):  # breadth first: a call before its arguments
        if not isinstance(node, _SYM_NODES):
            return False
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or not all(
                isinstance(k.value, ast.Constant) for k in node.keywords
            ):
                return False
            first = node.args[0] if node.args else None
            pattern = _SYM_STRINGS.get(node.func.id)
            if pattern and isinstance(first, ast.Constant) and isinstance(first.value, str):
                if not pattern.fullmatch(first.value):
                    return False
                strings.add(id(first))
        elif isinstance(node, ast.Constant):
            if type(node.value) not in (int, float, bool) and id(node) not in strings:
                return False
        elif isinstance(node, ast.Name) and node.id not in names:
            obj = None if node.id.startswith("_") else getattr(sympy, node.id, None)
            if not isinstance(obj, sympy.Basic) and not (
                isinstance(obj, type) and issubclass(obj, sympy.Basic)
            ):
                return False
    return True


def _check_calls(program: ExportedProgram, path: Path) -> None:
    """Refuse a graph that calls anything but torch operators and shape arithmetic.

    A node read from a file may name any function reachable from ``torch``, ``math`` or
    ``operator`` (one of torch's own imports a module by name and calls it), and graphopt
    runs the graph while decomposing it and as the reference.
    """
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            for fn in [node.target, *pytree.tree_leaves((node.args, node.kwargs))]:
                if callable(fn) and not _is_operator(fn):
                    name = getattr(fn, "__qualname__", type(fn).__qualname__)
                    raise TorchImportError(
                        _refusal(
                            path,
                            f"node {node.name!r}, which calls "
                            f"{getattr(fn, '__module__', None) or '?'}.{name} (not an operator)",
                        )
                    )


def _is_operator(fn: Any) -> bool:
    if isinstance(fn, torch._ops.OpOverload | torch._ops.HigherOrderOperator):
        return True
    return any(fn is f for f in _SHAPE_ARITHMETIC)


# --- source locations -------------------------------------------------------------------
_FRAME = re.compile(
    r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>[^\n]+)'
    r'(?:\n[ \t]+(?P<code>(?![ \t]*File ")[^\n]*))?'  # the code line, absent for <stdin>
)
_TORCH_DIR = os.path.dirname(torch.__file__)


def source_location(node: torch.fx.Node) -> str:
    """``file:line in fn: code`` of the last user frame (outside torch) that made ``node``."""
    frames = list(_FRAME.finditer(node.meta.get("stack_trace") or ""))
    if not frames:
        return "source location unknown"
    user = [f for f in frames if not f["file"].startswith(_TORCH_DIR)]
    f = (user or frames)[-1]
    where = f"{f['file']}:{f['line']} in {f['fn'].strip()}"
    return f"{where}: {f['code'].strip()}" if f["code"] else where


# --- the importer -----------------------------------------------------------------------
def _dtype(t: torch.dtype) -> str:
    name = str(t).removeprefix("torch.")
    if name == "bool":
        return "bool"
    try:
        return str(np.dtype(name))
    except TypeError:
        raise _Refuse(f"dtype {name} is not supported") from None


def _onnx_type(dtype: str) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _ints(v: Any, n: int) -> list[int]:
    v = [int(x) for x in (v if isinstance(v, Sequence) else [v])]
    return v * n if len(v) == 1 else v


class _Importer:
    """Walks an ExportedProgram's graph and fills a :class:`Graph`.

    ``env`` maps an fx node name to its IR value name (or a list of them for tuple
    results, ``None`` where an element is not translated); ``folded`` holds the torch
    value of every node computed at import (parameters and constant subgraphs), added
    to the graph as a numpy constant only where a translated node reads it.
    """

    def __init__(self, program: ExportedProgram, name: str) -> None:
        self.program = program
        self.graph = Graph(name, _OPSET)
        self.env: dict[str, Any] = {}
        self.folded: dict[str, Any] = {}
        self.refused: list[tuple[str, str, str]] = []
        self.poisoned: set[str] = set()

    # --- values -------------------------------------------------------------------------
    def value(self, arg: Any, dtype: str | None = None) -> str:
        """The IR value for an fx argument (a node, or a Python scalar as a constant)."""
        if isinstance(arg, torch.fx.Node):
            if arg.name in self.poisoned:
                raise _Poisoned
            if arg.name in self.folded:
                if arg.name not in self.env:
                    tensor = self.folded[arg.name]
                    if not isinstance(tensor, torch.Tensor):
                        raise _Refuse(f"input {arg.name!r} is not a tensor")
                    array = tensor.detach().cpu().contiguous().numpy()
                    self.env[arg.name] = self.const(array, arg.name)
                return self.cast(self.env[arg.name], dtype)
            v = self.env[arg.name]
            if not isinstance(v, str):
                raise _Refuse(f"input {arg.name!r} is not a single tensor")
            return self.cast(v, dtype)
        if isinstance(arg, bool | int | float):
            return self.const(np.array(arg, dtype=dtype or np.asarray(arg).dtype), "scalar")
        raise _Refuse(f"argument {arg!r} is not supported")

    def const(self, array: np.ndarray, tag: str) -> str:
        return self.graph.add_constant(self.graph.unique_name(tag), np.asarray(array))

    def is_const(self, arg: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and arg.name in self.folded

    def constant(self, arg: torch.fx.Node) -> np.ndarray:
        return self.folded[arg.name].detach().cpu().contiguous().numpy()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.graph.values[name].shape)

    def dtype(self, name: str) -> str:
        return self.graph.values[name].dtype

    def emit(
        self,
        op: str,
        inputs: list[str],
        shape: Sequence[int],
        dtype: str,
        attrs: dict | None = None,
        tag: str = "v",
        n_out: int = 1,
    ) -> str | list[str]:
        outs = []
        for _ in range(n_out):
            out = self.graph.unique_name(tag)
            self.graph.values[out] = Value(out, tuple(int(d) for d in shape), dtype)
            outs.append(out)
        self.graph.add_node(
            Node(self.graph.unique_name(f"{op}_{tag}"), op, list(inputs), outs, attrs or {})
        )
        return outs[0] if n_out == 1 else outs

    def out(self, node: torch.fx.Node, op: str, inputs: list[str], attrs: dict | None = None):
        """Emit ``op`` producing the value of ``node`` (its shape and dtype from meta)."""
        val = node.meta["val"]
        return self.emit(op, inputs, val.shape, _dtype(val.dtype), attrs, tag=node.name)

    def cast(self, name: str, dtype: str | None) -> str:
        if dtype is None or self.dtype(name) == dtype:
            return name
        if self.graph.is_constant(name):
            return self.const(self.graph.constants[name].astype(dtype), name)
        return self.emit(
            "Cast", [name], self.shape(name), dtype, {"to": _onnx_type(dtype)}, tag=name
        )

    def ints(self, values: Sequence[int], tag: str = "idx") -> str:
        return self.const(np.array(list(values), dtype=np.int64), tag)

    def reshape(self, name: str, shape: Sequence[int], tag: str = "reshape") -> str:
        shape = tuple(int(d) for d in shape)
        if self.shape(name) == shape:
            return name
        if self.graph.is_constant(name):
            return self.const(self.graph.constants[name].reshape(shape), tag)
        return self.emit("Reshape", [name, self.ints(shape)], shape, self.dtype(name), tag=tag)

    def transpose(self, name: str, perm: Sequence[int], tag: str = "transpose") -> str:
        perm = [int(p) for p in perm]
        if perm == sorted(perm):
            return name
        if self.graph.is_constant(name):
            return self.const(self.graph.constants[name].transpose(perm), tag)
        shape = self.shape(name)
        moved = [d for d in perm if shape[d] != 1]
        if moved == sorted(moved):  # only size-1 dims move: a reshape, no data movement
            return self.reshape(name, [shape[p] for p in perm], tag)
        return self.emit(
            "Transpose",
            [name],
            [shape[p] for p in perm],
            self.dtype(name),
            {"perm": perm},
            tag=tag,
        )

    # --- the walk -----------------------------------------------------------------------
    def run(self) -> Graph:
        program = self.program
        sig = program.graph_signature
        lifted = {
            **sig.inputs_to_parameters,
            **sig.inputs_to_buffers,
            **sig.inputs_to_lifted_tensor_constants,
            **getattr(sig, "inputs_to_lifted_custom_objs", {}),
        }
        tensors = {**program.state_dict, **program.constants}
        user = set(sig.user_inputs)
        output_node = None
        for node in program.graph.nodes:
            if node.op == "placeholder":
                if node.target in lifted:
                    self.folded[node.name] = tensors[lifted[node.target]]
                elif node.target in user:
                    self._add_input(node)
                continue
            if node.op == "output":
                output_node = node
                continue
            self._call(node)
        if self.refused:
            raise UnsupportedOpsError(self.refused)
        self._add_outputs(output_node)
        return self.graph

    def _add_input(self, node: torch.fx.Node) -> None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise TorchImportError(f"input {node.name!r} is not a tensor ({type(val).__name__})")
        if not all(isinstance(d, int) for d in val.shape):
            raise TorchImportError(f"input {node.name!r} has a dynamic shape {tuple(val.shape)}")
        try:
            dtype = _dtype(val.dtype)
        except _Refuse as exc:
            raise TorchImportError(f"input {node.name!r}: {exc}") from None
        self.graph.add_input(node.name, tuple(val.shape), dtype)
        self.env[node.name] = node.name

    def _call(self, node: torch.fx.Node) -> None:
        key = _key(node)
        if key.startswith(("aten._assert", "aten.sym_constrain")):
            return
        inputs = node.all_input_nodes
        if any(i.name in self.poisoned for i in inputs):
            self.poisoned.add(node.name)
            return
        if all(i.name in self.folded for i in inputs) and not key.startswith(_NEVER_FOLD):
            if key not in _RECURRENT:
                self.folded[node.name] = _evaluate(node, self.folded)
                return
        convert = ATEN.get(key)
        try:
            if convert is None:
                raise _Refuse("no ONNX translation")
            self.env[node.name] = convert(self, node)
        except _Poisoned:
            self.poisoned.add(node.name)
        except _Refuse as exc:
            self.poisoned.add(node.name)
            self.refused.append((key, node.name, f"{exc} (at {source_location(node)})"))

    def _add_outputs(self, output_node: torch.fx.Node) -> None:
        """Name the outputs ``out0, out1, ...``: the producing node's value is renamed."""
        names: list[str] = []
        renamed: dict[str, str] = {}
        for i, arg in enumerate(pytree.tree_leaves(output_node.args[0])):
            out = f"out{i}"
            if not isinstance(arg, torch.fx.Node):
                raise TorchImportError(f"output {i} is {arg!r}, not a tensor")
            src = self.value(arg)
            if src in renamed:
                src = renamed[src]
            elif self.graph.producer(src) is not None and src not in self.graph.inputs:
                _rename(self.graph, src, out)
                renamed[src] = out
                names.append(out)
                continue
            names.append(out)
            if self.graph.is_constant(src):  # a constant output is a constant of that name
                self.graph.add_constant(out, self.graph.constants[src])
                continue
            # An input, or an output twice: a copy (eliminate-identity keeps these).
            self.graph.values[out] = replace(self.graph.values[src], name=out)
            node_name = self.graph.unique_name(f"Identity_{out}")
            self.graph.add_node(Node(node_name, "Identity", [src], [out]))
        self.graph.outputs = names


def _key(node: torch.fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target)


def _evaluate(node: torch.fx.Node, folded: dict[str, Any]) -> Any:
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: folded[n.name])
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _rename(graph: Graph, old: str, new: str) -> None:
    """Make the node producing ``old`` produce ``new`` instead, consumers rewired."""
    prod = graph.producer(old)
    graph.remove_node(prod.name)
    prod.outputs = [new if o == old else o for o in prod.outputs]
    graph.values[new] = replace(graph.values.pop(old), name=new)
    graph.add_node(prod)
    graph.replace_uses(old, new)


# --- converters: one function per ATen op family ----------------------------------------
Convert = Callable[[_Importer, torch.fx.Node], Any]


def _getitem(imp: _Importer, node: torch.fx.Node):
    src, index = node.args
    if src.name in imp.poisoned:
        raise _Poisoned
    items = imp.env[src.name]
    item = items[index]
    if item is None:
        raise _Refuse(f"output {index} of {src.name!r} is not supported")
    return item


def _alias(imp: _Importer, node: torch.fx.Node):
    return imp.value(node.args[0])


def _to_copy(imp: _Importer, node: torch.fx.Node):
    return imp.cast(imp.value(node.args[0]), _dtype(node.meta["val"].dtype))


def _dropout(imp: _Importer, node: torch.fx.Node):
    if _arg(node, 2, "train", False) and float(_arg(node, 1, "p", 0.0)) > 0:
        raise _Refuse("training-mode dropout is not supported")
    return imp.value(node.args[0])


def _unary(op: str, **attrs: Any) -> Convert:
    def convert(imp: _Importer, node: torch.fx.Node):
        return imp.out(node, op, [imp.value(node.args[0])], dict(attrs))

    return convert


def _binary(op: str, swap: bool = False) -> Convert:
    """``a op b`` (or ``b op a``) with torch's ``alpha`` and type promotion made explicit."""

    def convert(imp: _Importer, node: torch.fx.Node):
        dtype = _dtype(node.meta["val"].dtype)
        if _arg(node, 2, "rounding_mode") is not None:
            raise _Refuse("division with a rounding mode is not supported")
        a, b = node.args[0], node.args[1]
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            if isinstance(b, torch.fx.Node):
                b_val = imp.value(b, dtype)
                b_val = imp.emit(
                    "Mul", [b_val, imp.value(alpha, dtype)], imp.shape(b_val), dtype, tag="alpha"
                )
            else:
                b_val = imp.value(b * alpha, dtype)
        else:
            b_val = imp.value(b, dtype)
        a_val = imp.value(a, dtype)
        inputs = [b_val, a_val] if swap else [a_val, b_val]
        return imp.out(node, op, inputs)

    return convert


def _clamp(imp: _Importer, node: torch.fx.Node, lo: Any = None, hi: Any = None):
    dtype = _dtype(node.meta["val"].dtype)
    bounds = ["" if v is None else imp.value(v, dtype) for v in (lo, hi)]
    while bounds and not bounds[-1]:
        bounds.pop()
    return imp.out(node, "Clip", [imp.value(node.args[0], dtype)] + bounds)


def _clamp_op(imp: _Importer, node: torch.fx.Node):
    lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
        raise _Refuse("tensor bounds are not supported")
    return _clamp(imp, node, lo, hi)


def _hardtanh(imp: _Importer, node: torch.fx.Node):
    return _clamp(imp, node, _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0))


def _relu6(imp: _Importer, node: torch.fx.Node):
    return _clamp(imp, node, 0.0, 6.0)


def _gelu(imp: _Importer, node: torch.fx.Node):
    approximate = node.kwargs.get("approximate", _arg(node, 1, "approximate", "none"))
    return imp.out(node, "Gelu", [imp.value(node.args[0])], {"approximate": approximate})


def _leaky_relu(imp: _Importer, node: torch.fx.Node):
    slope = float(_arg(node, 1, "negative_slope", 0.01))
    return imp.out(node, "LeakyRelu", [imp.value(node.args[0])], {"alpha": slope})


def _silu(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    sig = imp.emit("Sigmoid", [x], imp.shape(x), imp.dtype(x), tag=f"{node.name}_sigmoid")
    return imp.out(node, "Mul", [x, sig])


def _rsqrt(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    root = imp.emit("Sqrt", [x], imp.shape(x), imp.dtype(x), tag=f"{node.name}_sqrt")
    return imp.out(node, "Reciprocal", [root])


def _convolution(imp: _Importer, node: torch.fx.Node):
    x, w, b, stride, padding, dilation, transposed, _output_padding, groups = node.args[:9]
    if transposed:
        raise _Refuse("transposed convolution is not supported")
    n = len(imp.shape(imp.value(x))) - 2
    if n not in (1, 2):
        raise _Refuse(f"{n}-D convolution is not supported (only 1-D and 2-D)")
    weight = imp.value(w)
    pads = _ints(padding, n)
    attrs = {
        "kernel_shape": list(imp.shape(weight)[2:]),
        "strides": _ints(stride, n),
        "pads": pads + pads,
        "dilations": _ints(dilation, n),
        "group": int(groups),
    }
    inputs = [imp.value(x), weight] + ([imp.value(b)] if b is not None else [])
    return imp.out(node, "Conv", inputs, attrs)


def _batch_norm(imp: _Importer, node: torch.fx.Node):
    x, weight, bias, mean, var, _momentum, eps = node.args[:7]
    channels = imp.shape(imp.value(x))[1]
    dtype = _dtype(node.meta["val"][0].dtype)
    scale = imp.value(weight) if weight is not None else imp.const(np.ones(channels, dtype), "one")
    shift = imp.value(bias) if bias is not None else imp.const(np.zeros(channels, dtype), "zero")
    out = imp.emit(
        "BatchNormalization",
        [imp.value(x), scale, shift, imp.value(mean), imp.value(var)],
        node.meta["val"][0].shape,
        dtype,
        {"epsilon": float(eps)},
        tag=node.name,
    )
    return [out, None, None]


def _pool_attrs(node: torch.fx.Node, n: int) -> dict:
    kernel = _ints(node.args[1], n)
    stride = _arg(node, 2, "stride", [])
    pads = _ints(_arg(node, 3, "padding", 0), n)
    return {
        "kernel_shape": kernel,
        "strides": _ints(stride, n) if stride else kernel,
        "pads": pads + pads,
    }


def _max_pool(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    n = len(imp.shape(x)) - 2
    attrs = _pool_attrs(node, n)
    attrs["dilations"] = _ints(_arg(node, 4, "dilation", 1), n)
    attrs["ceil_mode"] = int(bool(_arg(node, 5, "ceil_mode", False)))
    val = node.meta["val"][0]
    return [imp.emit("MaxPool", [x], val.shape, _dtype(val.dtype), attrs, tag=node.name), None]


def _avg_pool(imp: _Importer, node: torch.fx.Node):
    if _arg(node, 6, "divisor_override") is not None:
        raise _Refuse("divisor_override is not supported")
    x = imp.value(node.args[0])
    attrs = _pool_attrs(node, len(imp.shape(x)) - 2)
    attrs["ceil_mode"] = int(bool(_arg(node, 4, "ceil_mode", False)))
    attrs["count_include_pad"] = int(bool(_arg(node, 5, "count_include_pad", True)))
    return imp.out(node, "AveragePool", [x], attrs)


def _adaptive_pool(op: str, with_indices: bool) -> Convert:
    """Adaptive pooling to 1x1 (global) or to sizes that divide the input (fixed windows)."""

    def convert(imp: _Importer, node: torch.fx.Node):
        x = imp.value(node.args[0])
        in_sp = imp.shape(x)[2:]
        out_sp = _ints(node.args[1], len(in_sp))
        val = node.meta["val"][0] if with_indices else node.meta["val"]
        dtype = _dtype(val.dtype)
        if all(o == 1 for o in out_sp):
            out = imp.emit(f"Global{op}", [x], val.shape, dtype, tag=node.name)
        elif all(i % o == 0 for i, o in zip(in_sp, out_sp, strict=True)):
            kernel = [i // o for i, o in zip(in_sp, out_sp, strict=True)]
            attrs = {"kernel_shape": kernel, "strides": kernel}
            out = imp.emit(op, [x], val.shape, dtype, attrs, tag=node.name)
        else:
            raise _Refuse(
                f"adaptive pooling from {tuple(in_sp)} to {tuple(out_sp)}: only output sizes "
                "that divide the input are supported"
            )
        return [out, None] if with_indices else out

    return convert


def _linear(imp: _Importer, node: torch.fx.Node):
    x, w = imp.value(node.args[0]), imp.value(node.args[1])
    b = _arg(node, 2, "bias")
    if len(imp.shape(x)) == 2:
        inputs = [x, w] + ([imp.value(b)] if b is not None else [])
        return imp.out(node, "Gemm", inputs, {"transB": 1})
    wt = imp.transpose(w, [1, 0], tag=f"{node.name}_wt")
    if b is None:
        return imp.out(node, "MatMul", [x, wt])
    val = node.meta["val"]
    mm = imp.emit("MatMul", [x, wt], val.shape, _dtype(val.dtype), tag=f"{node.name}_mm")
    return imp.out(node, "Add", [mm, imp.value(b)])


def _addmm(imp: _Importer, node: torch.fx.Node):
    bias, a, b = (imp.value(v) for v in node.args[:3])
    attrs = {
        "beta": float(node.kwargs.get("beta", 1.0)),
        "alpha": float(node.kwargs.get("alpha", 1.0)),
    }
    return imp.out(node, "Gemm", [a, b, bias], attrs)


def _matmul(imp: _Importer, node: torch.fx.Node):
    return imp.out(node, "MatMul", [imp.value(node.args[0]), imp.value(node.args[1])])


def _reshape(imp: _Importer, node: torch.fx.Node):
    """view / reshape / squeeze / unsqueeze / flatten: the result's shape is static."""
    x = imp.value(node.args[0])
    shape = tuple(int(d) for d in node.meta["val"].shape)
    if imp.shape(x) == shape:
        return x
    return imp.out(node, "Reshape", [x, imp.ints(shape)])


def _expand(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    val = node.meta["val"]
    shape = tuple(int(d) for d in val.shape)
    if imp.shape(x) == shape:
        return x
    dtype = _dtype(val.dtype)
    if dtype == "bool":
        raise _Refuse("expanding a bool tensor is not supported")
    # Broadcasting against zeros is Expand in ops that lower (Expand itself does not).
    return imp.out(node, "Add", [x, imp.const(np.zeros(shape, dtype), "zeros")])


def _permute(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    rank = len(imp.shape(x))
    perm = [int(p) % rank for p in node.args[1]]
    return imp.out(node, "Transpose", [x], {"perm": perm})


def _transpose(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    rank = len(imp.shape(x))
    perm = list(range(rank))
    if rank >= 2:
        d0, d1 = (int(_arg(node, 1, "dim0", 0)) % rank, int(_arg(node, 2, "dim1", 1)) % rank)
        if node.target == torch.ops.aten.t.default:
            d0, d1 = 0, rank - 1
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return imp.out(node, "Transpose", [x], {"perm": perm})


def _cat(imp: _Importer, node: torch.fx.Node):
    val = node.meta["val"]
    dim = int(_arg(node, 1, "dim", 0)) % val.dim()
    dtype = _dtype(val.dtype)
    parts = [imp.value(t, dtype) for t in node.args[0]]
    parts = [p for p in parts if np.prod(imp.shape(p)) > 0]  # torch skips empty tensors
    if len(parts) == 1:
        return parts[0]
    return imp.out(node, "Concat", parts, {"axis": dim})


def _stack(imp: _Importer, node: torch.fx.Node):
    val = node.meta["val"]
    dim = int(_arg(node, 1, "dim", 0)) % val.dim()
    parts = []
    for t in node.args[0]:
        x = imp.value(t)
        shape = list(imp.shape(x))
        parts.append(imp.reshape(x, shape[:dim] + [1] + shape[dim:], tag=f"{node.name}_part"))
    return imp.out(node, "Concat", parts, {"axis": dim})


def _embedding(imp: _Importer, node: torch.fx.Node):
    weight, indices = imp.value(node.args[0]), imp.value(node.args[1])
    return imp.out(node, "Gather", [weight, indices], {"axis": 0})


def _index_select(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    dim = int(node.args[1]) % len(imp.shape(x))
    return imp.out(node, "Gather", [x, imp.value(node.args[2])], {"axis": dim})


def _index(imp: _Importer, node: torch.fx.Node):
    """``x[..., idx]`` with one integer index tensor: a Gather on its axis."""
    x = imp.value(node.args[0])
    indices = list(node.args[1])
    given = [i for i, t in enumerate(indices) if t is not None]
    if len(given) != 1:
        raise _Refuse("indexing with several index tensors is not supported")
    idx_node = indices[given[0]]
    if idx_node.meta["val"].dtype == torch.bool:
        raise _Refuse("boolean mask indexing is not supported")
    return imp.out(node, "Gather", [x, imp.value(idx_node)], {"axis": given[0]})


def _select(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    shape = imp.shape(x)
    dim = int(node.args[1]) % len(shape)
    index = int(node.args[2]) % shape[dim]
    scalar = imp.const(np.array(index, np.int64), "index")
    return imp.out(node, "Gather", [x, scalar], {"axis": dim})


def _slice(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    shape = imp.shape(x)
    dim = int(_arg(node, 1, "dim", 0)) % len(shape)
    start, end = _arg(node, 2, "start"), _arg(node, 3, "end")
    step = int(_arg(node, 4, "step", 1))
    picked = range(*slice(start, end, step).indices(shape[dim]))
    if picked == range(shape[dim]):
        return x
    if not picked:
        raise _Refuse("an empty slice is not supported")
    # Bounds are normalised here, so the graph never holds torch's INT64_MAX "to the end".
    bounds = [imp.ints([v]) for v in (picked.start, picked.stop, dim, step)]
    return imp.out(node, "Slice", [x] + bounds)


def _flip(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    shape = imp.shape(x)
    dims = sorted({int(d) % len(shape) for d in node.args[1]})
    starts = [shape[d] - 1 for d in dims]
    ends = [_INT64_MIN] * len(dims)
    bounds = [imp.ints(v) for v in (starts, ends, dims, [-1] * len(dims))]
    return imp.out(node, "Slice", [x] + bounds)


def _split(imp: _Importer, node: torch.fx.Node):
    """split / split_with_sizes / unbind: one Slice (or Gather) per piece."""
    x = imp.value(node.args[0])
    shape = imp.shape(x)
    dtype = imp.dtype(x)
    key = str(node.target)
    if key.startswith("aten.unbind"):
        dim = int(_arg(node, 1, "dim", 0)) % len(shape)
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
    dim = int(_arg(node, 2, "dim", 0)) % len(shape)
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


def _reduce(op: str) -> Convert:
    def convert(imp: _Importer, node: torch.fx.Node):
        val = node.meta["val"]
        x = imp.value(node.args[0], _dtype(val.dtype))
        rank = len(imp.shape(x))
        dims = _arg(node, 1, "dim")
        if isinstance(dims, int):
            dims = [dims]
        dims = list(range(rank)) if not dims else sorted(int(d) % rank for d in dims)
        keep = bool(_arg(node, 2, "keepdim", False))
        attrs = {"keepdims": int(keep)}
        return imp.out(node, op, [x, imp.ints(dims, "axes")], attrs)

    return convert


def _softmax(op: str) -> Convert:
    def convert(imp: _Importer, node: torch.fx.Node):
        x = imp.value(node.args[0])
        axis = int(node.args[1]) % max(len(imp.shape(x)), 1)
        return imp.out(node, op, [x], {"axis": axis})

    return convert


def _pad(imp: _Importer, node: torch.fx.Node):
    x = imp.value(node.args[0])
    rank = len(imp.shape(x))
    pad = [int(p) for p in node.args[1]]
    if any(p < 0 for p in pad):
        raise _Refuse("negative padding (cropping) is not supported")
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):  # torch lists the last dim first
        begin[rank - 1 - i], end[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    value = float(_arg(node, 2, "value", 0.0))
    dtype = imp.dtype(x)
    fill = imp.const(np.array(value, dtype), "pad_value")
    return imp.out(node, "Pad", [x, imp.ints(begin + end, "pads"), fill])


# --- recurrent layers -------------------------------------------------------------------
# aten name -> (ONNX op, torch gate blocks in ONNX order, activation for every direction)
_RECURRENT: dict[str, tuple[str, list[int], str | None]] = {
    "aten.lstm.input": ("LSTM", [0, 3, 1, 2], None),  # i f g o -> i o f c
    "aten.gru.input": ("GRU", [1, 0, 2], None),  # r z n -> z r h
    "aten.rnn_tanh.input": ("RNN", [0], "Tanh"),
    "aten.rnn_relu.input": ("RNN", [0], "Relu"),
}


def _gates(w: np.ndarray, order: list[int]) -> np.ndarray:
    blocks = np.split(w, len(order), axis=0)
    return np.concatenate([blocks[k] for k in order], axis=0)


def _recurrent(imp: _Importer, node: torch.fx.Node):
    """A torch LSTM/GRU/RNN call: one ONNX node per layer, both directions in each.

    Batch-first input uses ONNX ``layout=1``, so neither layout transposes the sequence;
    states stay in torch's ``[layers*dirs, batch, hidden]`` outside the nodes.
    """
    op, order, act = _RECURRENT[str(node.target)]
    x, hx, params, has_biases, layers, dropout, train, bidir, batch_first = node.args[:9]
    layers, dirs = int(layers), 2 if bidir else 1
    if train and float(dropout) > 0 and layers > 1:
        raise _Refuse("training-mode dropout between layers is not supported")
    per_dir = 4 if has_biases else 2
    if len(params) != layers * dirs * per_dir:
        raise _Refuse("LSTM projections (proj_size > 0) are not supported")
    if not all(imp.is_const(p) for p in params):
        raise _Refuse("recurrent weights must be parameters or constants")
    states = list(hx) if op == "LSTM" else [hx]
    layout = int(bool(batch_first))
    used = {u.args[1] for u in node.users if u.target is operator.getitem}
    xv = imp.value(x)
    dtype = imp.dtype(xv)
    seq, batch = (imp.shape(xv)[1], imp.shape(xv)[0]) if layout else imp.shape(xv)[:2]
    w_hh0 = imp.constant(params[1])
    hidden = w_hh0.shape[1]
    finals: list[list[str]] = [[] for _ in states]  # per state: [dirs, batch, H] per layer
    for layer in range(layers):
        chunk = [imp.constant(p) for p in params[layer * dirs * per_dir :][: dirs * per_dir]]
        ws = [chunk[d * per_dir : (d + 1) * per_dir] for d in range(dirs)]
        w = np.stack([_gates(p[0], order) for p in ws])
        r = np.stack([_gates(p[1], order) for p in ws])
        tag = f"{node.name}_l{layer}"
        inputs = [xv, imp.const(w, f"{tag}_W"), imp.const(r, f"{tag}_R")]
        if has_biases:
            b = np.stack([np.concatenate([_gates(p[2], order), _gates(p[3], order)]) for p in ws])
            inputs.append(imp.const(b, f"{tag}_B"))
        else:
            inputs.append("")
        inputs.append("")  # sequence_lens: every sequence is full length
        for s in states:
            inputs.append(_layer_state(imp, s, layer, dirs, layout, f"{tag}_init"))
        while inputs and not inputs[-1]:
            inputs.pop()
        attrs = {"hidden_size": hidden, "layout": layout}
        if bidir:
            attrs["direction"] = "bidirectional"
        if act is not None:
            attrs["activations"] = [act] * dirs
        if op == "GRU":
            attrs["linear_before_reset"] = 1
        y_shape = (batch, seq, dirs, hidden) if layout else (seq, dirs, batch, hidden)
        s_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
        last = layer == layers - 1
        outs = [imp.graph.unique_name(f"{tag}_Y") if (not last or 0 in used) else ""]
        for k in range(len(states)):
            outs.append(imp.graph.unique_name(f"{tag}_Y{'hc'[k]}") if k + 1 in used else "")
        while outs and not outs[-1]:
            outs.pop()
        for name, shape in zip(outs, [y_shape] + [s_shape] * len(states), strict=False):
            if name:
                imp.graph.values[name] = Value(name, shape, dtype)
        imp.graph.add_node(Node(imp.graph.unique_name(f"{op}_{tag}"), op, inputs, outs, attrs))
        for k, name in enumerate(outs[1:]):
            if name:
                finals[k].append(imp.transpose(name, [1, 0, 2] if layout else [0, 1, 2], tag))
        if outs and outs[0]:
            if layout:  # [batch, seq, dirs, H] -> [batch, seq, dirs*H]
                xv = imp.reshape(outs[0], (batch, seq, dirs * hidden), f"{tag}_out")
            else:  # [seq, dirs, batch, H] -> [seq, batch, dirs*H]
                y = imp.transpose(outs[0], [0, 2, 1, 3], f"{tag}_Yt")
                xv = imp.reshape(y, (seq, batch, dirs * hidden), f"{tag}_out")
    results: list[str | None] = [xv if 0 in used else None]
    for k, per_layer in enumerate(finals):
        if k + 1 not in used:
            results.append(None)
        elif len(per_layer) == 1:
            results.append(per_layer[0])
        else:
            shape = (layers * dirs, batch, hidden)
            results.append(
                imp.emit("Concat", per_layer, shape, dtype, {"axis": 0}, tag=f"{node.name}_h")
            )
    return results


def _layer_state(
    imp: _Importer, state: torch.fx.Node, layer: int, dirs: int, layout: int, tag: str
) -> str:
    """This layer's slice of a torch initial state, in the node's layout ("" for zeros)."""
    if imp.is_const(state):
        array = imp.constant(state)[layer * dirs : (layer + 1) * dirs]
        if not np.any(array):
            return ""
        return imp.const(array.transpose(1, 0, 2) if layout else array, tag)
    s = imp.value(state)
    shape = imp.shape(s)
    if shape[0] != dirs:
        bounds = [imp.ints([v]) for v in (layer * dirs, (layer + 1) * dirs, 0)]
        s = imp.emit("Slice", [s] + bounds, (dirs,) + shape[1:], imp.dtype(s), tag=tag)
    return imp.transpose(s, [1, 0, 2], tag) if layout else s


# The table: ATen overload name -> converter. Everything else is refused, with its source.
ATEN: dict[str, Convert] = {
    "getitem": _getitem,
    **dict.fromkeys(_ALIASES, _alias),
    "aten._to_copy.default": _to_copy,
    "aten.dropout.default": _dropout,
    "aten.convolution.default": _convolution,
    "aten._native_batch_norm_legit_no_training.default": _batch_norm,
    "aten.max_pool2d_with_indices.default": _max_pool,
    "aten.avg_pool2d.default": _avg_pool,
    "aten._adaptive_avg_pool2d.default": _adaptive_pool("AveragePool", False),
    "aten.adaptive_max_pool2d.default": _adaptive_pool("MaxPool", True),
    "aten.linear.default": _linear,
    "aten.addmm.default": _addmm,
    "aten.mm.default": _matmul,
    "aten.bmm.default": _matmul,
    "aten.matmul.default": _matmul,
    "aten.relu.default": _unary("Relu"),
    "aten.sigmoid.default": _unary("Sigmoid"),
    "aten.tanh.default": _unary("Tanh"),
    "aten.exp.default": _unary("Exp"),
    "aten.log.default": _unary("Log"),
    "aten.sqrt.default": _unary("Sqrt"),
    "aten.neg.default": _unary("Neg"),
    "aten.abs.default": _unary("Abs"),
    "aten.erf.default": _unary("Erf"),
    "aten.reciprocal.default": _unary("Reciprocal"),
    "aten.hardsigmoid.default": _unary("HardSigmoid", alpha=1 / 6, beta=0.5),
    "aten.hardswish.default": _unary("HardSwish"),
    "aten.rsqrt.default": _rsqrt,
    "aten.silu.default": _silu,
    "aten.gelu.default": _gelu,
    "aten.leaky_relu.default": _leaky_relu,
    "aten.hardtanh.default": _hardtanh,
    "aten.relu6.default": _relu6,
    "aten.clamp.default": _clamp_op,
    "aten.add.Tensor": _binary("Add"),
    "aten.add.Scalar": _binary("Add"),
    "aten.sub.Tensor": _binary("Sub"),
    "aten.sub.Scalar": _binary("Sub"),
    "aten.rsub.Scalar": _binary("Sub", swap=True),
    "aten.rsub.Tensor": _binary("Sub", swap=True),
    "aten.mul.Tensor": _binary("Mul"),
    "aten.mul.Scalar": _binary("Mul"),
    "aten.div.Tensor": _binary("Div"),
    "aten.div.Scalar": _binary("Div"),
    "aten.div.Tensor_mode": _binary("Div"),
    "aten.pow.Tensor_Scalar": _binary("Pow"),
    "aten.pow.Tensor_Tensor": _binary("Pow"),
    "aten.maximum.default": _binary("Max"),
    "aten.minimum.default": _binary("Min"),
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
    "aten.mean.dim": _reduce("ReduceMean"),
    "aten.mean.default": _reduce("ReduceMean"),
    "aten.sum.dim_IntList": _reduce("ReduceSum"),
    "aten.sum.default": _reduce("ReduceSum"),
    "aten.amax.default": _reduce("ReduceMax"),
    "aten._softmax.default": _softmax("Softmax"),
    "aten._log_softmax.default": _softmax("LogSoftmax"),
    "aten.constant_pad_nd.default": _pad,
    **dict.fromkeys(_RECURRENT, _recurrent),
}


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
