"""The recurrent-layer converter: ``aten.lstm``/``gru``/``rnn_tanh``/``rnn_relu`` (what
``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` export to) into ONNX ``LSTM``/``GRU``/``RNN`` nodes.

One ONNX node per layer, both directions in each, with torch's gate order converted to
ONNX's::

    LSTM  torch i f g o  ->  ONNX i o f c
    GRU   torch r z n    ->  ONNX z r h   (linear_before_reset=1, as torch computes it)

so the ``expand-rnn`` pass unrolls them like any imported ONNX model. These ops are kept
out of ``run_decompositions`` (whose result would be an already unrolled loop) and never
evaluated at import. ``RECURRENT_OPS`` at the bottom is this module's part of the
``ATEN`` table.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx

from graphopt.frontends.torch._builder import Convert, GraphBuilder, Refuse
from graphopt.ir import Node, Value

__all__ = ["RECURRENT_OPS"]

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


def _recurrent(imp: GraphBuilder, node: torch.fx.Node):
    """A torch LSTM/GRU/RNN call: one ONNX node per layer, both directions in each.

    Batch-first input uses ONNX ``layout=1``, so neither layout transposes the sequence;
    states stay in torch's ``[layers*dirs, batch, hidden]`` outside the nodes.
    """
    op, order, act = _RECURRENT[str(node.target)]
    x, hx, params, has_biases, layers, dropout, train, bidir, batch_first = node.args[:9]
    layers, dirs = int(layers), 2 if bidir else 1
    if train and float(dropout) > 0 and layers > 1:
        raise Refuse("training-mode dropout between layers is not supported")
    per_dir = 4 if has_biases else 2
    if len(params) != layers * dirs * per_dir:
        raise Refuse("LSTM projections (proj_size > 0) are not supported")
    if not all(imp.is_const(p) for p in params):
        raise Refuse("recurrent weights must be parameters or constants")
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
        outs = [imp.fresh(f"{tag}_Y") if (not last or 0 in used) else ""]
        for k in range(len(states)):
            outs.append(imp.fresh(f"{tag}_Y{'hc'[k]}") if k + 1 in used else "")
        while outs and not outs[-1]:
            outs.pop()
        for name, shape in zip(outs, [y_shape] + [s_shape] * len(states), strict=False):
            if name:
                imp.graph.values[name] = Value(name, shape, dtype)
        imp.graph.add_node(Node(imp.fresh(f"{op}_{tag}"), op, inputs, outs, attrs))
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
    imp: GraphBuilder, state: torch.fx.Node, layer: int, dirs: int, layout: int, tag: str
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


# ATen overload name -> converter, for the recurrent layers.
RECURRENT_OPS: dict[str, Convert] = dict.fromkeys(_RECURRENT, _recurrent)
