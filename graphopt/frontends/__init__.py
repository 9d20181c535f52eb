"""Frontends read user models into graphopt's graph IR (:mod:`graphopt.ir`)."""

from graphopt.frontends.onnx import load_onnx, onnx_to_graph, parse_input_shapes

__all__ = ["load_onnx", "onnx_to_graph", "parse_input_shapes"]
