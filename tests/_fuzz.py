"""The pieces of the compile fuzzer (:mod:`tests.test_fuzz`): seed models, hypothesis
strategies that mutate them, a pool of worker processes that compile them, and the
check of the CLI contract on each result.

The contract (README, "Errors"): ``graphopt compile`` exits 0 with a verified artifact
written, or 2 with one ``error: ...`` line at the end of stderr and nothing written;
never 1 (an internal error), never a signal, never a traceback, never a hang.

Mutations are structured (dims, element types, attribute values and types, node inputs
and outputs, op types, opsets, initializers, graph inputs/outputs) and byte-level
(truncation, flipped, inserted and deleted bytes of the serialized protobuf). Seeds are
small, so a mutant that compiles costs about a second; most mutants are refused in the
frontend in milliseconds, which is what makes thousands of them affordable.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from graphopt import zoo
from graphopt.artifact import read_manifest
from graphopt.lower import CONVERTERS

ROOT = Path(__file__).resolve().parent.parent

# --- seeds ----------------------------------------------------------------------------


def _conv_relu() -> onnx.ModelProto:
    """Like conftest's ``tiny_model``: x(1,2,4,4) -> Conv(3x3, pad 1) -> Relu."""
    b = zoo._Builder("conv_relu", seed=0)
    return b.model({"x": (1, 2, 4, 4)}, [b.op("Relu", [b.conv("x", 2, 3, 3, bias=False)])])


def _cnn() -> onnx.ModelProto:
    """small_cnn in miniature: Conv+bias, BatchNorm, both pools, Flatten, Gemm, Softmax."""
    b = zoo._Builder("cnn", seed=1)
    x = b.op("Relu", [b.bn(b.conv("input", 3, 4, 3), 4)])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])
    x = b.op("Flatten", [x], axis=1)
    out = b.op("Softmax", [b.gemm(x, 4 * 3 * 3, 5)], axis=-1)
    return b.model({"input": (1, 3, 10, 10)}, [out])


def _plumbing() -> onnx.ModelProto:
    """Shape ops with constant operands: Transpose, Reshape, Concat, Slice, Pad, Squeeze,
    Unsqueeze, Gather, ReduceMean, Cast, Clip."""
    b = zoo._Builder("plumbing", seed=2)
    i64 = functools.partial(np.array, dtype=np.int64)
    x = b.op("Transpose", ["x"], perm=[0, 2, 1])  # 1x6x4
    x = b.op("Reshape", [x, b.const(i64([1, 3, 8]))])
    x = b.op("Concat", [x, x], axis=1)  # 1x6x8
    x = b.op("Slice", [x, b.const(i64([1])), b.const(i64([7])), b.const(i64([2]))])  # 1x6x6
    x = b.op("Pad", [x, b.const(i64([0, 1, 0, 0, 1, 0])), b.const(np.float32(0.5))])
    x = b.op("Unsqueeze", [x, b.const(i64([0]))])  # 1x1x7x7
    x = b.op("Squeeze", [x, b.const(i64([0]))])
    x = b.op("Gather", [x, b.const(i64([0, 2, -1]))], axis=1)  # 1x3x7
    x = b.op("ReduceMean", [x], axes=[2], keepdims=1)
    x = b.op("Cast", [x], to=TensorProto.FLOAT)
    out = b.op("Clip", [x, b.const(np.float32(-1.0)), b.const(np.float32(1.0))])
    return b.model({"x": (1, 4, 6)}, [out])


def _elementwise() -> onnx.ModelProto:
    """Unary, binary and variadic elementwise ops with constant operands, in short
    independent chains (one output each) and a MatMul.

    Short, because the CPU schedules inline a fused chain into one expression, and ops
    that use their input more than once (Tanh, HardSwish) multiply its size: a long chain
    takes minutes to compile (reported; not what this fuzzer is after).
    """
    b = zoo._Builder("elementwise", seed=3)
    c = b.const(np.linspace(0.5, 2.0, 4, dtype=np.float32))
    outs = [
        b.op("Sigmoid", [b.op("Add", ["x", c])]),  # 3x4
        b.op("Div", [b.op("Tanh", ["x"]), c]),
        b.op(
            "Erf", [b.op("Max", [b.op("Sqrt", [b.op("Abs", ["x"])]), c, b.const(np.float32(0.1))])]
        ),
        b.op("Log", [b.op("HardSwish", [b.op("Pow", ["x", b.const(np.float32(2.0))])])]),
        b.op("Min", [b.op("Neg", [b.op("Abs", [b.op("LeakyRelu", ["x"], alpha=0.1)])]), c]),
        b.op("Reciprocal", [b.op("HardSigmoid", [b.op("Mul", ["x", c])])]),
        b.op("MatMul", [b.op("Exp", ["x"]), b.const(np.eye(4, 2, dtype=np.float32))]),
    ]
    return b.model({"x": (3, 4)}, outs)


def _lstm() -> onnx.ModelProto:
    """A one-layer LSTM over 2 steps (the expand-rnn pass), both outputs."""
    b = zoo._Builder("lstm", seed=4)
    w, r = b.weight((1, 16, 3), 3), b.weight((1, 16, 4), 4)
    y, h = b.op("LSTM", ["x", w, r], n_out=2, hidden_size=4)
    return b.model({"x": (2, 1, 3)}, [y, h])


SEEDS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_relu": _conv_relu,
    "cnn": _cnn,
    "plumbing": _plumbing,
    "elementwise": _elementwise,
    "lstm": _lstm,
    "pool_variants": functools.partial(zoo.build, "pool_variants"),
    "mlp_head": functools.partial(zoo.build, "mlp_head"),
}


@functools.cache
def seed_bytes(name: str) -> bytes:
    return SEEDS[name]().SerializeToString()


# --- mutations ------------------------------------------------------------------------

SPECIAL_INTS = [0, 1, 2, 3, -1, -2, 7, 64, 100000, 2**31 - 1, 2**31, -(2**31), 2**62, -(2**63)]
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, math.inf, -math.inf, math.nan]
STRINGS = [b"", b"NOTSET", b"SAME_UPPER", b"SAME_LOWER", b"VALID", b"reflect", b"edge",
           b"tanh", b"forward", b"bidirectional", b"\xff\xfe\x00", b"x" * 300]  # fmt: skip
ATTR_NAMES = ["axis", "axes", "perm", "pads", "strides", "kernel_shape", "dilations", "group",
              "auto_pad", "ceil_mode", "to", "alpha", "beta", "transA", "transB", "keepdims",
              "mode", "epsilon", "count_include_pad", "allowzero", "direction", "hidden_size",
              "layout", "storage_order", "value", "min", "max", "noop_with_empty_axes"]  # fmt: skip
OP_TYPES = sorted(k for k in CONVERTERS if "::" not in k) + [
    "LSTM", "GRU", "RNN", "If", "Loop", "Expand", "Where", "Resize", "NonZero", "Tile",
    "Shape", "Size", "ConstantOfShape", "Range", "TopK", "Constant", "Foo", "", "relu",
]  # fmt: skip
DOMAINS = ["", "ai.onnx", "com.microsoft", "graphopt", "custom"]
OPSETS = [-1, 0, 1, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19, 20, 21, 22, 23, 24, 99]
IR_VERSIONS = [-1, 0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 99]

ints = st.one_of(st.sampled_from(SPECIAL_INTS), st.integers(-8, 8))
floats = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(-10, 10, width=32))
int_lists = st.lists(ints, max_size=6)


def _pick(draw, items: list, label: str):  # noqa: ANN001, ANN202
    """One of ``items`` (by index, so hypothesis can shrink it), or None when empty."""
    return items[draw(st.integers(0, len(items) - 1), label=label)] if items else None


def _names(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    return sorted(
        {i.name for i in g.input}
        | {i.name for i in g.initializer}
        | {o for n in g.node for o in n.output}
    )


def _value_infos(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    g = model.graph
    return list(g.input) + list(g.output) + list(g.value_info)


def mutate_dims(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """A graph input/output's shape: a dim set to 0, negative, huge or symbolic; a dim
    added or removed; the shape or the whole type cleared."""
    vi = _pick(draw, _value_infos(model), "value")
    if vi is None:
        return "no value infos"
    shape = vi.type.tensor_type.shape
    how = draw(st.sampled_from(["set", "symbolic", "add", "remove", "clear-shape", "clear-type"]))
    if how == "clear-type":
        vi.ClearField("type")
    elif how == "clear-shape":
        vi.type.tensor_type.ClearField("shape")
    elif how == "add":
        shape.dim.add().dim_value = draw(ints)
    elif not shape.dim:
        return f"{vi.name!r}: no dims to {how}"
    else:
        k = draw(st.integers(0, len(shape.dim) - 1))
        if how == "remove":
            del shape.dim[k]
        elif how == "symbolic":
            shape.dim[k].dim_param = draw(st.sampled_from(["N", "", "batch", "?"]))
        else:
            shape.dim[k].dim_value = draw(ints)
    return f"dims of {vi.name!r}: {how} -> {list(shape.dim)!r}".replace("\n", " ")


def mutate_input_shape(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """A graph input gets other (mostly plausible) dims, and every other declared dim is
    made unknown, so shape inference alone decides them: odd sizes reach the passes and the
    lowering instead of stopping at a shape mismatch."""
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    vi = _pick(draw, inputs, "input")
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return "no shaped input"
    dims = vi.type.tensor_type.shape.dim
    small = st.one_of(st.integers(1, 9), st.sampled_from([0, -1, 17, 64]))
    for d in dims:
        d.dim_value = draw(small)
    for other in list(model.graph.output) + list(model.graph.value_info):
        for d in other.type.tensor_type.shape.dim:
            d.dim_param = "?"  # unknown, not absent: onnx.checker wants a graph output's shape
    return f"input {vi.name!r} dims -> {[d.dim_value for d in dims]}, other dims unknown"


def mutate_elem_type(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    vi = _pick(draw, _value_infos(model), "value")
    if vi is None:
        return "no value infos"
    vi.type.tensor_type.elem_type = draw(st.integers(-2, 30))
    return f"elem_type of {vi.name!r} -> {vi.type.tensor_type.elem_type}"


def _mutate_tensor(draw, t: TensorProto, names: list[str]) -> str:  # noqa: ANN001
    how = draw(
        st.sampled_from(
            [
                "dim",
                "add-dim",
                "drop-dims",
                "data_type",
                "truncate",
                "float_data",
                "rename",
                "external",
                "nan",
            ]  # fmt: skip
        )
    )
    if how == "dim" and t.dims:
        t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(ints)
    elif how == "add-dim":
        t.dims.append(draw(ints))
    elif how == "drop-dims":
        del t.dims[:]
    elif how == "data_type":
        t.data_type = draw(st.integers(-1, 30))
    elif how == "truncate":
        t.raw_data = t.raw_data[: draw(st.integers(0, max(len(t.raw_data) - 1, 0)))]
    elif how == "float_data":
        t.ClearField("raw_data")
        t.float_data.extend(draw(st.lists(floats, max_size=4)))
    elif how == "rename":
        t.name = draw(st.sampled_from([*names, "", "ghost"]))
    elif how == "external":
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key = "location"
        entry.value = draw(st.sampled_from(["../x", "/etc/passwd", "", "w.bin", "."]))
    elif how == "nan" and t.data_type == TensorProto.FLOAT and len(t.raw_data) >= 4:
        at = draw(st.integers(0, len(t.raw_data) // 4 - 1)) * 4
        t.raw_data = t.raw_data[:at] + np.float32(draw(floats)).tobytes() + t.raw_data[at + 4 :]
    return f"{how} -> dims {list(t.dims)}, type {t.data_type}, {len(t.raw_data)} raw bytes"


def mutate_initializer(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """An initializer's dims, data type, data (truncated, NaN/inf, moved to float_data,
    external), or name; or it is dropped or duplicated."""
    inits = model.graph.initializer
    t = _pick(draw, list(inits), "initializer")
    if t is None:
        return "no initializers"
    how = draw(st.sampled_from(["tensor", "drop", "duplicate"]))
    if how == "drop":
        inits.remove(t)
        return f"dropped initializer {t.name!r}"
    if how == "duplicate":
        inits.add().CopyFrom(t)
        return f"duplicated initializer {t.name!r}"
    return f"initializer {t.name!r}: {_mutate_tensor(draw, t, _names(model))}"


def _set_attribute(draw, a: AttributeProto, kind: int) -> None:  # noqa: ANN001
    """Give ``a`` type ``kind`` and a fresh hostile value of that type."""
    name = a.name
    a.Clear()
    a.name, a.type = name, kind
    if kind == AttributeProto.INT:
        a.i = draw(ints)
    elif kind == AttributeProto.INTS:
        a.ints.extend(draw(int_lists))
    elif kind == AttributeProto.FLOAT:
        a.f = draw(floats)
    elif kind == AttributeProto.FLOATS:
        a.floats.extend(draw(st.lists(floats, max_size=4)))
    elif kind == AttributeProto.STRING:
        a.s = draw(st.sampled_from(STRINGS))
    elif kind == AttributeProto.STRINGS:
        a.strings.extend(draw(st.lists(st.sampled_from(STRINGS), max_size=3)))
    elif kind == AttributeProto.TENSOR:
        a.t.CopyFrom(numpy_helper.from_array(np.asarray(draw(int_lists), np.int64)))
    elif kind == AttributeProto.GRAPH:
        a.g.name = "empty"


def mutate_attribute(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """A node attribute: a new value of its type, a value of another type, a declared
    type that does not match the payload, dropped, duplicated, or a new one added."""
    node = _pick(draw, list(model.graph.node), "node")
    if node is None:
        return "no nodes"
    attrs = node.attribute
    how = draw(st.sampled_from(["value", "retype", "type-tag", "drop", "duplicate", "add"]))
    kinds = [AttributeProto.INT, AttributeProto.INTS, AttributeProto.FLOAT,
             AttributeProto.FLOATS, AttributeProto.STRING, AttributeProto.STRINGS,
             AttributeProto.TENSOR, AttributeProto.GRAPH]  # fmt: skip
    if how == "add" or not attrs:
        a = attrs.add()
        a.name = draw(st.sampled_from(ATTR_NAMES))
        _set_attribute(draw, a, draw(st.sampled_from(kinds)))
        how = "add"
    else:
        a = attrs[draw(st.integers(0, len(attrs) - 1))]
        if how == "value" and a.type == AttributeProto.TENSOR:
            return f"{node.op_type} {node.name!r}.{a.name}: {_mutate_tensor(draw, a.t, [])}"
        if how == "value":
            _set_attribute(draw, a, a.type)
        elif how == "retype":
            _set_attribute(draw, a, draw(st.sampled_from(kinds)))
        elif how == "type-tag":
            a.type = draw(st.sampled_from(sorted(AttributeProto.AttributeType.values())))
        elif how == "drop":
            attrs.remove(a)
        else:
            attrs.add().CopyFrom(a)
    text = str(a).replace("\n", " ")[:160]
    return f"{node.op_type} {node.name!r} attribute {how}: {text}"


def mutate_node_inputs(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """Drop, duplicate, blank, swap or re-point a node's inputs."""
    node = _pick(draw, list(model.graph.node), "node")
    if node is None:
        return "no nodes"
    how = draw(st.sampled_from(["drop", "duplicate", "blank", "swap", "repoint", "append"]))
    ins = node.input
    if how == "append" or not ins:
        ins.append(draw(st.sampled_from([*_names(model), "ghost", ""])))
    else:
        k = draw(st.integers(0, len(ins) - 1))
        if how == "drop":
            del ins[k]
        elif how == "duplicate":
            ins.append(ins[k])
        elif how == "blank":
            ins[k] = ""
        elif how == "swap":
            ins[k], ins[-1] = ins[-1], ins[k]
        else:
            ins[k] = draw(st.sampled_from([*_names(model), "ghost"]))
    return f"{node.op_type} {node.name!r} inputs {how} -> {list(ins)}"


def mutate_edges(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """Rename a node output (to an existing name: two producers or a cycle; to a fresh
    one: consumers left dangling), add or drop outputs."""
    node = _pick(draw, list(model.graph.node), "node")
    if node is None:
        return "no nodes"
    outs = node.output
    how = draw(st.sampled_from(["rename", "add", "drop", "blank"]))
    if how == "add" or not outs:
        outs.append(draw(st.sampled_from([*_names(model), "extra"])))
    elif how == "drop":
        del outs[-1]
    else:
        k = draw(st.integers(0, len(outs) - 1))
        outs[k] = "" if how == "blank" else draw(st.sampled_from([*_names(model), "fresh"]))
    return f"{node.op_type} {node.name!r} outputs {how} -> {list(outs)}"


def mutate_graph_io(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """Drop or duplicate a graph input/output, expose an intermediate value as an output,
    declare an initializer as an input too, or rename a graph input."""
    g = model.graph
    how = draw(
        st.sampled_from(
            ["drop-input", "drop-output", "dup-output", "expose", "init-input", "rename-input"]
        )
    )
    if how == "drop-input" and g.input:
        del g.input[draw(st.integers(0, len(g.input) - 1))]
    elif how == "drop-output" and g.output:
        del g.output[draw(st.integers(0, len(g.output) - 1))]
    elif how == "dup-output" and g.output:
        g.output.add().CopyFrom(g.output[draw(st.integers(0, len(g.output) - 1))])
    elif how == "expose":
        name = draw(st.sampled_from([*_names(model), "nowhere"]))
        typed = draw(st.booleans())
        g.output.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            if typed
            else helper.make_empty_tensor_value_info(name)
        )
    elif how == "init-input" and g.initializer:
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        dims = draw(st.one_of(st.just(list(t.dims)), int_lists))
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, dims))
    elif how == "rename-input" and g.input:
        g.input[draw(st.integers(0, len(g.input) - 1))].name = draw(
            st.sampled_from([*_names(model), "renamed", ""])
        )
    else:
        return f"{how}: nothing to do"
    return f"graph io {how}"


def mutate_opset(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """The default-domain opset (old, new, absurd), a second or no opset import, the IR
    version, a custom domain import."""
    how = draw(st.sampled_from(["version", "duplicate", "remove", "ir", "custom"]))
    if how == "version":
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = draw(st.sampled_from(OPSETS))
    elif how == "duplicate":
        model.opset_import.append(helper.make_opsetid("", draw(st.sampled_from(OPSETS))))
    elif how == "remove":
        del model.opset_import[:]
    elif how == "ir":
        model.ir_version = draw(st.sampled_from(IR_VERSIONS))
    else:
        domain = draw(st.sampled_from(DOMAINS[1:]))
        model.opset_import.append(helper.make_opsetid(domain, draw(st.sampled_from(OPSETS))))
    opsets = [(o.domain, o.version) for o in model.opset_import]
    return f"opset {how} -> {opsets}, ir {model.ir_version}"


def mutate_op_type(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """A node becomes another op (one graphopt lowers, one it refuses, one ONNX lacks),
    or moves to another domain."""
    node = _pick(draw, list(model.graph.node), "node")
    if node is None:
        return "no nodes"
    if draw(st.booleans()):
        node.op_type = draw(st.sampled_from(OP_TYPES))
    else:
        node.domain = draw(st.sampled_from(DOMAINS))
    return f"node {node.name!r} -> {node.domain}::{node.op_type}"


def mutate_nodes(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """Delete, duplicate or reorder nodes (breaking topological order)."""
    nodes = model.graph.node
    if not nodes:
        return "no nodes"
    k = draw(st.integers(0, len(nodes) - 1))
    how = draw(st.sampled_from(["delete", "duplicate", "to-front", "reverse"]))
    if how == "delete":
        del nodes[k]
    elif how == "duplicate":
        nodes.add().CopyFrom(nodes[k])
    else:
        order = list(nodes)
        order = [order[k]] + order[:k] + order[k + 1 :] if how == "to-front" else order[::-1]
        copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in order]
        del nodes[:]
        nodes.extend(copies)
    return f"nodes {how} #{k}"


UNARY = ["Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Neg", "Abs", "Erf", "Reciprocal",
         "HardSigmoid", "HardSwish", "LeakyRelu", "Identity", "Softmax", "Flatten"]  # fmt: skip
BINARY = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "MatMul"]


def _nudge(value: int, delta: int) -> int:
    """``value + delta``, or ``value - delta`` where that would leave int64 (attributes such
    as Slice's ends hold INT64_MIN/MAX; protobuf refuses the overflow)."""
    lo, hi = -(2**63), 2**63 - 1
    return value + delta if lo <= value + delta <= hi else value - delta


def mutate_gently(draw, model: onnx.ModelProto) -> str:  # noqa: ANN001
    """A small change that often keeps the model valid, so it reaches the passes and the
    lowering: an int attribute or an int64 constant (axes, pads, starts, shapes) off by
    a little, or an op swapped for one of the same arity."""
    how = draw(st.sampled_from(["attribute", "int-constant", "swap-op"]))
    nodes = list(model.graph.node)
    delta = draw(st.sampled_from([-2, -1, 1, 2]))
    if how == "attribute":
        found = [(n, a) for n in nodes for a in n.attribute if a.ints or a.type == a.INT]
        pick = _pick(draw, found, "attribute")
        if pick is None:
            return "no int attributes"
        node, a = pick
        if a.type == a.INT:
            a.i = _nudge(a.i, delta)
        else:
            k = draw(st.integers(0, len(a.ints) - 1))
            a.ints[k] = _nudge(a.ints[k], delta)
        return f"{node.op_type} {node.name!r}.{a.name} nudged by {delta}"
    if how == "int-constant":
        found = [t for t in model.graph.initializer if t.data_type == TensorProto.INT64]
        t = _pick(draw, found, "constant")
        if t is None or not t.raw_data or len(t.raw_data) % 8:
            return "no int64 constants"
        array = np.frombuffer(t.raw_data, np.int64).copy()  # dims may be mutated already
        array[draw(st.integers(0, array.size - 1))] += delta
        t.raw_data = array.tobytes()
        return f"constant {t.name!r} -> {array.tolist()}"
    swappable = [n for n in nodes if n.op_type in UNARY + BINARY]
    node = _pick(draw, swappable, "node")
    if node is None:
        return "no swappable ops"
    node.op_type = draw(st.sampled_from(UNARY if node.op_type in UNARY else BINARY))
    del node.attribute[:]  # the old op's attributes would fail onnx.checker
    return f"node {node.name!r} -> {node.op_type}"


STRUCTURED = [
    mutate_gently,
    mutate_gently,
    mutate_gently,
    mutate_dims,
    mutate_input_shape,
    mutate_elem_type,
    mutate_initializer,
    mutate_attribute,
    mutate_node_inputs,
    mutate_edges,
    mutate_graph_io,
    mutate_opset,
    mutate_op_type,
    mutate_nodes,
]


def mutate_bytes(draw, data: bytes) -> tuple[str, bytes]:  # noqa: ANN001
    """Truncate, flip, insert or delete bytes of the serialized model."""
    how = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    at = draw(st.integers(1, max(len(data) - 1, 1)))
    if how == "truncate":
        return f"truncated to {at} bytes", data[:at]
    if how == "flip":
        xor = draw(st.integers(1, 255))
        return f"byte {at} ^= {xor}", data[:at] + bytes([data[at] ^ xor]) + data[at + 1 :]
    if how == "insert":
        extra = draw(st.binary(min_size=1, max_size=8))
        return f"inserted {extra!r} at {at}", data[:at] + extra + data[at:]
    n = draw(st.integers(1, 16))
    return f"deleted {n} bytes at {at}", data[:at] + data[at + n :]


@dataclasses.dataclass
class Mutant:
    seed: str
    steps: list[str]
    data: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()[:12]


@st.composite
def mutants(draw) -> Mutant:  # noqa: ANN001
    """A seed model with up to three structured mutations, then, for about one in four,
    a byte-level one (most of those end at the protobuf parser, so they are kept few)."""
    seed = draw(st.sampled_from(sorted(SEEDS)))
    model = onnx.ModelProto.FromString(seed_bytes(seed))
    count = draw(st.sampled_from([1, 2, 3, 1, 0]))
    structured = [draw(st.sampled_from(STRUCTURED)) for _ in range(count)]
    steps = [f"{fn.__name__}: {fn(draw, model)}" for fn in structured]
    data = model.SerializeToString()
    if not structured or draw(st.integers(0, 7)) == 0:
        step, data = mutate_bytes(draw, data)
        steps.append(f"mutate_bytes: {step}")
    return Mutant(seed, steps, data)


# --- running and checking -------------------------------------------------------------


class WorkerPool:
    """``size`` worker processes (:mod:`tests._fuzz_worker`) running commands.

    :meth:`map` hands each idle worker the next command and collects the answers in
    order. A worker that dies (a signal, an abort) or runs past ``timeout`` seconds is
    replaced, and its command's answer says so; workers are also replaced after
    ``recycle`` commands so that memory TVM keeps between compiles cannot pile up.
    """

    def __init__(self, size: int, workdir: Path, timeout: float = 180.0, recycle: int = 200):
        self.size, self.workdir, self.timeout, self.recycle = size, workdir, timeout, recycle
        self.log = open(workdir / "workers.log", "ab")  # noqa: SIM115 - closed in close()
        self.workers: list[tuple[subprocess.Popen, int]] = []  # (process, commands run)
        self.restarts = 0

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(ROOT), TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests._fuzz_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=self.workdir,
            env=env,
        )
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        if not ready or not proc.stdout.readline():
            proc.kill()
            proc.wait()
            self.log.flush()
            tail = (self.workdir / "workers.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"a fuzz worker did not start:\n{tail}")
        return proc

    def _stop(self, proc: subprocess.Popen) -> int:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                return proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def map(self, commands: list[list[str]]) -> list[dict]:
        results: list[dict | None] = [None] * len(commands)
        todo = list(range(len(commands)))[::-1]
        while len(self.workers) < self.size:
            self.workers.append((self._start(), 0))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (command, started)
        while todo or busy:
            for slot in range(self.size):
                if slot not in busy and todo:
                    i = todo.pop()
                    proc = self.workers[slot][0]
                    proc.stdin.write((json.dumps(commands[i]) + "\n").encode())
                    proc.stdin.flush()
                    busy[slot] = (i, time.monotonic())
            pipes = {self.workers[s][0].stdout: s for s in busy}
            first_deadline = min(started for _, started in busy.values()) + self.timeout
            wait = min(max(first_deadline - time.monotonic(), 0.0), 1.0)
            ready, _, _ = select.select(list(pipes), [], [], wait)
            for pipe in ready:
                slot = pipes[pipe]
                i, _ = busy.pop(slot)
                proc, runs = self.workers[slot]
                line = pipe.readline()
                if line:
                    results[i] = json.loads(line)
                    if runs + 1 < self.recycle:
                        self.workers[slot] = (proc, runs + 1)
                        continue
                    self._stop(proc)
                else:
                    rc = self._stop(proc)
                    why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited {rc}"
                    results[i] = {"rc": f"worker {why}", "out": "", "err": ""}
                    self.restarts += 1
                self.workers[slot] = (self._start(), 0)
            for slot, (i, started) in list(busy.items()):
                if time.monotonic() - started > self.timeout:
                    busy.pop(slot)
                    proc, _ = self.workers[slot]
                    proc.kill()
                    proc.wait()
                    results[i] = {"rc": f"timeout after {self.timeout:.0f} s", "out": "", "err": ""}
                    self.restarts += 1
                    self.workers[slot] = (self._start(), 0)
        return results

    def close(self) -> None:
        for proc, _ in self.workers:
            self._stop(proc)
        self.workers = []
        self.log.close()


def contract_breach(result: dict, artifact: Path) -> str | None:
    """What in ``result`` (a worker's answer for ``compile MODEL -o artifact``) breaks
    the CLI contract, or None."""
    rc, out, err = result["rc"], result["out"], result["err"]
    last = (err.strip().splitlines() or [""])[-1]
    if rc not in (0, 2):
        return f"exit status {rc}: {last}"
    if "Traceback (most recent call last)" in out + err:
        return "printed a traceback"
    if rc == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if len(errors) != 1 or not last.startswith("error: "):
            return f"exit 2 without exactly one final 'error:' line on stderr: {err[-300:]!r}"
        if artifact.exists():
            return "exit 2, yet the artifact was written"
        return None
    if not artifact.is_file():
        return "exit 0 without an artifact"
    verification = read_manifest(artifact)["verification"]
    if verification.get("ok") is not True:
        return f"exit 0 with verification {verification}"
    return None


class Campaign:
    """Mutants in, compiled in parallel batches, judged against the contract.

    Hypothesis yields one mutant per example, some of them byte-identical to earlier
    ones (a different choice sequence can make the same model): those are counted, not
    compiled again. :meth:`finish` compiles what is still queued.
    """

    def __init__(self, pool: WorkerPool, workdir: Path, failures: Path, batch: int = 10):
        self.pool, self.workdir, self.failures, self.batch = pool, workdir, failures, batch
        self.queue: list[Mutant] = []
        self.seen: set[str] = set()
        self.exits: Counter = Counter()
        self.duplicates = 0
        self.breaches: list[str] = []
        self.limitations: list[str] = []

    def add(self, mutant: Mutant) -> None:
        if mutant.digest in self.seen:
            self.duplicates += 1
            return
        self.seen.add(mutant.digest)
        self.queue.append(mutant)
        if len(self.queue) >= self.batch:
            self.finish()

    def finish(self) -> None:
        commands, artifacts = [], []
        for k, mutant in enumerate(self.queue):
            model, artifact = self.workdir / f"m{k}.onnx", self.workdir / f"m{k}.so"
            model.write_bytes(mutant.data)
            artifact.unlink(missing_ok=True)
            commands.append(["compile", str(model), "-o", str(artifact)])
            artifacts.append(artifact)
        results = self.pool.map(commands)
        for mutant, result, artifact in zip(self.queue, results, artifacts, strict=True):
            self.exits[str(result["rc"])] += 1
            breach = contract_breach(result, artifact)
            if breach:
                self.breaches.append(save_failure(self.failures, mutant, result, breach))
            elif result["rc"] == 2 and "limitation: please report it" in result["err"]:
                # Within the contract (exit 2, one line), but TVM failed on a model graphopt
                # accepted: worth a look, and a check that refuses it earlier.
                line = result["err"].strip().splitlines()[-1]
                where = self.failures / "limitations"
                self.limitations.append(save_failure(where, mutant, result, line[:200]))
        self.queue = []


def save_failure(folder: Path, mutant: Mutant, result: dict, breach: str) -> str:
    """Keep the model and what happened; return a line with the reproduction command."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{mutant.seed}-{mutant.digest}"
    model = stem.with_suffix(".onnx")
    model.write_bytes(mutant.data)
    command = f"graphopt compile {model} -o /tmp/fuzz-repro.so --debug"
    record = {"breach": breach, "seed": mutant.seed, "steps": mutant.steps, **result}
    stem.with_suffix(".json").write_text(json.dumps(record | {"reproduce": command}, indent=1))
    return f"{breach}\n    mutations: {'; '.join(mutant.steps)}\n    reproduce: {command}"
