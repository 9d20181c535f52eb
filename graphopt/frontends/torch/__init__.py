"""Read torch models into graphopt's graph IR, op by op, without going through ONNX files.

Accepted: an ``nn.Module`` (exported with ``torch.export.export`` in eval mode), a
``torch.fx.GraphModule`` (exported the same way, so ``symbolic_trace`` output works), an
``ExportedProgram``, or a ``.pt2`` file written by ``torch.export.save`` (read without
running code from it unless the caller trusts the file: see :func:`load_pt2`).

The program is decomposed to core ATen (``run_decompositions``) except for the ops that
map more directly onto ONNX than their decompositions do: ``linear``, ``matmul``, the
upsampling ops (each one ``Resize``) and the recurrent layers
``lstm``/``gru``/``rnn_tanh``/``rnn_relu`` (whose decomposition would be an already
unrolled loop). Each remaining ATen node becomes ONNX-semantics nodes through
the ``ATEN`` table; recurrent layers become one ONNX ``LSTM``/``GRU``/``RNN`` node per
layer, with torch's gate order converted to ONNX's::

    LSTM  torch i f g o  ->  ONNX i o f c
    GRU   torch r z n    ->  ONNX z r h   (linear_before_reset=1, as torch computes it)

so the ``expand-rnn`` pass unrolls them like any imported ONNX model. Parameters and
buffers become numpy constants; nodes whose inputs are all constants (``full``,
``permute`` of a weight, ...) are evaluated by torch itself at import. Every op outside
the table is named, with the user's source line, in one :class:`UnsupportedOpsError`.

The modules, each importing only those above it:

- ``_quiet``: torch called one job at a time, its failures as one ``TorchImportError`` line.
- ``_safe_load``: reading a ``.pt2`` file without running code from it (the guard).
- ``_builder``: ``GraphBuilder``, the IR-building state every converter writes through.
- ``_shape_ops``, ``_compute_ops``, ``_resize``, ``_recurrent``: the ATen converters, each
  module ending with its part of the ``ATEN`` table.
- ``_importer``: the ``ATEN`` table and the walk over an fx graph that uses it.
- ``_source``: ``from_torch``, ``load_pt2``, ``as_source``: a model in, a ``TorchSource`` out.
"""

from __future__ import annotations

from graphopt.frontends.torch._importer import ATEN, source_location
from graphopt.frontends.torch._quiet import TorchImportError
from graphopt.frontends.torch._source import TorchSource, as_source, from_torch, load_pt2

__all__ = [
    "ATEN",
    "TorchImportError",
    "TorchSource",
    "as_source",
    "from_torch",
    "load_pt2",
    "source_location",
]

# This package is the public home of its classes: reprs, pickles and tracebacks name it,
# and graphopt.frontends.is_torch_model recognises a TorchSource by this module name
# without importing torch.
TorchSource.__module__ = __name__
TorchImportError.__module__ = __name__
