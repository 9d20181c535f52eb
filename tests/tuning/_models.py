"""Small models for the tuning tests: two that share a conv shape."""

from __future__ import annotations

import json

import numpy as np
from onnx import helper

from tests.conftest import make_model


def conv_relu(extra_conv: bool = False, batch: int = 1):  # noqa: ANN201
    """x(batch,4,16,16) -> Conv(4->8, 3x3) -> Relu [-> Conv(8->8, 1x1)]: the first conv is
    shared (by the models of one batch size)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
    ]
    inits = {"w": rng.standard_normal((8, 4, 3, 3)).astype(np.float32)}
    if extra_conv:
        nodes.append(helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"))
        inits["w2"] = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    else:
        nodes[-1].output[0] = "y"
    return make_model(nodes, {"x": (batch, 4, 16, 16)}, {"y": (batch, 8, 16, 16)}, inits)


def slow_defaults(db) -> None:  # noqa: ANN001 - the database folder
    """Make every default schedule in ``db`` look slow, so each tuned kernel wins
    deterministically (and drop the side-by-side and in-model checks, which would judge
    otherwise)."""
    path = db / "records.jsonl"
    lines = map(json.loads, path.read_text().splitlines())
    kept = [r for r in lines if r["t"] not in ("chk", "ctx")]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    with open(path, "a") as f:
        for key in sorted({r["w"] for r in kept if r["t"] == "wl"}):
            f.write(json.dumps({"t": "base", "w": key, "secs": 1.0}) + "\n")
