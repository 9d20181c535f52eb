"""One kernel for a whole recurrent layer (``graphopt::RNNSequence``, made by expand-rnn):
every time step of every direction, the loop over time inside the kernel.

An unrolled recurrence costs a VM call (or three) per step, and each call starts a
parallel region and reads the recurrent weight again; at T = 512 that fixed cost is
larger than the arithmetic. Here the time loop is TIR, so a step costs its GEMV and its
gate math, nothing else::

    hb[0] = h0; cb = c0                                 # state, double-buffered
    for t in 0 .. T-1:                                  # (for d in parallel(D) outside
      for (d, j) in weight blocks (parallel when big):  #  it when bidirectional)
        acc[:, 0:G*U] = hb[t%2, d, b, :] @ rp[d, j]     # the recurrent GEMV, in registers
        gates of units j*U .. j*U+U-1 from xw[row(t, b)] + acc   # activations, C_t, H_t
        hb[(t+1)%2, d, b, units] = ys[t', d, b, units] = H_t   # t' = t, or T-1-t reversed

``rp`` [D, H/U, H, G*U] is R^T packed as for the fused step (U columns of every gate side
by side, ``expand_rnn._pack_steps``), ``xw`` [rows, D*G*H] the input projection of every
step and direction (one GEMM). The activations are TOPI's ``fast_exp``/``fast_tanh``
polynomials (``lower/_fastmath.py``), the ones the CPU legalization gives the unrolled
expansion, so both compute the same numbers up to FMA contraction and summation order.

How the loops run in parallel:

- bidirectional: one direction per core for the whole sequence, no barrier per step
  (the two directions never read each other's state);
- one direction with a weight of ``PARALLEL_MIN_BYTES`` or more (an LSTM of hidden 256:
  1 MB): each step's weight blocks split across the cores (one parallel region per step,
  each core always the same blocks, so its share of the weight stays in its L2);
- otherwise serial: a small weight sits in one core's L2 and a parallel region per step
  would cost more than it saves.

:func:`sequence_func` builds the kernel from a :class:`Spec`; with ``lanes=None`` it is a
plain loop nest (what lowering emits, any target can run it), with the lanes of a SIMD
register it is vectorized and parallel as above (what the CPU rule
``graphopt.targets._gemv.rule_rnn_sequence`` substitutes, from the spec carried in the
function's ``graphopt.rnn_sequence`` attribute).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from graphopt.lower._fastmath import f32 as _f
from graphopt.lower._fastmath import fast_exp_expr, fast_tanh_expr

__all__ = ["ATTR", "PARALLEL_MIN_BYTES", "Spec", "gates", "plan", "sequence_func", "spec_of"]

ATTR = "graphopt.rnn_sequence"  # the Spec as JSON, on the PrimFunc
# Recurrent weights of at least this many bytes (one direction) split each step's GEMV
# across the cores (see the module docstring); the fused step kernel uses the same bound.
PARALLEL_MIN_BYTES = 256 * 1024
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def gates(cell: str) -> int:
    return _GATES[cell]


@dataclass(frozen=True)
class Spec:
    """Everything the kernel's code depends on (shapes, cell, activations, row order)."""

    cell: str  # LSTM | GRU (linear_before_reset=1) | RNN
    seq: int
    batch: int
    hidden: int
    block: int  # U: hidden units per packed weight block
    reverse: tuple[bool, ...]  # per direction
    acts: tuple[tuple[str, ...], ...]  # per direction: Sigmoid | Tanh | Relu
    row_t: int  # row of (t, b) in xw: t * row_t + b * row_b
    row_b: int
    rbh: bool = False  # GRU: a recurrent bias of the candidate gate, [D, H]

    @property
    def dirs(self) -> int:
        return len(self.reverse)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def spec_of(func: tirx.PrimFunc) -> Spec | None:
    """The Spec a lowered sequence kernel carries, or None for any other function."""
    if func.attrs is None or ATTR not in func.attrs:
        return None
    raw = json.loads(str(func.attrs[ATTR]))
    raw["reverse"] = tuple(raw["reverse"])
    raw["acts"] = tuple(tuple(a) for a in raw["acts"])
    return Spec(**raw)


def _act(name: str, x: tirx.PrimExpr) -> tirx.PrimExpr:
    if name == "Sigmoid":
        return _f(1.0) / (_f(1.0) + fast_exp_expr(-x))
    if name == "Tanh":
        return fast_tanh_expr(x)
    return tirx.max(x, _f(0.0))


# --- the kernel ----------------------------------------------------------------------
def _loop(kind: str, n: int):  # noqa: ANN202 - a loop frame of the IR builder
    return {"serial": T.serial, "parallel": T.parallel, "unroll": T.unroll}[kind](0, n)


def plan(spec: Spec, lanes: int | None) -> dict:
    """How the loops run (see the module docstring): the parallel mode and the number of
    weight blocks per pass (two give 2*G*U/lanes independent FMA chains, when that many
    accumulators fit the 16 architectural vector registers with room to spare)."""
    if lanes is None:
        return {"mode": "serial", "pair": 1, "lanes": None}
    n_blocks = spec.hidden // spec.block
    cols = gates(spec.cell) * spec.block
    pair = 2 if n_blocks % 2 == 0 and 2 * cols <= 8 * lanes else 1
    weight = 4 * spec.hidden * gates(spec.cell) * spec.hidden
    if spec.dirs == 2:
        mode = "directions"
    elif weight >= PARALLEL_MIN_BYTES and n_blocks // pair > 1:
        mode = "blocks"
    else:
        mode = "serial"
    return {"mode": mode, "pair": pair, "lanes": lanes}


def sequence_func(spec: Spec, lanes: int | None = None) -> tirx.PrimFunc:
    """The kernel for ``spec``; params ``xw, h0, [c0], rp, [rbh], ys, [c_last]``."""
    p = plan(spec, lanes)
    cell, seq, batch, hidden, block = spec.cell, spec.seq, spec.batch, spec.hidden, spec.block
    n_gates, dirs = gates(cell), spec.dirs
    gh = n_gates * hidden
    cols = n_gates * block
    n_blocks, pair = hidden // block, p["pair"]
    rows = seq * batch
    f32 = "float32"
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("rnn_sequence")
            xw = T.arg("xw", T.buffer((rows, dirs * gh), f32))
            h0 = T.arg("h0", T.buffer((dirs, batch, hidden), f32))
            lstm = cell == "LSTM"
            c0 = T.arg("c0", T.buffer((dirs, batch, hidden), f32)) if lstm else None
            rp = T.arg("rp", T.buffer((dirs, n_blocks, hidden, cols), f32))
            rbh = T.arg("rbh", T.buffer((dirs, hidden), f32)) if spec.rbh else None
            ys = T.arg("ys", T.buffer((seq, dirs, batch, hidden), f32))
            c_last = (
                T.arg("c_last", T.buffer((dirs, batch, hidden), f32)) if c0 is not None else None
            )
            T.func_attr({"tirx.noalias": True, ATTR: spec.to_json()})
            hb = T.decl_buffer((2, dirs, batch, hidden), f32)
            cb = T.decl_buffer((dirs, batch, hidden), f32) if lstm else None
            _init_state(h0, c0, hb, cb)
            if p["mode"] == "directions":
                with T.parallel(0, dirs) as d:
                    with T.serial(0, seq) as t:
                        with T.serial(0, n_blocks // pair) as jo:
                            _step(spec, p, d, t, jo, xw, rp, rbh, hb, cb, ys)
            else:
                with T.serial(0, seq) as t:
                    outer = "parallel" if p["mode"] == "blocks" else "serial"
                    with _loop(outer, dirs * (n_blocks // pair)) as dj:
                        d = dj // (n_blocks // pair)
                        jo = dj % (n_blocks // pair)
                        _step(spec, p, d, t, jo, xw, rp, rbh, hb, cb, ys)
            if cb is not None:
                with T.grid(dirs, batch, hidden) as (d, b, n):
                    T.buffer_store(c_last, cb[d, b, n], [d, b, n])
    return ib.get()


def _init_state(h0, c0, hb, cb) -> None:  # noqa: ANN001
    dirs, batch, hidden = (int(v) for v in h0.shape)
    with T.grid(dirs, batch, hidden) as (d, b, n):
        T.buffer_store(hb, h0[d, b, n], [0, d, b, n])
        if cb is not None:
            T.buffer_store(cb, c0[d, b, n], [d, b, n])


def _vec(lanes: int | None, n: int):  # noqa: ANN202
    """The innermost loop over ``n`` contiguous floats: vectorized (LLVM splits a vector
    wider than a register), or serial for the plain nest."""
    return T.vectorized(0, n) if lanes else T.serial(0, n)


def _step(spec: Spec, p: dict, d, t, jo, xw, rp, rbh, hb, cb, ys) -> None:  # noqa: ANN001
    """Weight blocks ``jo*pair ...`` of direction ``d`` at step ``t``, every batch row.
    The accumulators are allocated here, inside the parallel loop: one set per core."""
    seq, hidden, block, pair = spec.seq, spec.hidden, spec.block, p["pair"]
    cols = gates(spec.cell) * block
    lanes = p["lanes"]
    if spec.dirs == 1:
        tt = seq - 1 - t if spec.reverse[0] else t
    else:  # direction 1 is the reverse one (ONNX bidirectional)
        tt = tirx.Select(d == 0, t, seq - 1 - t)
    cur = t % 2
    nxt = 1 - cur
    acc = T.decl_buffer((pair, cols), "float32", scope="local")
    with T.serial(0, spec.batch) as b:
        with T.unroll(0, pair) as i:
            with _vec(lanes, cols) as q:
                T.buffer_store(acc, _f(0.0), [i, q])
        with T.serial(0, hidden) as k:
            with T.unroll(0, pair) as i:
                with _vec(lanes, cols) as q:
                    j = jo * pair + i
                    T.buffer_store(acc, acc[i, q] + hb[cur, d, b, k] * rp[d, j, k, q], [i, q])
        row = tt * spec.row_t + b * spec.row_b
        with T.unroll(0, pair) as i:
            with _vec(lanes, block) as u:
                n = (jo * pair + i) * block + u
                _gate_math(spec, d, b, i, u, n, xw, row, rbh, hb, cb, cur, acc)
                T.buffer_store(ys, hb[nxt, d, b, n], [tt, d, b, n])


def _gate_math(spec, d, b, i, u, n, xw, row, rbh, hb, cb, cur, acc) -> None:  # noqa: ANN001
    """H_t (and C_t) of unit ``n`` into ``hb[1 - cur]`` (and ``cb``)."""
    hidden, block = spec.hidden, spec.block
    gh = gates(spec.cell) * hidden
    acts = spec.acts[0]
    if spec.dirs == 2 and spec.acts[0] != spec.acts[1]:
        # Per-direction activations: select between the two (both are computed).
        def act(k: int, x):  # noqa: ANN001, ANN202
            return tirx.Select(d == 0, _act(spec.acts[0][k], x), _act(spec.acts[1][k], x))
    else:

        def act(k: int, x):  # noqa: ANN001, ANN202
            return _act(acts[k], x)

    def pre(g: int):  # noqa: ANN202
        return xw[row, d * gh + g * hidden + n] + acc[i, g * block + u]

    nxt = 1 - cur
    if spec.cell == "LSTM":
        c = act(0, pre(2)) * cb[d, b, n] + act(0, pre(0)) * act(1, pre(3))
        T.buffer_store(cb, c, [d, b, n])
        T.buffer_store(hb, act(0, pre(1)) * act(2, cb[d, b, n]), [nxt, d, b, n])
    elif spec.cell == "GRU":  # linear_before_reset=1
        rec = acc[i, 2 * block + u]
        if rbh is not None:
            rec = rec + rbh[d, n]
        cand = act(1, xw[row, d * gh + 2 * hidden + n] + act(0, pre(1)) * rec)
        T.buffer_store(hb, cand, [nxt, d, b, n])
        cand, z = hb[nxt, d, b, n], act(0, pre(0))
        T.buffer_store(hb, cand + z * (hb[cur, d, b, n] - cand), [nxt, d, b, n])
    else:
        T.buffer_store(hb, act(0, pre(0)), [nxt, d, b, n])
