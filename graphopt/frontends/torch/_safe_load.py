"""Reading ``.pt2`` files without running code from them: the guard around torch's loader.

Security-critical. ``torch.export.load`` runs code from the file it reads along several
paths (listed below); :func:`load_untrusted` reads an untrusted file with every one of
them closed: the archive is screened before torch sees it (:func:`_screen`), torch's
loader runs under :class:`Guard`, and the graph it returns may call only torch operators
and shape arithmetic (:func:`_check_calls`). What cannot be read that way is refused with
one :class:`TorchImportError` line that names what would have run.

torch's archive and serialisation modules are imported inside the functions that use
them: importing them takes seconds, and only reading a ``.pt2`` file needs them.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import io
import math
import operator
import pickle
import re
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from graphopt.frontends.torch._quiet import TORCH_LOCK, TorchImportError, first_line, quiet

__all__ = ["TRUST_HINT", "Guard", "Refused", "load_untrusted", "plain_sym_expr"]

# torch.export.load runs code from the file it reads along several paths: payloads it
# unpickles (weights and constants marked use_pickle, sample inputs, opaque and TorchScript
# objects), AOTInductor shared libraries, shape expressions given to sympy (which evaluates
# strings as Python), modules the pytree decoder imports by name, and any function
# reachable from torch/math/operator as a graph node, which graphopt then runs. Its own
# sanity checks stop none of them, so a file that is not trusted is read under Guard.
TRUST_HINT = "pass trust_pickle=True (CLI: --trust-pickle) only for a file you trust"
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


class Refused(Exception):
    """Raised inside torch's loader by :class:`Guard`: this step would run file code."""


def _refusal(path: Path, what: str) -> str:
    return f"{path}: refused {what}: loading it could run code from the file; {TRUST_HINT}"


def load_untrusted(path: Path, data: bytes) -> tuple[ExportedProgram, str | None]:
    """Read ``data`` (the bytes of ``path``) with no code from it run.

    Returns the program and, when its sample inputs were skipped, why.
    """
    from torch.export.pt2_archive._package import load_pt2 as read_archive

    skip, skipped = _screen(path, data)
    program = None
    with TORCH_LOCK, Guard(skip) as guard:
        try:  # read_archive, not torch.export.load: no fallback to the legacy format
            with quiet():
                program = read_archive(io.BytesIO(data)).exported_programs.get("model")
        except Exception as exc:
            if guard.refused is None:
                raise TorchImportError(
                    f"{path} is not a readable torch.export file: {first_line(exc)}"
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
            f"{path} is not a readable torch.export file: {first_line(exc)}"
        ) from None
    return skip, why


def _needing(exc: BaseException) -> str:
    """`` needing mod.name``: the global that ``weights_only`` unpickling refused, if named."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f" needing {match[1]}" if match else ""


class Guard:
    """Patches torch's loader so that, in this thread, it cannot run code from the file.

    While active: ``torch.load`` unpickles with ``weights_only=True`` whatever it is asked;
    ``pickle.loads``/``load``, TorchScript object unpickling and AOTInductor library
    loading are refused; sympy reads only plain shape expressions (:func:`plain_sym_expr`);
    modules are imported by name only if already imported or part of torch; the records
    in ``skip`` read as empty. A refusal is kept in ``refused`` (torch wraps some errors
    in its own, or retries) and raised as :class:`Refused`. Other threads get the
    original functions; the caller holds ``TORCH_LOCK`` so that guards never stack; every
    patch is undone on exit, whatever happened.
    """

    def __init__(self, skip: set[str]) -> None:
        self.skip = skip
        self.refused: str | None = None
        self._thread = threading.get_ident()
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Guard:
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

    def _refused(self, what: str) -> Refused:
        self.refused = self.refused or what
        return Refused(what)

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
        if not plain_sym_expr(expr_str, names):
            raise self._refused(f"a shape expression sympy would run as Python: {expr_str[:60]!r}")
        return original(deserializer, expr_str, *args, **kwargs)

    def _import_module(self, original: Callable, name: str, package: str | None = None) -> Any:
        full = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        if full not in sys.modules and full.partition(".")[0] != "torch":
            raise self._refused(f"an import of module {full!r}")
        return original(name, package)


def plain_sym_expr(text: str, names: dict[str, Any]) -> bool:
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
