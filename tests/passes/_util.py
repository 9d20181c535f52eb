"""Helpers for pass tests: run a graph with onnxruntime before and after a pass."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from graphopt.frontends.onnx import graph_to_onnx
from graphopt.ir import Graph


def run_ort(graph: Graph, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        graph_to_onnx(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, inputs)


def random_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(graph.values[n].shape).astype(np.float32) for n in graph.inputs}
