"""Calling into torch quietly: one torch job at a time, a failure as one error line.

torch prints warnings, log dumps and failing graphs while it exports, loads and
decomposes programs; graphopt holds them back and reports what went wrong as one
:class:`TorchImportError` line (:func:`first_line` of torch's message). Export, loading
and decomposition keep global state in torch, so :func:`quiet` also takes
``TORCH_LOCK``: one torch job at a time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Iterator

from graphopt.errors import ModelLoadError, first_line

__all__ = ["TORCH_LOCK", "TorchImportError", "first_line", "quiet"]

TORCH_LOCK = threading.RLock()  # see quiet; safe_load's Guard holds it too, so guards never stack


class TorchImportError(ModelLoadError):
    """A torch model that cannot be exported or read (data-dependent control flow, ...)."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hold back torch's warnings and log dumps: a failure becomes one error line instead.

    Also one torch job at a time (``TORCH_LOCK``): export, loading and decomposition keep
    global state in torch, and the warning filters and stderr swapped here are global too.
    """
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:  # torch prints the failing graph to stderr on a data-dependent guard
        with TORCH_LOCK, warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
