"""Pipelines as text, ordering by declared constraints, and user passes from plugins.

Pipeline text is xDSL-style: pass names separated by commas, options in braces::

    fold-constants{max-elements=1024},fold-batchnorm,my-rule{opt=3 flag=true}

Options are the pass's dataclass fields (``-`` and ``_`` are interchangeable) with
types int, float, bool (true/false) or str; several options are separated by spaces or
commas. :func:`build_pipeline` parses the text, drops disabled passes and orders the
rest by their ``after``/``before`` declarations with a topological sort (networkx) that
keeps the written order wherever the constraints allow: a pass that must run earlier
moves forward to just before the first pass that needs it.

User passes come from two places, never from import side effects:

- a plugin file (``--pass-plugin my_passes.py``) that defines ``PASSES``, a list of
  :class:`~graphopt.passes.Pass` subclasses, or a function ``graphopt_passes()`` that
  returns one;
- an installed package that declares an entry point in the group ``graphopt.passes``
  whose object is a Pass subclass, a list of them, or a function returning a list.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import typing
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

import networkx as nx

from graphopt.errors import GraphoptError, first_line
from graphopt.passes._base import Pass

__all__ = [
    "ENTRY_POINT_GROUP",
    "PipelineError",
    "PluginError",
    "parse_pipeline",
    "build_pipeline",
    "order_passes",
    "pipeline_text",
    "pass_options",
    "load_plugin",
    "entry_point_passes",
]

ENTRY_POINT_GROUP = "graphopt.passes"


class PipelineError(GraphoptError):
    """A malformed pipeline string, an unknown pass, or a bad option value."""


class PluginError(GraphoptError):
    """A pass plugin file or entry point that fails to load or defines no passes."""


# Passes renamed to say what they do; pipelines written with the old name keep working.
RENAMED = {"fuse-conv-act": "annotate-conv-groups"}


# --- options ------------------------------------------------------------------------

_TYPES = {int: "int", float: "float", bool: "bool", str: "str"}


def _unoptional(t):  # noqa: ANN001, ANN202
    """``X`` of ``X | None`` (an option whose None means "the target chooses"), else ``t``."""
    args = typing.get_args(t)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return t


def pass_options(cls: type[Pass]) -> list[tuple[str, str, object]]:
    """``(name, type, default)`` for each option of pass class ``cls``."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        t = _unoptional(hints.get(f.name, f.type))
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        found.append((f.name, _TYPES.get(t, getattr(t, "__name__", str(t))), default))
    return found


def _convert(pass_name: str, option: str, kind: str, text: str) -> object:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind == "str":
            return text
    except ValueError:
        pass
    else:
        raise PipelineError(
            f"pass {pass_name!r}: option {option!r} has type {kind}, which pipeline text cannot set"
        )
    raise PipelineError(f"pass {pass_name!r}: option {option!r} expects {kind}, got {text!r}")


def _instantiate(cls: type[Pass], options: dict[str, str]) -> Pass:
    known = {name: kind for name, kind, _ in pass_options(cls)}
    kwargs = {}
    for key, text in options.items():
        field_name = key.replace("-", "_")
        if field_name not in known:
            names = ", ".join(k.replace("_", "-") for k in known) or "none"
            raise PipelineError(f"pass {cls.name!r} has no option {key!r} (options: {names})")
        kwargs[field_name] = _convert(cls.name, key, known[field_name], text)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"pass {cls.name!r}: {exc}") from None


# --- text ---------------------------------------------------------------------------


def parse_pipeline(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"a,b{k=v}"`` -> ``[("a", {}), ("b", {"k": "v"})]``; raises :class:`PipelineError`."""
    items: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(text)

    def fail(why: str) -> PipelineError:
        return PipelineError(f"malformed pipeline {text!r}: {why} at column {i + 1}")

    def skip_space() -> None:
        nonlocal i
        while i < n and text[i].isspace():
            i += 1

    def word(stop: str) -> str:
        nonlocal i
        start = i
        while i < n and not text[i].isspace() and text[i] not in stop:
            i += 1
        return text[start:i]

    while True:
        skip_space()
        name = word(",{}=")
        if not name:
            raise fail("expected a pass name")
        options: dict[str, str] = {}
        skip_space()
        if i < n and text[i] == "{":
            i += 1
            while True:
                skip_space()
                if i < n and text[i] == "}":
                    i += 1
                    break
                key = word(",{}=")
                if not key or i >= n or text[i] != "=":
                    raise fail(f"expected key=value in the options of {name!r}")
                i += 1
                if i < n and text[i] in "\"'":
                    quote = text[i]
                    end = text.find(quote, i + 1)
                    if end < 0:
                        raise fail("unterminated quote")
                    value, i = text[i + 1 : end], end + 1
                else:
                    value = word(",{}=")
                if key in options:
                    raise fail(f"option {key!r} given twice")
                options[key] = value
                skip_space()
                if i < n and text[i] == ",":
                    i += 1
                elif i >= n:
                    raise fail(f"missing '}}' after the options of {name!r}")
        items.append((name, options))
        skip_space()
        if i >= n:
            return items
        if text[i] != ",":
            raise fail(f"expected ',' after {name!r}")
        i += 1


def pipeline_text(passes: Iterable[Pass]) -> str:
    """The pipeline text that rebuilds ``passes`` (options shown when not default)."""
    parts = []
    for p in passes:
        opts = []
        for name, _kind, default in pass_options(type(p)):
            value = getattr(p, name)
            if value != default:
                shown = str(value).lower() if isinstance(value, bool) else str(value)
                opts.append(f"{name.replace('_', '-')}={shown}")
        parts.append(p.name + (f"{{{' '.join(opts)}}}" if opts else ""))
    return ",".join(parts)


def order_passes(passes: Sequence[Pass]) -> list[Pass]:
    """``passes`` ordered by their ``after``/``before`` declarations, otherwise as given."""
    g = nx.DiGraph()
    g.add_nodes_from(range(len(passes)))
    for i, a in enumerate(passes):
        for j, b in enumerate(passes):
            if i != j and (b.name in a.before or a.name in b.after):
                g.add_edge(i, j)  # a runs before b
    try:
        # Placed from the end, latest-written first: a pass that must run earlier moves
        # forward to just before its first dependant; nothing else moves.
        order = list(nx.lexicographical_topological_sort(g.reverse(), key=lambda k: -k))[::-1]
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(passes[u].name for u, _ in nx.find_cycle(g))
        raise PipelineError(f"passes have contradicting ordering constraints: {cycle}") from None
    return [passes[k] for k in order]


def build_pipeline(
    text: str | Sequence[str] | None,
    registry: dict[str, type[Pass]],
    disable: Sequence[str] = (),
    default: Sequence[str] = (),
) -> list[Pass]:
    """Parse ``text`` (None: ``default``), drop ``disable``d passes, order by constraints."""
    items = (
        [(name, {}) for name in default]
        if text is None
        else parse_pipeline(text)
        if isinstance(text, str)
        else [(name, {}) for name in text]
    )
    items = [(RENAMED.get(name, name), options) for name, options in items]
    disable = [RENAMED.get(name, name) for name in disable]
    known = ", ".join(sorted(registry))
    for name in disable:
        if name not in registry:
            raise PipelineError(f"--disable-pass: unknown pass {name!r} (known passes: {known})")
    passes = []
    for name, options in items:
        if name not in registry:
            raise PipelineError(f"unknown pass {name!r} (known passes: {known})")
        if name not in disable:
            passes.append(_instantiate(registry[name], options))
    return order_passes(passes)


# --- plugins ------------------------------------------------------------------------


def _check_passes(found: object, where: str) -> list[type[Pass]]:
    if isinstance(found, type):
        found = [found]
    if not isinstance(found, list | tuple) or not found:
        raise PluginError(f"{where} defines no passes (expected a non-empty list of Pass classes)")
    for cls in found:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise PluginError(f"{where}: {cls!r} is not a subclass of graphopt.passes.Pass")
        if not cls.name:
            raise PluginError(f"{where}: pass class {cls.__name__} has no name")
        if "__dataclass_fields__" not in vars(cls):
            raise PluginError(f"{where}: pass {cls.name!r} is not a dataclass (@dataclass)")
    return list(found)


def load_plugin(path: str | Path) -> list[type[Pass]]:
    """The pass classes a plugin file defines (``PASSES`` or ``graphopt_passes()``)."""
    path = Path(path)
    where = f"pass plugin {str(path)!r}"
    if not path.is_file():
        raise PluginError(f"{where}: no such file")
    module_name = f"graphopt_plugin_{abs(hash(str(path.resolve())))}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{where}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve annotations through it
    try:
        spec.loader.exec_module(module)
        if hasattr(module, "graphopt_passes"):
            found = module.graphopt_passes()
        else:
            found = getattr(module, "PASSES", None)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        msg = first_line(exc, default="")
        raise PluginError(f"{where} failed to import: {type(exc).__name__}: {msg}") from exc
    if found is None:
        raise PluginError(f"{where} defines neither PASSES nor graphopt_passes()")
    return _check_passes(found, where)


def entry_point_passes() -> list[type[Pass]]:
    """Pass classes from installed packages' ``graphopt.passes`` entry points."""
    found: list[type[Pass]] = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r}"
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj = obj()
        except Exception as exc:
            msg = first_line(exc, default="")
            raise PluginError(f"{where} failed to load: {type(exc).__name__}: {msg}") from exc
        found += _check_passes(obj, where)
    return found


def merge_registry(
    builtin: dict[str, type[Pass]], extra: Iterable[tuple[str, type[Pass]]]
) -> dict[str, type[Pass]]:
    """``builtin`` plus user passes; a name used twice is an error naming both."""
    table = dict(builtin)
    origin = {name: "graphopt" for name in builtin}
    for where, cls in extra:
        if cls.name in table and table[cls.name] is not cls:
            raise PluginError(
                f"pass {cls.name!r} from {where} clashes with the pass of that name from "
                f"{origin[cls.name]}"
            )
        table[cls.name] = cls
        origin[cls.name] = where
    return table
