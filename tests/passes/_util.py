"""Helpers for pass tests: run a graph with onnxruntime before and after a pass."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from graphopt.ir import Graph
from graphopt.passes._functions import to_onnx


def run_ort(graph: Graph, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``graph`` (graphopt-domain ops included, through their ONNX functions)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        to_onnx(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, inputs)


def random_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(graph.values[n].shape).astype(np.float32) for n in graph.inputs}
