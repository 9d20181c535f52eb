"""The house stays one-way: import rules of docs/architecture.md, computed from the code.

Every ``import`` in graphopt's modules is read with ``ast`` (module level and inside
functions alike, so a function-local import cannot hide a backwards arrow) and the
rules below are checked on that graph. A module importing its own package is not an
edge: Python has already started that package's ``__init__`` when it gets there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "graphopt"

# Layers, lowest first: a module may import its own layer and the ones below it.
LAYERS = [
    {"graphopt.errors", "graphopt._version"},
    {"graphopt.ir", "graphopt.ir_builder", "graphopt.verify"},
    {"graphopt.frontends", "graphopt.passes"},
    {"graphopt.lower", "graphopt.zoo", "graphopt.zoo_torch", "graphopt.zoo_trained"},
    {"graphopt.targets"},
    {"graphopt.prepare", "graphopt.artifact"},
    {"graphopt.tuning"},
    {"graphopt.compiler", "graphopt.profiling", "graphopt.evaluation"},
    {"graphopt.cli", "graphopt.__main__", "graphopt.backend"},
]
TVM_USERS = ("graphopt.lower", "graphopt.targets", "graphopt.tuning")
MAX_LOCAL_IMPORTS = 10  # lazy imports of heavy optional parts (torch, MetaSchedule) only


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports() -> list[tuple[str, list[str], bool]]:
    """``(importer, imported names, inside a function)`` for every import statement."""
    found = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        local = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]  # _owner finds the module
            else:
                continue
            found.append((mod, names, id(node) in local))
    return found


IMPORTS = _imports()


def _owner(name: str) -> str | None:
    """The graphopt module an imported name lives in (a name may be a function)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for mod, names, _local in IMPORTS:
        for name in names:
            target = _owner(name) if name.startswith("graphopt") else None
            if target and target != mod and not mod.startswith(target + "."):
                g.add_edge(mod, target)
    return g


def _layer(mod: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(mod == top or mod.startswith(top + ".") for top in layer):
            return i
    raise AssertionError(f"{mod} is in no layer of tests/test_architecture.py: add it")


def test_no_import_cycles():
    cycles = sorted(nx.simple_cycles(_graph()), key=len)
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_imports_run_downwards_only():
    upward = [
        f"{a} -> {b}"
        for a, b in _graph().edges
        if a != "graphopt" and b != "graphopt" and _layer(b) > _layer(a)
    ]
    assert not upward, upward


def test_only_the_cli_imports_the_package_facade():
    users = sorted(
        {
            m
            for m, names, _ in IMPORTS
            if m != "graphopt.cli" and any(_owner(n) == "graphopt" for n in names)
        }
    )
    assert users == [], users


@pytest.mark.parametrize("lower", ["graphopt.ir", "graphopt.passes", "graphopt.frontends"])
def test_only_lower_targets_and_tuning_import_tvm(lower):
    users = sorted(
        {
            m
            for m, names, _ in IMPORTS
            if any(n.split(".")[0] in ("tvm", "tvm_ffi") for n in names)
            and not m.startswith(TVM_USERS)
        }
    )
    assert users == [], f"{users} import tvm"
    assert any(m.startswith(lower) for m in MODULES)


def test_targets_never_import_tuning_or_the_layers_above():
    bad = [
        f"{a} -> {b}"
        for a, b in _graph().edges
        if a.startswith("graphopt.targets") and _layer(b) > _layer("graphopt.targets")
    ]
    assert not bad, bad


def test_few_function_local_imports():
    local = sorted(
        f"{m}: {', '.join(names)}"
        for m, names, inside in IMPORTS
        if inside and names[0].startswith("graphopt")
    )
    assert len(local) <= MAX_LOCAL_IMPORTS, "\n".join(local)
