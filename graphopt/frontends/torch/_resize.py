"""ATen converters for upsampling (``F.interpolate``, ``nn.Upsample``): one ONNX ``Resize`` each.

torch's source coordinate for output index ``d`` along a dim of input length ``n``, output
length ``m`` and scale ``s`` (the ``scale_factor`` when one is given, else ``m / n``), with
the ONNX ``Resize`` attributes that compute the same:

==========================  ==============================  =====================================
torch op                    source coordinate               ONNX coordinate_transformation_mode
==========================  ==============================  =====================================
nearest                     ``floor(d / s)``                ``asymmetric``, nearest_mode ``floor``
nearest-exact               ``floor((d + 0.5) / s)``        ``half_pixel``, ``round_prefer_ceil``
linear/cubic, align=False   ``(d + 0.5) / s - 0.5``         ``half_pixel``
linear/cubic, align=True    ``d * (n - 1) / (m - 1)``       ``align_corners``
==========================  ==============================  =====================================

(linear clamps a negative coordinate to 0 in both; cubic uses ``a = -0.75`` in both.) Where
``s`` is the user's ``scale_factor`` it can differ from ``m / n`` (``n * s`` not an integer),
so the given scales go to ``Resize`` as its ``scales`` input; otherwise its ``sizes`` input.
``UPSAMPLE_OPS`` at the bottom is this module's part of the ``ATEN`` table.
"""

from __future__ import annotations

import math

import numpy as np
import torch.fx

from graphopt.frontends.torch._builder import Convert, GraphBuilder, Refuse, named_args

__all__ = ["UPSAMPLE_OPS"]

_SCALE_ARGS = ("scales_d", "scales_h", "scales_w", "scales")


def _resize(mode: str) -> Convert:
    """``mode``: nearest, nearest-exact, linear or cubic (the torch names, less the rank)."""

    def convert(imp: GraphBuilder, node: torch.fx.Node):
        args = named_args(node)
        x = imp.value(args.get("input", args.get("self")))
        in_shape = imp.shape(x)
        out_shape = tuple(int(d) for d in node.meta["val"].shape)
        align = bool(args.get("align_corners", False))
        if "scale_factors" in args:  # the .vec overloads
            scales = args["scale_factors"]
        else:  # the .default ones: one optional scale per dim
            given = [args[k] for k in _SCALE_ARGS if k in args]
            scales = given if all(s is not None for s in given) else None
        if mode.startswith("nearest"):
            exact = mode == "nearest-exact"
            attrs = {
                "mode": "nearest",
                "coordinate_transformation_mode": "half_pixel" if exact else "asymmetric",
                "nearest_mode": "round_prefer_ceil" if exact else "floor",
            }
        else:
            attrs = {
                "mode": mode,
                "coordinate_transformation_mode": "align_corners" if align else "half_pixel",
            }
            if mode == "cubic":
                attrs["cubic_coeff_a"] = -0.75
        if scales is not None and not align:
            full = [1.0, 1.0] + [float(s) for s in scales]
            sized = tuple(math.floor(n * s) for n, s in zip(in_shape, full, strict=True))
            if sized != out_shape:
                raise Refuse(f"scales {scales} do not give the output shape {out_shape}")
            inputs = [x, "", imp.const(np.array(full, np.float32), "scales")]
        else:
            inputs = [x, "", "", imp.ints(out_shape, "sizes")]
        return imp.out(node, "Resize", inputs, attrs)

    return convert


def _antialiased(imp: GraphBuilder, node: torch.fx.Node):
    raise Refuse("antialiased interpolation is not supported")


def _table() -> dict[str, Convert]:
    table: dict[str, Convert] = {}
    ops = {
        "upsample_nearest{}d": ("nearest", (1, 2, 3)),
        "_upsample_nearest_exact{}d": ("nearest-exact", (1, 2, 3)),
        "upsample_{}": ("linear", ("linear1d", "bilinear2d", "trilinear3d")),
        "upsample_bicubic{}d": ("cubic", (2,)),
    }
    for pattern, (mode, ranks) in ops.items():
        for rank in ranks:
            for overload in ("default", "vec"):
                table[f"aten.{pattern.format(rank)}.{overload}"] = _resize(mode)
    for overload in ("default", "vec"):
        table[f"aten._upsample_bilinear2d_aa.{overload}"] = _antialiased
        table[f"aten._upsample_bicubic2d_aa.{overload}"] = _antialiased
    return table


# ATen overload name -> converter, for the ops this module translates.
UPSAMPLE_OPS: dict[str, Convert] = _table()
