"""Per-conv packing into NCHW[x]c that never gives up on a whole model.

Relax's ``ConvertLayout`` converts a module all at once: one op without layout inference
for a blocked layout (a reshape after a Gemm in a squeeze-excitation block, a concat of
24 + 20 channels, a channel shuffle) raises, and the whole model stayed NCHW. This pass
walks the dataflow once, in order, and decides per binding:

- every 2-D float32 conv whose channel counts allow a block (dense, depthwise, grouped,
  dilated, the thin-input stem) becomes a packed conv ``NCHW[b]c`` / ``OIHW[b]i[b']o``,
  unless its output block would be narrow (2 or 4 lanes) on a map of more than one pixel;
- an op that can carry the packed layout (elementwise unary and binary ops, including
  broadcasts of a ``[N, C, 1, 1]`` SE gate or bias; pools; the spatial mean; pad; a
  concat or channel slice on block boundaries) runs packed when an operand arrives packed;
- every other op reads the plain NCHW value (a conv no block divides is then taken, in
  NCHW, by :mod:`graphopt.targets._conv3d`'s zero-padded ``conv2d_padded`` kernel).

Each packed value also gets its plain NCHW twin (one ``layout_transform``), bound to the
original variable; DeadCodeElimination drops the twins nobody reads, so a transform is
left only on an edge whose consumer cannot carry the layout. Packed values are cached per
(variable, block), so a tensor is converted at most once per block it is read in.
Weight and bias transforms act on constants: FoldConstant packs them at compile time.
"""

from __future__ import annotations

import tvm
from tvm import relax

__all__ = ["PackNCHWc", "channel_block", "conv_family"]

_UNARY = {
    "relax.nn.relu",
    "relax.nn.silu",
    "relax.nn.gelu",
    "relax.nn.gelu_tanh",
    "relax.nn.leakyrelu",
    "relax.sigmoid",
    "relax.tanh",
    "relax.exp",
    "relax.log",
    "relax.sqrt",
    "relax.rsqrt",
    "relax.negative",
    "relax.abs",
    "relax.erf",
    "relax.clip",
    "relax.square",
    "relax.astype",
}
_BINARY = {
    "relax.add",
    "relax.subtract",
    "relax.multiply",
    "relax.divide",
    "relax.maximum",
    "relax.minimum",
    "relax.power",
}
_POOLS = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d"}


def _shape(expr) -> list[int] | None:  # noqa: ANN001
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return [int(d) for d in shape.values]
    except (TypeError, AttributeError):
        return None


def _dtype(expr) -> str:  # noqa: ANN001
    return str(getattr(expr.ty, "dtype", ""))


def channel_block(channels: int, lanes: int, *divides: int) -> int | None:
    """The block for ``channels``: the first of ``lanes``, 8, 4, 2 that divides it (and
    every one of ``divides``); None if none does."""
    for b in dict.fromkeys((lanes, 8, 4, 2)):
        if channels % b == 0 and all(d % b == 0 for d in divides):
            return b
    return None


def conv_family(call) -> str | None:  # noqa: ANN001
    """'dense', 'depthwise' or 'grouped' for a 2-D NCHW/OIHW float32 conv, else None."""
    a = call.attrs
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None
    data, weight = _shape(call.args[0]), _shape(call.args[1])
    if data is None or weight is None or len(data) != 4 or len(weight) != 4:
        return None
    if _dtype(call.args[0]) != "float32" or _dtype(call.args[1]) != "float32":
        return None
    groups = int(a.groups)
    if groups == 1:
        return "dense"
    if groups == data[1] == weight[0] and weight[1] == 1:
        return "depthwise"
    return "grouped"


def _conv_blocks(call, lanes: int) -> tuple[int, int] | None:  # noqa: ANN001
    """(input block, output block) for a conv we pack, else None."""
    family = conv_family(call)
    if family is None:
        return None
    cin, cout = _shape(call.args[0])[1], _shape(call.args[1])[0]
    if family == "depthwise":
        b = channel_block(cout, lanes)
        return None if b is None or (_narrow(b, lanes) and _spatial(call)) else (b, b)
    if family == "grouped":
        groups = int(call.attrs.groups)
        b = channel_block(cout, lanes, cin // groups, cout // groups)
        return None if b is None else (b, b)
    bo = channel_block(cout, lanes)
    bi = channel_block(cin, lanes)
    if bi is None and cin < 8:  # a thin input (an RGB image): the whole axis innermost
        bi = cin
    if bi is None or bo is None or (_narrow(bo, lanes) and _spatial(call)):
        return None
    return (bi, bo)


def _narrow(block: int, lanes: int) -> bool:
    """A vectorized (output) block of 2 or 4 lanes: ShuffleNetV2's 58 and 116 channels.

    Why: such a conv ran at a quarter of the vector width (ShuffleNetV2 5.2 ms); left in
    NCHW, :mod:`graphopt.targets._conv3d`'s kernel zero-pads its output channels to full
    vectors (3.2 ms, both on a Zen 4)."""
    return block < min(8, lanes)


def _spatial(call) -> bool:  # noqa: ANN001
    """Whether the conv's input has more than one pixel: a squeeze-excitation conv on the
    pooled 1x1 map is tiny and stays packed, where its gate multiply fuses."""
    data = _shape(call.args[0])
    return data[2] * data[3] > 1


def _to_packed(x: relax.Expr, block: int, from_block: int | None = None) -> relax.Expr:
    """layout_transform from NCHW (or NCHW[from_block]c) to NCHW[block]c."""
    if from_block is None:
        return relax.op.layout_transform(
            x, index_map=lambda n, c, h, w: (n, c // block, h, w, c % block)
        )
    return relax.op.layout_transform(
        x,
        index_map=lambda n, co, h, w, ci: (
            n,
            (co * from_block + ci) // block,
            h,
            w,
            (co * from_block + ci) % block,
        ),
    )


def _to_plain(x: relax.Expr, block: int) -> relax.Expr:
    return relax.op.layout_transform(
        x, index_map=lambda n, co, h, w, ci: (n, co * block + ci, h, w)
    )


def _pack_weight(w: relax.Expr, bi: int, bo: int) -> relax.Expr:
    """OIHW -> OIHW[bi]i[bo]o."""
    return relax.op.layout_transform(
        w,
        index_map=lambda o, i, h, k: (o // bo, i // bi, h, k, i % bi, o % bo),
    )


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        # original (remapped) NCHW var -> {block: packed var}; a packed var's block
        self.packed: dict = {}
        self.block_of: dict = {}

    # -- helpers --------------------------------------------------------------------
    def _get(self, x: relax.Expr, block: int) -> relax.Expr:
        """``x`` (an NCHW tensor) in NCHW[block]c, converting once per block."""
        have = self.packed.setdefault(x, {})
        if block in have:
            return have[block]
        if have:  # reblock from a packed copy rather than from NCHW
            src_block, src = next(iter(have.items()))
            new = self.builder_.emit(_to_packed(src, block, src_block))
        else:
            new = self.builder_.emit(_to_packed(x, block))
        have[block] = new
        return new

    def _block(self, x: relax.Expr) -> int | None:
        """The block ``x`` is already available in (its first), or None."""
        have = self.packed.get(x)
        return next(iter(have)) if have else None

    def _finish(self, binding: relax.VarBinding, packed_expr: relax.Expr, block: int) -> None:
        """Emit the packed value and bind the original var to its NCHW twin."""
        packed = self.builder_.emit(packed_expr)
        plain = self.builder_.normalize(_to_plain(packed, block))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, plain))
        self.packed[binding.var] = {block: packed}

    # -- the walk -------------------------------------------------------------------
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = self.visit_expr(binding.value)
        try:
            done = self._rewrite(binding, value)
        except (RuntimeError, ValueError, TypeError):  # an op that refuses the layout
            done = False
        if not done:
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    def _rewrite(self, binding: relax.VarBinding, value: relax.Expr) -> bool:
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return False
        name = value.op.name
        if name == "relax.nn.conv2d":
            return self._conv(binding, value)
        out = _shape(binding.var)
        if out is None or len(out) != 4:
            return False
        if name in _UNARY:
            return self._unary(binding, value)
        if name in _BINARY:
            return self._binary(binding, value, out)
        if name in _POOLS or name == "relax.nn.adaptive_avg_pool2d":
            return self._pool(binding, value)
        if name == "relax.mean":
            return self._mean(binding, value)
        if name == "relax.nn.pad":
            return self._pad(binding, value)
        if name == "relax.concat":
            return self._concat(binding, value, out)
        if name == "relax.strided_slice":
            return self._slice(binding, value)
        return False

    def _conv(self, binding: relax.VarBinding, call: relax.Call) -> bool:
        blocks = _conv_blocks(call, self.lanes)
        if blocks is None:
            return False
        bi, bo = blocks
        a = call.attrs
        depthwise = conv_family(call) == "depthwise"
        weight = call.args[1]
        if depthwise:  # [C, 1, kh, kw] -> [C/b, 1, kh, kw, 1, b]
            packed_w = relax.op.layout_transform(
                weight, index_map=lambda o, i, h, k: (o // bo, i, h, k, o % bo)
            )
            packed_w = relax.op.expand_dims(self.builder_.emit(packed_w), axis=4)
        else:
            packed_w = _pack_weight(weight, bi, bo)
        kernel_layout = f"OIHW1i{bo}o" if depthwise else f"OIHW{bi}i{bo}o"
        conv = relax.op.nn.conv2d(
            self._get(call.args[0], bi),
            self.builder_.emit(packed_w),
            strides=list(a.strides),
            padding=list(a.padding),
            dilation=list(a.dilation),
            groups=int(a.groups),
            data_layout=f"NCHW{bi}c",
            kernel_layout=kernel_layout,
            out_layout=f"NCHW{bo}c",
            out_dtype=None if str(a.out_dtype) in ("", "void", "None") else str(a.out_dtype),
        )
        self._finish(binding, conv, bo)
        return True

    def _unary(self, binding: relax.VarBinding, call: relax.Call) -> bool:
        block = self._block(call.args[0])
        if block is None:
            return False
        args = [self._get(call.args[0], block), *call.args[1:]]
        self._finish(binding, relax.Call(call.op, args, call.attrs), block)
        return True

    def _binary(self, binding: relax.VarBinding, call: relax.Call, out: list[int]) -> bool:
        blocks = [self._block(x) for x in call.args]
        block = next((b for b, x in zip(blocks, call.args, strict=True)
                      if b is not None and _shape(x) == out), None)  # fmt: skip
        if block is None:
            return False
        args = []
        for x in call.args:
            shape = _shape(x)
            if shape is None:
                return False
            if len(shape) == 4 and shape[1] == out[1] and out[1] % block == 0:
                args.append(self._get(x, block))
            elif len(shape) == 4 and shape[1] == 1:
                # broadcast over channels: [N, 1, H, W] -> [N, 1, H, W, 1]
                args.append(self.builder_.emit(relax.op.expand_dims(x, axis=4)))
            elif len(shape) <= 1 and _prod(shape) == 1:
                args.append(x)  # a scalar broadcasts in any layout
            else:
                return False
        self._finish(binding, relax.Call(call.op, args, call.attrs), block)
        return True

    def _pool(self, binding: relax.VarBinding, call: relax.Call) -> bool:
        a = call.attrs
        block = self._block(call.args[0])
        if block is None or str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW":
            return False
        x = self._get(call.args[0], block)
        layout = f"NCHW{block}c"
        if call.op.name == "relax.nn.adaptive_avg_pool2d":
            size = None if a.output_size is None else [int(s) for s in a.output_size]
            new = relax.op.nn.adaptive_avg_pool2d(x, size, layout=layout, out_layout=layout)
        else:
            make = (
                relax.op.nn.max_pool2d
                if call.op.name == "relax.nn.max_pool2d"
                else (relax.op.nn.avg_pool2d)
            )
            new = make(
                x,
                pool_size=[int(v) for v in a.pool_size],
                strides=[int(v) for v in a.strides],
                padding=[int(v) for v in a.padding],
                dilation=[int(v) for v in a.dilation],
                ceil_mode=bool(a.ceil_mode),
                count_include_pad=bool(a.count_include_pad),
                layout=layout,
                out_layout=layout,
            )
        self._finish(binding, new, block)
        return True

    def _mean(self, binding: relax.VarBinding, call: relax.Call) -> bool:
        a = call.attrs
        block = self._block(call.args[0])
        axes = None if a.axis is None else sorted(int(v) % 4 for v in a.axis)
        if block is None or axes != [2, 3] or not bool(a.keepdims):
            return False
        x = self._get(call.args[0], block)
        self._finish(binding, relax.op.mean(x, axis=[2, 3], keepdims=True), block)
        return True

    def _pad(self, binding: relax.VarBinding, call: relax.Call) -> bool:
        a = call.attrs
        block = self._block(call.args[0])
        width = [int(v) for v in a.pad_width]
        if block is None or len(width) != 8 or any(width[:4]):
            return False
        x = self._get(call.args[0], block)
        mode = str(a.pad_mode)
        new = relax.op.nn.pad(x, [*width, 0, 0], pad_mode=mode, pad_value=float(a.pad_value))
        self._finish(binding, new, block)
        return True

    def _concat(self, binding: relax.VarBinding, call: relax.Call, out: list[int]) -> bool:
        if int(call.attrs.axis) % 4 != 1:
            return False
        parts = list(call.args[0].fields) if isinstance(call.args[0], relax.Tuple) else None
        if not parts or all(self._block(p) is None for p in parts):
            return False
        shapes = [_shape(p) for p in parts]
        if any(s is None or len(s) != 4 for s in shapes):
            return False
        block = channel_block(out[1], self.lanes, *(s[1] for s in shapes))
        if block is None:
            return False
        packed = [self._get(p, block) for p in parts]
        self._finish(binding, relax.op.concat(packed, axis=1), block)
        return True

    def _slice(self, binding: relax.VarBinding, call: relax.Call) -> bool:
        block = self._block(call.args[0])
        if block is None:
            return False
        axes, begin, end = (_ints(call.args[i]) for i in (1, 2, 3))
        strides = _ints(call.args[4]) if len(call.args) > 4 else None
        if axes is None or begin is None or end is None or [a % 4 for a in axes] != [1]:
            return False
        if strides not in (None, [1]) or begin[0] % block or end[0] % block:
            return False
        channels = _shape(call.args[0])[1]
        if begin[0] < 0 or end[0] > channels:
            return False
        x = self._get(call.args[0], block)
        new = relax.op.strided_slice(x, axes=[1], begin=[begin[0] // block], end=[end[0] // block])
        self._finish(binding, new, block)
        return True


def _ints(expr) -> list[int] | None:  # noqa: ANN001
    if isinstance(expr, (relax.Tuple, tvm.ir.expr.Tuple)):
        vals = [getattr(f, "value", None) for f in expr.fields]
    elif isinstance(expr, relax.ShapeExpr):
        vals = list(expr.values)
    else:
        return None
    try:
        return [int(v) for v in vals]
    except (TypeError, ValueError):
        return None


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def PackNCHWc(lanes: int) -> tvm.transform.Pass:  # noqa: N802 - a pass, named like TVM's
    """Pack every conv that allows it into NCHW[b]c (b = ``lanes``, 8, 4 or 2 per tensor);
    see the module docstring. Put before LegalizeOps."""

    @tvm.transform.module_pass(opt_level=0, name="graphopt.PackNCHWc")
    def pack(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: ANN001
        packer = _Packer(mod, lanes)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                packer.packed.clear()
                new = packer.visit_expr(func)
                packer.builder_.update_func(gvar, new)
        out = packer.builder_.finalize()
        return relax.transform.DeadCodeElimination()(out)

    return pack
