"""Expand ONNX ``LSTM``, ``GRU`` and ``RNN`` nodes into primitive ops.

TVM's importer has no recurrent ops, so each one is unrolled over its static sequence
length. Per direction, the input projection of all time steps is one GEMM; only the
recurrent part runs step by step::

    XW = reshape(X, [seq*batch, input]) @ W^T + (Wb + Rb)      # one MatMul, [seq*batch, G*H]
    gates_t = XW[rows of step t] + H_{t-1} @ R^T                # per step, [batch, G*H]

then, with the ONNX gate orders (LSTM ``i o f c``, GRU ``z r h``) and default
activations ``f=Sigmoid, g=Tanh, h=Tanh``::

    LSTM: C_t = f(f_t + Pf*C_{t-1}) * C_{t-1} + f(i_t + Pi*C_{t-1}) * g(c_t)
          H_t = f(o_t + Po*C_t) * h(C_t)
    GRU:  z, r = f(z_t), f(r_t)
          n = g(xh_t + (r*H_{t-1}) @ Rh^T + Rbh)         linear_before_reset=0
          n = g(xh_t + r*(H_{t-1} @ Rh^T + Rbh))         linear_before_reset=1
          H_t = n + z*(H_{t-1} - n)                      (= (1-z)*n + z*H_{t-1})
    RNN:  H_t = f(x_t + H_{t-1} @ R^T)

With ``sequence`` (the CPU targets' default), the whole layer, every step of every
direction, is one ``graphopt::RNNSequence`` node after one projection GEMM for all
directions: a kernel with the time loop inside it (``graphopt.lower._rnn_sequence``), for
the same cells as ``fuse_steps`` below. Y, Y_h and Y_c are views and slices of its
outputs.

With ``fuse_steps``, each step after the first is one ``graphopt::RNNStep`` node instead:
one kernel (``graphopt.lower.relax.rnn_step_te``, scheduled by ``graphopt.targets._gemv``)
doing the recurrent GEMV over R^T packed as [H/U, H, G*U]
(the U columns of every gate side by side), reading step t's projection rows in place
(the row is an argument, so all steps share one compiled kernel), and applying the gate
math; LSTM (no peepholes), GRU with linear_before_reset=1 and RNN, float32, constant R.

Otherwise each step is three kernels after fusion: the copy of step t's projection rows, one
recurrent MatMul for all gates, and the gates' elementwise math (each gate's columns are
sliced inside it, at offsets that are the same every step, so it compiles once). A
constant R^T [H, G*H] is packed in 64-column blocks [G*H/64, H, 64] (``_BLOCK``) when H is
a multiple of 64, so the per-step GEMV reads the weight front to back.

A missing initial state (or an all-zero constant one) is zero, so terms that multiply it
are left out of the first step rather than computed. Weight preparation (slicing a
direction, transposing, summing the two biases) is done in numpy when the weights are
constants, which they are after ``fold-constants``; otherwise it is emitted as graph
ops, so a model that feeds weights as inputs compiles too.

Refused, with :class:`~graphopt.errors.UnsupportedOpsError` naming node and attribute:
activations other than Sigmoid/Tanh/Relu, ``clip``, ``input_forget=1``, and
``sequence_lens`` unless it is a constant equal to the full length everywhere. Run this
pass after ``fold-constants`` (weights become constants) and before ``dead-code``.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.errors import UnsupportedOpsError
from graphopt.ir import Graph, Node, Value
from graphopt.ir_builder import IRBuilder
from graphopt.passes._base import Pass, PassResult
from graphopt.passes._functions import GRAPHOPT_DOMAIN

__all__ = ["ExpandRNN", "check"]

# op_type -> (number of gates, default activations for one direction)
_CELLS: dict[str, tuple[int, tuple[str, ...]]] = {
    "LSTM": (4, ("Sigmoid", "Tanh", "Tanh")),
    "GRU": (3, ("Sigmoid", "Tanh")),
    "RNN": (1, ("Tanh",)),
}
# Activations without alpha/beta parameters map one-to-one onto ONNX ops.
_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
_DIRECTIONS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}
# Column block of a packed recurrent weight: R^T [H, N] is stored as [N/B, H, B], so the
# per-step GEMV streams each block's H rows contiguously (in plain R^T consecutive rows
# of a block are N floats apart). 64 floats = 4 AVX-512 or 8 AVX2 registers.
_BLOCK = 64


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _opt(node: Node, i: int) -> str | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i] else None


def _activations(node: Node) -> list[str]:
    """The activation ops for every direction, in ONNX order (forward first)."""
    n_dirs = len(_DIRECTIONS[node.attr_str("direction", "forward")])
    given = [_text(a) for a in node.attrs.get("activations", [])]
    return [_ACTIVATIONS[a.lower()] for a in given or _CELLS[node.op_type][1] * n_dirs]


def _static_shape(graph: Graph, name: str) -> tuple[int, ...] | None:
    value = graph.values.get(name)
    return value.shape if value is not None and value.is_static else None


def check(graph: Graph, node: Node) -> str | None:
    """Return why ``node`` (an LSTM, GRU or RNN) cannot be expanded, or None when it can."""
    direction = node.attr_str("direction", "forward")
    if direction not in _DIRECTIONS:
        return f"attribute direction={direction!r} is not one of {', '.join(_DIRECTIONS)}"
    if node.attrs.get("layout", 0) not in (0, 1):
        return f"attribute layout={node.attrs['layout']} is not 0 or 1"
    acts = [_text(a) for a in node.attrs.get("activations", [])]
    n_expected = len(_CELLS[node.op_type][1]) * len(_DIRECTIONS[direction])
    if acts and len(acts) != n_expected:
        return f"attribute activations={acts} should name {n_expected} functions"
    if any(a.lower() not in _ACTIVATIONS for a in acts):
        return f"attribute activations={acts} is not supported (only Sigmoid, Tanh, Relu)"
    if "clip" in node.attrs:
        return f"attribute clip={node.attrs['clip']} is not supported"
    if node.attrs.get("input_forget", 0):
        return "attribute input_forget=1 is not supported"
    x_shape, w_shape, r_shape = (_static_shape(graph, i) for i in node.inputs[:3])
    if x_shape is None or len(x_shape) != 3:
        return f"input X ({node.inputs[0]!r}) needs a static 3-D shape"
    if w_shape is None or r_shape is None:
        return "inputs W and R need static shapes"
    hidden = r_shape[-1]
    if node.attrs.get("hidden_size", hidden) != hidden:
        return f"attribute hidden_size={node.attrs['hidden_size']} disagrees with R {r_shape}"
    layout = node.attrs.get("layout", 0)
    seq, batch = (x_shape[1], x_shape[0]) if layout else (x_shape[0], x_shape[1])
    wrong = _wrong_shape(graph, node, len(_DIRECTIONS[direction]), batch, x_shape[2], hidden)
    if wrong:
        return wrong
    lens = _opt(node, 4)
    if lens is not None:
        if not graph.is_constant(lens):
            return f"input sequence_lens ({lens!r}) is not a constant (variable lengths)"
        if np.any(graph.constants[lens] != seq):
            return f"input sequence_lens holds lengths other than the full length {seq}"
    return None


def _wrong_shape(graph: Graph, node: Node, dirs: int, batch: int, size: int, hidden: int):  # noqa: ANN202
    """Why an input's shape is not the one the ONNX spec gives it, or None. ONNX shape
    inference does not check them, and the expansion would fail in numpy broadcasting
    with a message that names neither the node nor the input."""
    gates = _CELLS[node.op_type][0] * hidden
    state = (batch, dirs, hidden) if node.attrs.get("layout", 0) else (dirs, batch, hidden)
    expected = {
        "W": (dirs, gates, size),
        "R": (dirs, gates, hidden),
        "B": (dirs, 2 * gates),
        "sequence_lens": (batch,),
        "initial_h": state,
        "initial_c": state,
        "P": (dirs, 3 * hidden),
    }
    for i, (label, shape) in enumerate(expected.items(), start=1):
        name = _opt(node, i)
        if name is not None and _static_shape(graph, name) != shape:
            got = _static_shape(graph, name)
            return f"input {label} ({name!r}) has shape {got}, expected {shape}"
    return None


class _Emitter(IRBuilder):
    """Adds primitive nodes for one recurrent node, folding all-constant ones in numpy.

    Names are ``<node>_<op>_<n>`` (see :class:`~graphopt.ir_builder.IRBuilder`). ``None``
    stands for an all-zero tensor: ``add(x, None)`` is ``x``, ``mul(x, None)`` and
    ``matmul(None, w)`` are ``None``, so zero initial states cost nothing.
    """

    def __init__(self, graph: Graph, prefix: str, dtype: str) -> None:
        super().__init__(graph, prefix)
        self.value_dtype = dtype
        self.stats: Counter = Counter()
        self._indices: dict[tuple, str] = {}

    def _index(self, values: Sequence[int] | int) -> str:
        key = (np.ndim(values), tuple(np.ravel(values)))
        if key not in self._indices:  # Slice bounds repeat every step: share them
            self._indices[key] = self.const(np.array(values, dtype=np.int64), "idx")
        return self._indices[key]

    def emit(  # no dtype: every value has the recurrent node's
        self,
        op: str,
        inputs: list[str],
        shape: tuple[int, ...],
        fold: Callable[..., np.ndarray] | None = None,
        attrs: dict | None = None,
        out: str | None = None,
        const_inputs: Sequence[str] = (),
    ) -> str:
        """Add ``op`` (or its numpy result when every data input is constant)."""
        name = super().emit(
            op,
            inputs,
            shape,
            self.value_dtype,
            attrs,
            out=out,
            fold=fold,
            const_inputs=const_inputs,
        )
        if not self.graph.is_constant(name):
            self.stats[op] += 1
        return name

    # --- data movement ------------------------------------------------------------
    def take(self, x: str | None, index: int, axis: int) -> str | None:
        """``x`` at ``index`` along ``axis``, that axis removed (Gather with a scalar)."""
        if x is None:
            return None
        shape = self.shape(x)
        out_shape = shape[:axis] + shape[axis + 1 :]
        if self.graph.is_constant(x):
            return self.emit("Gather", [x], out_shape, lambda a: np.take(a, index, axis))
        return self.emit(
            "Gather", [x], out_shape, attrs={"axis": axis}, const_inputs=[self._index(index)]
        )

    def take_rows(self, x: str, index: int, axis: int) -> str:
        """``x`` at ``[index]`` along ``axis``, that axis kept (Gather with a 1-D index,
        which lowers without a reshape of the index to fold at compile time)."""
        shape = list(self.shape(x))
        shape[axis] = 1
        return self.emit(
            "Gather", [x], tuple(shape), attrs={"axis": axis}, const_inputs=[self._index([index])]
        )

    def slice(self, x: str | None, axis: int, start: int, end: int, step: int = 1) -> str | None:
        if x is None:
            return None
        shape = list(self.shape(x))
        if start == 0 and end == shape[axis] and step == 1:
            return x
        picked = range(start, end, step)
        shape[axis] = len(picked)
        where = (slice(None),) * axis + (slice(start, end, step),)
        if self.graph.is_constant(x):
            return self.emit("Slice", [x], tuple(shape), lambda a: a[where])
        if self.graph.opset < 10:  # Slice takes its bounds as inputs from opset 10 on
            return self.emit(
                "Gather",
                [x],
                tuple(shape),
                attrs={"axis": axis},
                const_inputs=[self._index(list(picked))],
            )
        bounds = [self._index([v]) for v in (start, end, axis, step)]
        return self.emit("Slice", [x], tuple(shape), const_inputs=bounds)

    def transpose(self, x: str, perm: list[int]) -> str:
        shape = tuple(self.shape(x)[p] for p in perm)
        return self.emit("Transpose", [x], shape, lambda a: a.transpose(perm), {"perm": perm})

    def reshape(self, x: str, shape: tuple[int, ...], out: str | None = None) -> str:
        target = tuple(int(d) for d in shape)
        if self.shape(x) == target and out is None:
            return x
        return self.emit(
            "Reshape",
            [x],
            target,
            lambda a: a.reshape(target),
            out=out,
            const_inputs=[self._index(list(target))],
        )

    def concat(self, xs: list[str], axis: int, out: str | None = None) -> str:
        if len(xs) == 1 and out is None:
            return xs[0]
        shape = list(self.shape(xs[0]))
        shape[axis] = sum(self.shape(x)[axis] for x in xs)
        fold = lambda *a: np.concatenate(a, axis)  # noqa: E731
        return self.emit("Concat", xs, tuple(shape), fold, {"axis": axis}, out=out)

    # --- arithmetic (None is zero) --------------------------------------------------
    def _binary(self, op: str, a: str, b: str, fn: Callable) -> str:
        shape = np.broadcast_shapes(self.shape(a), self.shape(b))
        return self.emit(op, [a, b], shape, lambda x, y: fn(x, y).astype(self.value_dtype))

    def add(self, a: str | None, b: str | None) -> str | None:
        if a is None or b is None:
            return b if a is None else a
        return self._binary("Add", a, b, np.add)

    def sub(self, a: str, b: str) -> str:
        return self._binary("Sub", a, b, np.subtract)

    def mul(self, a: str | None, b: str | None) -> str | None:
        if a is None or b is None:
            return None
        return self._binary("Mul", a, b, np.multiply)

    def matmul(self, a: str | None, b: str) -> str | None:
        if a is None:
            return None
        shape = self.shape(a)[:-1] + self.shape(b)[-1:]
        return self.emit("MatMul", [a, b], shape, np.matmul)

    def recurrent(self, h: str | None, wt: str, hidden: int) -> list[str | None]:
        """``h @ wt`` for the per-step recurrence, as one [batch, hidden] tensor per gate.

        A constant ``wt`` [K, N] is packed in column blocks: ``MatMul(h, [N/B, K, B])``
        gives [N/B, batch, B], and gate k is its blocks ``k*hidden/B ...`` reshaped, a
        copy that fuses into the gate's elementwise kernel.
        """
        k, n = self.shape(wt)
        gates = n // hidden
        if h is None:
            return [None] * gates
        if not self.graph.is_constant(wt) or hidden % _BLOCK or n <= _BLOCK:
            rec = self.matmul(h, wt)
            return [self.slice(rec, 1, g * hidden, (g + 1) * hidden) for g in range(gates)]
        blocks = self.graph.constants[wt].reshape(k, n // _BLOCK, _BLOCK).transpose(1, 0, 2)
        packed = self.const(np.ascontiguousarray(blocks), "rblocks")
        self.stats["packed_recurrent_matmuls"] += 1
        batch, per_gate = self.shape(h)[0], hidden // _BLOCK
        rec = self.emit("MatMul", [h, packed], (n // _BLOCK, batch, _BLOCK), np.matmul)
        out = []
        for g in range(gates):
            part = self.slice(rec, 0, g * per_gate, (g + 1) * per_gate)
            if batch > 1:
                part = self.transpose(part, [1, 0, 2])
            out.append(self.reshape(part, (batch, hidden)))
        return out

    def act(self, op: str, x: str) -> str:
        fns = {
            "Sigmoid": lambda a: 1 / (1 + np.exp(-a)),
            "Tanh": np.tanh,
            "Relu": lambda a: np.maximum(a, 0),
        }
        return self.emit(op, [x], self.shape(x), lambda a: fns[op](a).astype(self.value_dtype))


@dataclass
class _Direction:
    """Per-direction parameters, ready for the step loop (None = zero / absent)."""

    wt: str  # W^T, [input, G*H]
    bias: str | None  # added once to the projection, [G*H]
    rt: str  # R^T, [H, G*H] (GRU with linear_before_reset=0: the z, r part [H, 2H])
    rht: str | None  # GRU with linear_before_reset=0: Rh^T, [H, H]
    rbh: str | None  # GRU with linear_before_reset=1: Rbh, [H]
    peep: tuple[str | None, str | None, str | None]  # LSTM P: i, o, f, each [H]
    h0: str | None  # [batch, H]
    c0: str | None  # [batch, H]
    acts: list[str]


def _zero_to_none(graph: Graph, name: str | None) -> str | None:
    if name is not None and graph.is_constant(name) and not np.any(graph.constants[name]):
        return None
    return name


def _direction(e: _Emitter, node: Node, d: int, hidden: int) -> _Direction:
    gates = _CELLS[node.op_type][0]
    gh = gates * hidden
    graph = e.graph
    lbr = node.op_type == "GRU" and bool(node.attrs.get("linear_before_reset", 0))
    state_axis = 1 if node.attrs.get("layout", 0) else 0

    w = e.take(node.inputs[1], d, 0)
    r = e.take(node.inputs[2], d, 0)
    bias = rbh = rht = None
    b = _opt(node, 3)
    if b is not None:
        b = e.take(b, d, 0)
        wb, rb = e.slice(b, 0, 0, gh), e.slice(b, 0, gh, 2 * gh)
        if lbr:  # Rbh sits inside r * (...): keep it out of the projection bias
            rbh = e.slice(rb, 0, 2 * hidden, gh)
            rb = e.slice(rb, 0, 0, 2 * hidden)
            wb, wbh = e.slice(wb, 0, 0, 2 * hidden), e.slice(wb, 0, 2 * hidden, gh)
            bias = e.concat([e.add(wb, rb), wbh], 0)
        else:
            bias = e.add(wb, rb)
        bias = _zero_to_none(graph, bias)
        rbh = _zero_to_none(graph, rbh)
    rt = e.transpose(r, [1, 0])
    if node.op_type == "GRU" and not lbr:
        rht = e.slice(rt, 1, 2 * hidden, gh)
        rt = e.slice(rt, 1, 0, 2 * hidden)
    peep: tuple = (None, None, None)
    p = _opt(node, 7) if node.op_type == "LSTM" else None
    if p is not None and _zero_to_none(graph, p) is not None:
        p = e.take(p, d, 0)
        peep = tuple(
            _zero_to_none(graph, e.slice(p, 0, k * hidden, (k + 1) * hidden)) for k in range(3)
        )
    h0 = _zero_to_none(graph, e.take(_zero_to_none(graph, _opt(node, 5)), d, state_axis))
    c0 = None
    if node.op_type == "LSTM":
        c0 = _zero_to_none(graph, e.take(_zero_to_none(graph, _opt(node, 6)), d, state_axis))
    n_act = len(_CELLS[node.op_type][1])
    acts = _activations(node)[d * n_act : (d + 1) * n_act]
    return _Direction(e.transpose(w, [1, 0]), bias, rt, rht, rbh, peep, h0, c0, acts)


# ``x(k)``: gate k's columns of step t's input projection, one Slice per gate; gate k of
# the recurrent product is sliced from one MatMul for all gates. Each gate's adds and
# activation then fuse into the step's elementwise kernels.
_Cols = Callable[[int], str]


def _step_cols(e: _Emitter, xt: str, hidden: int, k: int) -> str:
    """Gate k's columns of ``xt`` (one step's rows, [1, batch, G*H] or [batch, 1, G*H])."""
    part = e.slice(xt, 2, k * hidden, (k + 1) * hidden)
    return e.reshape(part, (e.shape(xt)[0] * e.shape(xt)[1], hidden))


def _gate(e: _Emitter, x: _Cols, rec: list[str | None], k: int) -> str:
    return e.add(x(k), rec[k])


def _lstm_step(e: _Emitter, p: _Direction, x: _Cols, h: str | None, c: str | None, hidden: int):
    f, g, hact = p.acts
    rec = e.recurrent(h, p.rt, hidden)
    pi, po, pf = p.peep
    i = e.act(f, e.add(_gate(e, x, rec, 0), e.mul(pi, c)))
    cand = e.act(g, _gate(e, x, rec, 3))
    if c is not None:  # with C_{t-1} = 0 the forget gate multiplies nothing
        forget = e.act(f, e.add(_gate(e, x, rec, 2), e.mul(pf, c)))
        c = e.mul(forget, c)
    c = e.add(c, e.mul(i, cand))
    o = e.act(f, e.add(_gate(e, x, rec, 1), e.mul(po, c)))
    return e.mul(o, e.act(hact, c)), c


def _gru_step(e: _Emitter, p: _Direction, x: _Cols, h: str | None, hidden: int):
    f, g = p.acts
    linear_before_reset = p.rht is None
    rec = e.recurrent(h, p.rt, hidden)  # lbr=1: all three gates; lbr=0: z and r
    if linear_before_reset:
        rec_h = e.add(rec[2], p.rbh)  # r multiplies this
    else:  # r multiplies H_{t-1} before its MatMul
        rec_h = h
    z = e.act(f, _gate(e, x, rec, 0))
    r = e.act(f, _gate(e, x, rec, 1)) if rec_h is not None else None
    if linear_before_reset:
        rec_h = e.mul(r, rec_h)
    else:
        (rec_h,) = e.recurrent(e.mul(r, rec_h), p.rht, hidden)
    n = e.act(g, e.add(x(2), rec_h))
    if h is None:
        return e.sub(n, e.mul(z, n))
    return e.add(n, e.mul(z, e.sub(h, n)))


def _rnn_step(e: _Emitter, p: _Direction, x: _Cols, h: str | None, hidden: int):
    return e.act(p.acts[0], _gate(e, x, e.recurrent(h, p.rt, hidden), 0))


# Columns (all gates) per weight block of a fused step: at most 64 float32 (4 AVX-512
# registers; the schedule takes two blocks per pass, 8 FMA chains). Hidden units per
# block U: the largest power of two with G*U <= _STEP_COLUMNS dividing H (LSTM 16, GRU 16,
# RNN 64 for H = 256). Measured against 128 columns (one block per pass): 10-15% faster.
_STEP_COLUMNS = 64


def _fusable(e: _Emitter, node: Node, p: _Direction) -> bool:
    """Whether this direction's steps can be ``graphopt::RNNStep`` nodes: float32, a
    constant R (packed at compile time), no peepholes, GRU only with linear_before_reset."""
    if e.value_dtype != "float32" or not e.graph.is_constant(p.rt):
        return False
    if node.op_type == "LSTM":
        return p.peep == (None, None, None)
    return node.op_type == "RNN" or p.rht is None


def _packed(wt: np.ndarray, hidden: int) -> tuple[np.ndarray, int]:
    """R^T [H, G*H] packed as [H/U, H, G*U]: block j holds the U columns of hidden units
    ``j*U ...`` of every gate side by side, so one pass over it gives their gates."""
    gates = wt.shape[1] // hidden
    fits = (b for b in (64, 32, 16, 8, 4, 2, 1) if gates * b <= _STEP_COLUMNS and hidden % b == 0)
    block = next(fits, 1)
    packed = wt.reshape(hidden, gates, hidden // block, block).transpose(2, 0, 1, 3)
    shape = (hidden // block, hidden, gates * block)
    return np.ascontiguousarray(packed.reshape(shape)), block


def _pack_steps(e: _Emitter, rt: str, hidden: int) -> tuple[str, int]:
    """The packed R^T (:func:`_packed`) as a constant of the graph, and its block U."""
    packed, block = _packed(e.graph.constants[rt], hidden)
    return e.const(packed, "rsteps"), block


def _fused_step(e: _Emitter, node: Node, p: _Direction, state: dict) -> tuple[str, str | None]:
    """One ``graphopt::RNNStep`` node: H_t (and C_t) from step t's projection rows
    (``row0`` on, ``row_stride`` apart) and the previous state, in one kernel."""
    inputs = [state["xw"], state["h"]]
    if node.op_type == "LSTM":
        inputs.append(state["c"])
    inputs.append(state["packed"])
    if node.op_type == "GRU" and p.rbh is not None:
        inputs.append(p.rbh)
    batch, hidden = e.shape(state["h"])
    outs = [e.fresh("h")] + ([e.fresh("c")] if node.op_type == "LSTM" else [])
    for name in outs:
        e.graph.values[name] = Value(name, (batch, hidden), "float32")
    attrs = {
        "cell": node.op_type,
        "hidden": hidden,
        "block": state["block"],
        "activations": list(p.acts),
        "row0": state["row0"],
        "row_stride": state["row_stride"],
    }
    e.graph.add_node(Node(e.fresh("step"), "RNNStep", inputs, outs, attrs, GRAPHOPT_DOMAIN))
    e.stats["fused_steps"] += 1
    return outs[0], (outs[1] if len(outs) > 1 else None)


def _expand(graph: Graph, node: Node, fuse: bool = True, sequence: bool = False) -> Counter:
    x = node.inputs[0]
    layout = int(node.attrs.get("layout", 0))
    x_shape = graph.values[x].shape
    seq, batch = (x_shape[1], x_shape[0]) if layout else (x_shape[0], x_shape[1])
    hidden = graph.values[node.inputs[2]].shape[-1]
    e = _Emitter(graph, node.name, graph.values[x].dtype)
    graph.remove_node(node.name)

    x2d = e.reshape(x, (seq * batch, x_shape[2]))
    revs = _DIRECTIONS[node.attr_str("direction", "forward")]
    ps = [_direction(e, node, d, hidden) for d in range(len(revs))]
    if sequence and all(_fusable(e, node, p) for p in ps):
        _sequence(e, node, ps, x2d, (seq, batch, hidden), revs)
        return e.stats
    hs, cs = [], []  # per direction: H_t (and C_t) in time order
    for d, reverse in enumerate(revs):
        p = ps[d]
        xw2d = e.add(e.matmul(x2d, p.wt), p.bias)  # the one input-projection GEMM
        gh = e.shape(xw2d)[1]  # as [seq, batch, G*H] (layout 0) or [batch, seq, G*H]
        xw = e.reshape(xw2d, (batch, seq, gh) if layout else (seq, batch, gh))
        e.stats["input_projections"] += 1
        state: dict = {"xw": xw2d, "row_stride": seq if layout else 1}
        if fuse and _fusable(e, node, p):
            state["packed"], state["block"] = _pack_steps(e, p.rt, hidden)
        h, c = p.h0, p.c0
        h_seq, c_seq = [None] * seq, [None] * seq
        for t in reversed(range(seq)) if reverse else range(seq):
            if "packed" in state and h is not None and (node.op_type != "LSTM" or c is not None):
                state.update(h=h, c=c, row0=t if layout else t * batch)
                h, c = _fused_step(e, node, p, state)
                h_seq[t], c_seq[t] = h, c
                continue
            # Step t's rows: a Gather whose index is a constant *input*, not a Slice bound
            # baked into the code, so the copy and the gates' kernels (reading it at the
            # same offsets every step) are each one function for all steps, compiled once.
            xt = functools.partial(_step_cols, e, e.take_rows(xw, t, layout), hidden)

            if node.op_type == "LSTM":
                h, c = _lstm_step(e, p, xt, h, c, hidden)
            elif node.op_type == "GRU":
                h = _gru_step(e, p, xt, h, hidden)
            else:
                h = _rnn_step(e, p, xt, h, hidden)
            h_seq[t], c_seq[t] = h, c
        hs.append(h_seq)
        cs.append(c_seq)

    outputs = list(node.outputs) + [""] * (3 - len(node.outputs))
    y, y_h, y_c = outputs[:3]

    def used(name: str) -> bool:
        return bool(name) and (name in graph.outputs or bool(graph.consumers(name)))

    n_dirs = len(hs)
    if used(y):
        # layout 0: [seq, dirs, batch, H]; layout 1: [batch, seq, dirs, H]
        dir_axis = 2 if layout else 1
        one = (batch, seq, 1, hidden) if layout else (seq, 1, batch, hidden)
        per_dir = [e.concat(s, layout) for s in hs]  # [batch, seq*H] or [seq*batch, H]
        if n_dirs == 1:
            e.reshape(per_dir[0], one, out=y)
        else:
            e.concat([e.reshape(s, one) for s in per_dir], dir_axis, out=y)
    for name, states in ((y_h, hs), (y_c, cs)):
        if used(name):
            # The last state of a direction: time seq-1 forward, time 0 in reverse.
            last = [s[0] if rev else s[-1] for s, rev in zip(states, revs, strict=True)]
            shape = (batch, n_dirs, hidden) if layout else (n_dirs, batch, hidden)
            e.reshape(e.concat(last, layout), shape, out=name)
    return e.stats


def _stacked(e: _Emitter, parts: list[str | None], shape: tuple[int, ...]) -> str:
    """``parts`` (one per direction, None = zero) stacked on a new first axis."""
    if all(p is None for p in parts):
        return e.const(np.zeros((len(parts), *shape), dtype=e.value_dtype), "zeros")
    zero = None
    rows = []
    for p in parts:
        if p is None:
            zero = zero or e.const(np.zeros(shape, dtype=e.value_dtype), "zeros")
            p = zero
        rows.append(e.reshape(p, (1, *shape)))
    return e.concat(rows, 0)


def _sequence(e: _Emitter, node: Node, ps: list[_Direction], x2d: str, dims, revs) -> None:  # noqa: ANN001
    """The whole layer as one ``graphopt::RNNSequence`` node (the time loop inside the
    kernel, :mod:`graphopt.lower._rnn_sequence`), after one input-projection GEMM for
    all directions ([rows, D*G*H]); Y, Y_h and Y_c are views and slices of its outputs."""
    seq, batch, hidden = dims
    layout = int(node.attrs.get("layout", 0))
    lstm = node.op_type == "LSTM"
    n_dirs = len(ps)
    wt = e.concat([p.wt for p in ps], 1)  # [input, D*G*H]
    gh = e.shape(ps[0].wt)[1]
    bias = None
    if any(p.bias is not None for p in ps):
        bias = e.reshape(_stacked(e, [p.bias for p in ps], (gh,)), (n_dirs * gh,))
    xw = e.add(e.matmul(x2d, wt), bias)
    e.stats["input_projections"] += 1
    packs = [_packed(e.graph.constants[p.rt], hidden) for p in ps]
    block = packs[0][1]
    inputs = [xw, _stacked(e, [p.h0 for p in ps], (batch, hidden))]
    if lstm:
        inputs.append(_stacked(e, [p.c0 for p in ps], (batch, hidden)))
    inputs.append(e.const(np.ascontiguousarray(np.stack([a for a, _ in packs])), "rseq"))
    if node.op_type == "GRU" and any(p.rbh is not None for p in ps):
        inputs.append(_stacked(e, [p.rbh for p in ps], (hidden,)))
    ys = e.fresh("ys")
    e.graph.values[ys] = Value(ys, (seq, n_dirs, batch, hidden), "float32")
    outs = [ys]
    if lstm:
        outs.append(e.fresh("c_last"))
        e.graph.values[outs[1]] = Value(outs[1], (n_dirs, batch, hidden), "float32")
    attrs = {
        "cell": node.op_type,
        "seq": seq,
        "block": block,
        "activations": [a for p in ps for a in p.acts],
        "reverse": [int(r) for r in revs],
        # row of (t, b) in the projection: X is [seq, batch, in] (layout 0) or [batch, seq, in]
        "row_t": 1 if layout else batch,
        "row_b": seq if layout else 1,
    }
    e.graph.add_node(Node(e.fresh("seq"), "RNNSequence", inputs, outs, attrs, GRAPHOPT_DOMAIN))
    e.stats["sequence_kernels"] += 1

    outputs = list(node.outputs) + [""] * (3 - len(node.outputs))
    y, y_h, y_c = outputs[:3]
    graph = e.graph

    def used(name: str) -> bool:
        return bool(name) and (name in graph.outputs or bool(graph.consumers(name)))

    def to_layout(x: str, out: str, perm: list[int]) -> None:
        if layout:  # batch first
            shape = tuple(e.shape(x)[i] for i in perm)
            e.emit("Transpose", [x], shape, attrs={"perm": perm}, out=out)
        else:
            e.reshape(x, e.shape(x), out=out)

    if used(y):  # [seq, D, B, H], or [B, seq, D, H] for layout 1
        to_layout(ys, y, [2, 0, 1, 3])
    if used(y_h):  # the last state of each direction: time seq-1 forward, 0 reversed
        last = []
        for d, rev in enumerate(revs):
            t = 0 if rev else seq - 1
            one = e.slice(e.slice(ys, 0, t, t + 1), 1, d, d + 1)
            last.append(e.reshape(one, (1, batch, hidden)))
        to_layout(e.concat(last, 0), y_h, [1, 0, 2])
    if lstm and used(y_c):
        to_layout(outs[1], y_c, [1, 0, 2])


@dataclass(frozen=True)
class ExpandRNN(Pass):
    """Unroll LSTM/GRU/RNN into MatMul + elementwise ops, one input GEMM per direction."""

    name = "expand-rnn"
    after = ("fold-constants",)
    # One graphopt::RNNStep kernel per step where the cell allows (see _fusable). None: the
    # target chooses (its ``PASS_DEFAULTS``, filled in by ``graphopt.prepare``): on for the
    # CPU targets, which schedule that kernel (targets/_gemv.py), off for CUDA, whose TVM
    # GPU rules refuse its multi-gate epilogue; None left unfilled (no target, e.g.
    # ``graphopt inspect``) is off. Off, every step is primitive ops (which onnxruntime
    # can also run: RNNStep has no ONNX definition).
    fuse_steps: bool | None = None
    # The whole layer as one graphopt::RNNSequence kernel (the time loop inside it) where
    # every direction allows (see _fusable): first choice when on, before fuse_steps.
    # None: the target chooses, as for fuse_steps (on for x86 and ARM, off for CUDA).
    sequence: bool | None = None

    def run(self, graph: Graph) -> PassResult:
        targets = [n for n in graph.nodes() if n.op_type in _CELLS and not n.domain]
        refused = [(n.op_type, n.name, why) for n in targets if (why := check(graph, n))]
        if refused:
            raise UnsupportedOpsError(refused)
        stats: Counter = Counter()
        for node in targets:
            stats += _expand(graph, node, bool(self.fuse_steps), bool(self.sequence))
            stats[node.op_type] += 1
        return PassResult(graph, bool(targets), stats)
