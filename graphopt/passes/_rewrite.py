"""The rewrite-rule engine: ``RewriteRule(pattern, replacement, check)``.

A pattern and its replacement are plain functions written in the same op syntax::

    def pattern(op, x):
        return op.Mul(x, op.Sigmoid(x))

    def replacement(op, x):
        return op.SiLU(x, _domain="graphopt")

``op.Name(*inputs, **attrs)`` records one ONNX node (``_domain=`` picks a domain,
``_outputs=n`` asks for several outputs in a replacement). The parameters after ``op``
are pattern variables: each binds one value of the graph, and a variable used twice must
bind the same value both times. In a pattern, attributes given must be equal; those not
given match anything. ``Add``, ``Mul``, ``Max``, ``Min`` and ``Sum`` (with two inputs)
match either input order.

Matching is subgraph monomorphism with networkx's ``DiGraphMatcher`` over the graph's
op nodes (``node_match`` compares op type, domain, arity and attributes), then a
binding step that checks input positions and variables. A match is then refused when a
value inside it (any output but the result's) has users outside it or is a graph
output. ``check(graph, match)`` returns a reason to decline, or None.

A replacement receives the bound value names as keyword arguments and returns the value
that takes the place of the pattern's result (possibly an existing one, such as ``x``).
Inputs may be value names or numpy arrays (added as constants). ``op.constant(array)``,
``op.value(name)`` (a constant's array, or None) and ``op.match`` are there for rules
that compute new weights. Before the graph changes, ONNX shape inference runs on the new
nodes: a replacement whose result has another shape or dtype than the value it replaces
is an error naming the pass and the rule.

Rule sets are plain lists; position is priority. :func:`apply_rules` applies every match
of the first rule, then of the second, and so on, and repeats until nothing fires.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx
import numpy as np
import onnx
from networkx.algorithms.isomorphism import DiGraphMatcher
from onnx import helper, numpy_helper, shape_inference

from graphopt.errors import first_line
from graphopt.ir import Graph, Node, Value
from graphopt.ir_builder import IRBuilder
from graphopt.passes._base import Pass, PassError, PassResult
from graphopt.passes._functions import attach_functions

__all__ = ["RewriteRule", "Match", "RewritePass", "apply_rules", "rewrite_pass"]

_log = logging.getLogger("graphopt.passes")

COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Sum"})


# --- patterns -----------------------------------------------------------------------


@dataclass(eq=False)
class _Var:
    name: str


@dataclass(eq=False)
class _POp:
    op_type: str
    domain: str
    inputs: list  # of _Var | _Out
    attrs: dict


@dataclass(eq=False)
class _Out:
    op: _POp
    index: int = 0


class _PatternBuilder:
    def __init__(self) -> None:
        self.ops: list[_POp] = []

    def __getattr__(self, op_type: str) -> Callable[..., _Out]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def record(*inputs: Any, _domain: str = "", **attrs: Any) -> _Out:
            for i in inputs:
                if not isinstance(i, _Var | _Out):
                    raise TypeError(
                        f"pattern input {i!r} of {op_type} is not a pattern variable or op output"
                        " (constants are tested in check)"
                    )
            pop = _POp(op_type, _norm_domain(_domain), list(inputs), attrs)
            self.ops.append(pop)
            return _Out(pop)

        return record


def _norm_domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


def _params(fn: Callable, what: str) -> list[str]:
    params = list(inspect.signature(fn).parameters)
    if not params:
        raise TypeError(f"{what} {fn.__name__} must take the op builder as first parameter")
    return params[1:]


@dataclass(frozen=True)
class _Pattern:
    variables: tuple[str, ...]
    ops: tuple[_POp, ...]  # root first, then the rest in a traversal order
    nx: nx.DiGraph


def _compile_pattern(fn: Callable) -> _Pattern:
    names = _params(fn, "pattern")
    builder = _PatternBuilder()
    variables = [_Var(n) for n in names]
    result = fn(builder, *variables)
    if not isinstance(result, _Out):
        raise TypeError(f"pattern {fn.__name__} must return an op output, got {result!r}")
    order: list[_POp] = []
    stack = [result.op]
    while stack:
        pop = stack.pop()
        if any(pop is o for o in order):
            continue
        order.append(pop)
        stack.extend(i.op for i in reversed(pop.inputs) if isinstance(i, _Out))
    unused = [p for p in builder.ops if not any(p is o for o in order)]
    if unused:
        raise TypeError(f"pattern {fn.__name__}: {unused[0].op_type} does not feed the result")
    used_vars = {i.name for p in order for i in p.inputs if isinstance(i, _Var)}
    if set(names) - used_vars:
        raise TypeError(
            f"pattern {fn.__name__}: variable(s) {sorted(set(names) - used_vars)} unused"
        )
    g = nx.DiGraph()
    for k, pop in enumerate(order):  # the root first: VF2 tries it against every node
        g.add_node(k, pop=pop)
    index = {id(p): k for k, p in enumerate(order)}
    for k, pop in enumerate(order):
        for i in pop.inputs:
            if isinstance(i, _Out):
                g.add_edge(index[id(i.op)], k)
    return _Pattern(tuple(names), tuple(order), g)


# --- matches ------------------------------------------------------------------------


@dataclass
class Match:
    """One place where a pattern matched: its nodes (root first) and variable bindings."""

    rule: RewriteRule
    nodes: list[Node]
    values: dict[str, str]

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def __getitem__(self, variable: str) -> str:
        return self.values[variable]

    def node(self, op_type: str, index: int = 0) -> Node:
        """The ``index``-th matched node of ``op_type`` (pattern order, root first)."""
        return [n for n in self.nodes if n.op_type == op_type][index]


def _n_inputs(node: Node) -> int:
    n = len(node.inputs)
    while n and not node.inputs[n - 1]:
        n -= 1
    return n


def _attr_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bytes):
        a = a.decode()
    if isinstance(b, bytes):
        b = b.decode()
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.isclose(a, b, rtol=1e-6, atol=0))
    return a == b


def _node_match(target: dict, pattern: dict) -> bool:
    node: Node = target["node"]
    pop: _POp = pattern["pop"]
    return (
        node.op_type == pop.op_type
        and _norm_domain(node.domain) == pop.domain
        and _n_inputs(node) == len(pop.inputs)
        and all(k in node.attrs and _attr_equal(node.attrs[k], v) for k, v in pop.attrs.items())
    )


def _bind(pattern: _Pattern, nodes: list[Node]) -> dict[str, str] | None:
    """Variable bindings that make ``nodes`` (pattern order) an exact match, or None."""
    slot = {id(p): n for p, n in zip(pattern.ops, nodes, strict=True)}
    choices = []
    for pop in pattern.ops:
        orders = [list(pop.inputs)]
        if pop.op_type in COMMUTATIVE and len(pop.inputs) == 2:
            orders.append(list(reversed(pop.inputs)))
        choices.append(orders)
    for combo in itertools.product(*choices):
        bound: dict[str, str] = {}
        ok = True
        for pop, inputs in zip(pattern.ops, combo, strict=True):
            node = slot[id(pop)]
            for want, have in zip(inputs, node.inputs, strict=False):
                if isinstance(want, _Out):
                    producer = slot[id(want.op)]
                    if want.index >= len(producer.outputs) or producer.outputs[want.index] != have:
                        ok = False
                elif bound.setdefault(want.name, have) != have:
                    ok = False
                if not ok:
                    break
            if not ok:
                break
        if ok:
            return bound
    return None


def _users(graph: Graph, value: str) -> list[str]:
    """Names of the nodes that read ``value`` (through networkx edges: O(degree))."""
    producer = graph.producer(value)
    if producer is None:
        return [n.name for n in graph.consumers(value)]
    g = graph.nx_graph
    return [s for s in g.successors(producer.name) if value in g.nodes[s]["node"].inputs]


def _rewire(graph: Graph, old: str, new: str, users: list[str]) -> None:
    """``graph.replace_uses(old, new)`` for the known ``users`` of ``old``."""
    for user in users:
        node = graph.node(user)
        graph.set_inputs(user, [new if i == old else i for i in node.inputs])
    graph.outputs = [new if o == old else o for o in graph.outputs]


def _self_contained(graph: Graph, nodes: list[Node]) -> bool:
    """Only the root's first output may be seen outside the matched nodes."""
    names = {n.name for n in nodes}
    outputs = set(graph.outputs)
    for k, node in enumerate(nodes):
        for j, out in enumerate(node.outputs):
            if not out or (k == 0 and j == 0):
                continue
            if out in outputs or any(u not in names for u in _users(graph, out)):
                return False
    return True


def _match_at(graph: Graph, rule: RewriteRule, names: list[str]) -> Match | None:
    """Re-validate a candidate (pattern-ordered node names) against the current graph."""
    g = graph.nx_graph
    if any(n not in g for n in names):
        return None
    nodes = [graph.node(n) for n in names]
    pattern = rule._pattern
    if not all(
        _node_match(g.nodes[n.name], {"pop": p}) for n, p in zip(nodes, pattern.ops, strict=True)
    ):
        return None
    bound = _bind(pattern, nodes)
    if bound is None or not _self_contained(graph, nodes):
        return None
    return Match(rule, nodes, bound)


def find_matches(graph: Graph, rule: RewriteRule) -> list[Match]:
    """Every place ``rule``'s pattern matches now (before ``check``), in graph order."""
    pattern = rule._pattern
    matcher = DiGraphMatcher(graph.nx_graph, pattern.nx, node_match=_node_match)
    seen: set[tuple[str, ...]] = set()
    found = []
    for mapping in matcher.subgraph_monomorphisms_iter():
        inverse = {p: t for t, p in mapping.items()}
        names = [inverse[k] for k in range(len(pattern.ops))]
        if tuple(names) in seen:
            continue
        seen.add(tuple(names))
        match = _match_at(graph, rule, names)
        if match is not None:
            found.append(match)
    order = nx.get_node_attributes(graph.nx_graph, "order")
    return sorted(found, key=lambda m: order[m.root.name])


# --- replacements -------------------------------------------------------------------


class _Builder:
    """The ``op`` a replacement receives: records new nodes, adds constants directly.

    Names and constants come from an :class:`~graphopt.ir_builder.IRBuilder`: a new node
    is ``<root>_<op>`` (``_1``, ``_2``, ... when taken) and so is its output, or
    ``<node>_out<k>`` for several outputs.
    """

    def __init__(self, graph: Graph, match: Match) -> None:
        self.graph = graph
        self.match = match
        self.nodes: list[Node] = []
        self._prefix = match.root.name
        self._names = IRBuilder(graph)

    def constant(self, array: Any, name: str | None = None) -> str:
        """Add ``array`` as a new constant; returns its value name."""
        return self._names.const(array, name or f"{self._prefix}_const")

    def value(self, name: str) -> np.ndarray | None:
        """The array of constant ``name``, or None when it is not a constant."""
        return self.graph.constants.get(name)

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def emit(*inputs: Any, _domain: str = "", _outputs: int = 1, **attrs: Any) -> Any:
            names = [self._input(i) for i in inputs]
            # Recorded, not added: the graph changes only once the whole replacement
            # passes shape inference (see _replace).
            node_name = self._names.fresh(f"{self._prefix}_{op_type.lower()}")
            outs = [node_name]
            if _outputs > 1:
                outs = [self._names.fresh(f"{node_name}_out{k}") for k in range(_outputs)]
            self.nodes.append(Node(node_name, op_type, names, outs, attrs, _norm_domain(_domain)))
            return outs[0] if _outputs == 1 else tuple(outs)

        return emit

    def _input(self, x: Any) -> str:
        if x is None:
            return ""
        if isinstance(x, str):
            if not x:
                return ""
            if x not in self.graph.values and not any(x in n.outputs for n in self.nodes):
                raise ValueError(f"replacement input {x!r} is not a value of the graph")
            return x
        return self.constant(x)


def _describe(v: Value | None) -> str:
    if v is None or v.shape is None:
        return "unknown"
    return f"{v.dtype}[{','.join(str(d) for d in v.shape)}]"


def _infer(graph: Graph, nodes: list[Node]) -> dict[str, Value]:
    """Shapes and dtypes of the new nodes' outputs, by ONNX shape inference."""
    produced = {o for n in nodes for o in n.outputs if o}
    external = list(dict.fromkeys(i for n in nodes for i in n.inputs if i and i not in produced))
    inputs, inits = [], []
    for name in external:
        arr = graph.constants.get(name)
        if arr is not None and arr.size <= 64:  # small constants (shapes, axes) as values
            inits.append(numpy_helper.from_array(arr, name))
            continue
        v = graph.values.get(name)
        if v is None:
            inputs.append(helper.make_empty_tensor_value_info(name))
        else:
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(v.dtype))
            inputs.append(helper.make_tensor_value_info(name, elem, v.shape))
    protos = [
        helper.make_node(
            n.op_type, n.inputs, n.outputs, name=n.name, domain=n.domain or None, **n.attrs
        )
        for n in nodes
    ]
    outs = [helper.make_empty_tensor_value_info(o) for o in produced]
    model = helper.make_model(
        helper.make_graph(protos, "replacement", inputs, outs, inits),
        opset_imports=[helper.make_opsetid("", graph.opset)],
    )
    model = shape_inference.infer_shapes(attach_functions(model), strict_mode=True)
    found: dict[str, Value] = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if vi.name in produced and tt.elem_type:
            shape = None
            if tt.HasField("shape"):
                shape = tuple(
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in tt.shape.dim
                )
            dtype = str(helper.tensor_dtype_to_np_dtype(tt.elem_type))
            found[vi.name] = Value(vi.name, shape, dtype)
    return found


def _replace(graph: Graph, match: Match, pass_name: str) -> None:
    rule = match.rule
    root = match.root
    result_name = root.outputs[0]
    op = _Builder(graph, match)
    kwargs = {k: match.values[k] for k in rule._replacement_params}
    result = rule.replacement(op, **kwargs)
    where = f"pass {pass_name!r}: rule {rule.name!r} (at node {root.name!r})"
    if (
        not isinstance(result, str)
        or result not in graph.values
        and not any(result in n.outputs for n in op.nodes)
    ):
        raise PassError(f"{where}: replacement must return a value name, got {result!r}")
    old = graph.values.get(result_name)
    if op.nodes:
        try:
            inferred = _infer(graph, op.nodes)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            msg = first_line(exc)
            raise PassError(f"{where}: replacement fails ONNX shape inference: {msg}") from None
    else:
        inferred = {}
    new = inferred.get(result) or graph.values.get(result)
    if (
        old is not None
        and old.shape is not None
        and (new is None or new.shape != old.shape or new.dtype != old.dtype)
    ):
        raise PassError(
            f"{where}: replacement changes value {result_name!r} from {_describe(old)} "
            f"to {_describe(new)}"
        )
    users = _users(graph, result_name)  # before its producer goes
    for node in match.nodes:
        graph.remove_node(node.name)
    produced = {o for n in op.nodes for o in n.outputs}
    if result in produced:
        # The new result takes over the old name, so consumers and graph outputs stay put.
        for node in op.nodes:
            node.outputs = [result_name if o == result else o for o in node.outputs]
            node.inputs = [result_name if i == result else i for i in node.inputs]
        if op.nodes[-1].outputs == [result_name] and root.name not in graph.nx_graph:
            op.nodes[-1].name = root.name
    elif result_name in graph.outputs:
        op.nodes.append(Node(graph.unique_name(root.name), "Identity", [result], [result_name]))
    else:
        _rewire(graph, result_name, result, users)
    if old is None and result in inferred:
        graph.values[result_name] = Value(
            result_name, inferred[result].shape, inferred[result].dtype
        )
    for node in op.nodes:
        for out in node.outputs:
            if out and out != result_name:
                graph.values[out] = inferred.get(out) or Value(out, None, old.dtype if old else "")
        graph.add_node(node)


# --- rules and passes ---------------------------------------------------------------


@dataclass(frozen=True)
class RewriteRule:
    """``pattern`` and ``replacement`` functions, and ``check(graph, match) -> reason``."""

    pattern: Callable[..., Any]
    replacement: Callable[..., Any]
    check: Callable[[Graph, Match], str | None] | None = None
    name: str = ""
    _pattern: _Pattern = field(init=False, repr=False, compare=False)
    _replacement_params: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", _default_name(self.pattern, self.replacement))
        compiled = _compile_pattern(self.pattern)
        signature = inspect.signature(self.replacement).parameters
        params = _params(self.replacement, "replacement")
        unknown = [
            p
            for p in params
            if p not in compiled.variables and signature[p].default is inspect.Parameter.empty
        ]
        if unknown:
            raise TypeError(
                f"rule {self.name!r}: replacement parameter(s) {unknown} are not "
                f"pattern variables {list(compiled.variables)} and have no default"
            )
        used = tuple(p for p in params if p in compiled.variables)
        object.__setattr__(self, "_pattern", compiled)
        object.__setattr__(self, "_replacement_params", used)


def _default_name(pattern: Callable, replacement: Callable) -> str:
    for fn in (pattern, replacement):
        if fn.__name__ not in ("pattern", "replacement", "<lambda>"):
            return fn.__name__
    return f"{pattern.__module__}.{pattern.__qualname__}"


def apply_rules(
    graph: Graph, rules: Sequence[RewriteRule], max_iterations: int = 10, pass_name: str = ""
) -> Counter:
    """Apply ``rules`` (first = highest priority) until none fires; count firings per rule.

    Declined matches are not counted; each is logged once (logger ``graphopt.passes``,
    level DEBUG) with the reason ``check`` gave.
    """
    stats: Counter = Counter()
    declined: set[tuple[str, tuple[str, ...]]] = set()
    for _ in range(max_iterations):
        fired = False
        for rule in rules:
            for candidate in find_matches(graph, rule):
                match = _match_at(graph, rule, [n.name for n in candidate.nodes])
                if match is None:  # an earlier rewrite in this sweep took part of it
                    continue
                reason = rule.check(graph, match) if rule.check is not None else None
                if reason:
                    key = (rule.name, tuple(n.name for n in match.nodes))
                    if key not in declined:
                        declined.add(key)
                        _log.debug(
                            "%s: rule %s declined at %s: %s",
                            pass_name,
                            rule.name,
                            match.root.name,
                            reason,
                        )
                    continue
                _replace(graph, match, pass_name or "<rules>")
                stats[rule.name] += 1
                fired = True
        if not fired:
            break
    return stats


@dataclass(frozen=True)
class RewritePass(Pass):
    """A pass that applies a rule list (``rules``, position is priority) to a fixed point."""

    rules: ClassVar[tuple[RewriteRule, ...]] = ()
    max_iterations: int = 10

    def run(self, graph: Graph) -> PassResult:
        stats = apply_rules(graph, self.rules, self.max_iterations, self.name)
        return PassResult(graph, bool(stats), stats)


def rewrite_pass(
    name: str,
    rules: Sequence[RewriteRule],
    doc: str,
    after: Sequence[str] = (),
    before: Sequence[str] = (),
) -> type[RewritePass]:
    """A :class:`RewritePass` subclass named ``name`` that applies ``rules``."""
    class_name = "".join(part.capitalize() for part in name.replace("_", "-").split("-"))
    cls = type(
        class_name or "Rules",
        (RewritePass,),
        {
            "__doc__": doc,
            "__module__": rules[0].pattern.__module__ if rules else __name__,
            "__annotations__": {},
            "name": name,
            "rules": tuple(rules),
            "after": tuple(after),
            "before": tuple(before),
        },
    )
    return dataclass(frozen=True)(cls)
