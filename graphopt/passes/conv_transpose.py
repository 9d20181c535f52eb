"""Rewrite a 2-D ``ConvTranspose`` as one ``Conv`` and a ``DepthToSpace`` (sub-pixel form).

Why: a transposed conv has no packed schedule of its own; lowered as it is, TVM computes
it as a conv over its input with ``stride - 1`` zeros between pixels, and graphopt's CPU
schedules gave that to the generic reduction rule (a fallback warning, 0% fast-path
coverage). Written as a plain conv it takes the packed conv rules on every CPU target,
fuses its bias and activation like any conv, and does no multiply by an inserted zero.

The identity (stride ``s``, kernel ``k``, per spatial axis; ``K = ceil(k / s)``): output
pixel ``o = q * s + r`` of the uncropped transposed conv takes the kernel taps
``t = r + s * m`` only, from input pixel ``q - m``. So each of the ``s * s`` phases
``(ry, rx)`` is a stride-1 ``K x K`` conv of the input (padded ``K - 1`` on each side)
with the taps of that phase, flipped; the ``s * s`` phases are one conv of
``s * s * C_out`` output channels, ordered ``(ry, rx, c)`` as ``DepthToSpace`` (mode
DCR) interleaves them back into pixels. The ``pads`` crop comes off the conv's own
padding where it covers whole phases, and a ``Slice`` takes the rest. The bias repeats
per phase; pixels no tap reaches (``output_padding``) get the bias alone, as
``ConvTranspose`` gives them.

With ``group`` > 1 (a depthwise transposed conv, say) each phase is a conv of its own,
grouped as the original, and a ``Concat`` of the ``s * s`` phases gives the (ry, rx, c)
order: one grouped conv of all phases would be a grouped conv of ``s * s`` times the
outputs per group, which no packed rule takes.

Declined (left as ``ConvTranspose``): weights that are not constants, dilations,
``auto_pad`` SAME_*, ``output_shape``, different strides per axis, not 2-D, not static.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from graphopt.ir import Graph, Node
from graphopt.ir_builder import IRBuilder
from graphopt.passes._base import Pass, PassResult

__all__ = ["ConvTransposeToConv", "check", "subpixel_weight"]


def check(graph: Graph, node: Node) -> str | None:
    """Why ``node`` (a ConvTranspose) cannot be rewritten, or None when it can."""
    x, w = graph.values.get(node.inputs[0]), graph.values.get(node.inputs[1])
    if not graph.is_constant(node.inputs[1]):
        return "weight is not a constant"
    if len(node.inputs) > 2 and node.inputs[2] and not graph.is_constant(node.inputs[2]):
        return "bias is not a constant"
    if x is None or not x.is_static or len(x.shape) != 4 or w is None or len(w.shape) != 4:
        return "not a 2-D transposed conv of static shape"
    a = node.attrs
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        return "dilated"
    if node.attr_str("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in a:
        return "auto_pad SAME or output_shape"
    strides = a.get("strides", [1, 1])
    if strides[0] != strides[1]:
        return "different strides per axis"
    pads = a.get("pads", [0, 0, 0, 0])
    kernel = w.shape[2:]
    if any(p >= strides[0] * _taps(k, strides[0]) for p, k in zip(pads[:2], kernel, strict=True)):
        return "padding past the kernel"
    return None


def _taps(k: int, s: int) -> int:
    return -(-k // s)  # ceil(k / s): the taps of one phase


def subpixel_weight(w: np.ndarray, s: int) -> np.ndarray:
    """``w`` (ConvTranspose ``[C_in, C_out, kh, kw]``) as the weight of the one conv of all
    ``s * s`` phases: ``[s * s * C_out, C_in, Kh, Kw]``, channels ordered (ry, rx, c)."""
    cin, cout, kh, kw = w.shape
    th, tw = _taps(kh, s), _taps(kw, s)
    padded = np.zeros((cin, cout, th * s, tw * s), w.dtype)
    padded[:, :, :kh, :kw] = w
    # tap t = m * s + r: axes (ci, co, m_h, r_h, m_w, r_w); a conv reads its taps flipped
    taps = padded.reshape(cin, cout, th, s, tw, s)[:, :, ::-1, :, ::-1, :]
    out = taps.transpose(3, 5, 1, 0, 2, 4)  # (r_h, r_w, co, ci, m_h, m_w)
    return np.ascontiguousarray(out.reshape(s * s * cout, cin, th, tw))


def _axis_plan(size: int, k: int, s: int, pad_begin: int, out: int) -> tuple[int, int, int, int]:
    """One spatial axis: (conv pad begin, conv pad end, conv output size, crop start after
    DepthToSpace). Phase outputs ``q`` below ``pad_begin // s`` are never read: the conv's
    begin padding drops them."""
    taps = _taps(k, s)
    first = pad_begin // s  # first phase output q the crop reads
    last = (pad_begin + out - 1) // s  # last one
    begin = taps - 1 - first
    end = max(last - size + 1, 0)
    conv_out = size + begin + end - taps + 1
    return begin, end, conv_out, pad_begin - s * first


@dataclass(frozen=True)
class ConvTransposeToConv(Pass):
    """Rewrite 2-D ConvTranspose as Conv + DepthToSpace (+ Slice): the packed conv rules."""

    name = "conv-transpose-to-conv"
    after = ("fold-batchnorm",)

    def run(self, graph: Graph) -> PassResult:
        stats: Counter = Counter()
        for node in graph.nodes():
            if node.op_type != "ConvTranspose" or node.domain:
                continue
            why = check(graph, node)
            if why is not None:
                stats[f"declined: {why}"] += 1
                continue
            _rewrite(graph, node)
            stats["rewritten"] += 1
        return PassResult(graph, stats["rewritten"] > 0, stats)


def _rewrite(graph: Graph, node: Node) -> None:
    a = node.attrs
    x, result = node.inputs[0], node.outputs[0]
    n, _, h, wd = graph.values[x].shape
    dtype = graph.values[x].dtype
    w = graph.constants[node.inputs[1]]
    bias = graph.constants[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] else None
    s = a.get("strides", [1, 1])[0]
    groups = a.get("group", 1)
    cout_g, kh, kw = w.shape[1:]
    cout = cout_g * groups
    th, tw = _taps(kh, s), _taps(kw, s)
    pads = a.get("pads", [0, 0, 0, 0])
    extra = a.get("output_padding", [0, 0])
    out_hw = [
        s * (size - 1) + e + k - pb - pe
        for size, e, k, pb, pe in zip((h, wd), extra, (kh, kw), pads[:2], pads[2:], strict=True)
    ]
    plans = [
        _axis_plan(size, k, s, pb, o)
        for size, k, pb, o in zip((h, wd), (kh, kw), pads[:2], out_hw, strict=True)
    ]
    (ph0, ph1, qh, crop_h), (pw0, pw1, qw, crop_w) = plans
    crop = (crop_h, crop_w, qh * s, qw * s) != (0, 0, *out_hw)
    # (phase, group, c_out / g, c_in / g, Kh, Kw): per group, its phases' weights
    per_group = [
        subpixel_weight(wg, s).reshape(s * s, cout_g, -1, th, tw) for wg in np.split(w, groups)
    ]
    weight = np.stack(per_group, axis=1)
    if groups == 1:  # one conv of every phase: channels (ry, rx, c)
        tiled = None if bias is None else np.tile(bias, s * s)
        parts = [(weight.reshape(s * s * cout, -1, th, tw), tiled)]
    else:  # a grouped conv per phase
        parts = [(weight[r].reshape(cout, -1, th, tw), bias) for r in range(s * s)]
    graph.remove_node(node.name)
    b = IRBuilder(graph, prefix=node.name)
    conv_attrs = {"kernel_shape": [th, tw], "pads": [ph0, pw0, ph1, pw1]}
    if groups > 1:
        conv_attrs["group"] = groups
    last = result if s == 1 and not crop else None  # the conv writes the result itself

    def conv(wr: np.ndarray, br: np.ndarray | None, out: str | None = None) -> str:
        inputs = [x, b.const(wr, "w")] + ([] if br is None else [b.const(br, "b")])
        return b.emit("Conv", inputs, (n, wr.shape[0], qh, qw), dtype, conv_attrs, out=out)

    if len(parts) == 1:
        y = conv(*parts[0], out=last)
    else:
        phases = [conv(wr, br) for wr, br in parts]
        y = b.emit("Concat", phases, (n, s * s * cout, qh, qw), dtype, {"axis": 1}, out=last)
    if s > 1:
        d2s = {"blocksize": s, "mode": b"DCR"}
        y = b.emit(
            "DepthToSpace", [y], (n, cout, qh * s, qw * s), dtype, d2s, out=None if crop else result
        )
    if crop:
        bounds = ([crop_h, crop_w], [crop_h + out_hw[0], crop_w + out_hw[1]], [2, 3])
        consts = [b.const(np.array(v, np.int64), "i") for v in bounds]
        b.emit("Slice", [y], (n, cout, *out_hw), dtype, out=result, const_inputs=consts)
