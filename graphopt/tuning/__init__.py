"""Tuning: MetaSchedule search over the kernels graphopt compiles, into a resumable database.

- :func:`tune` extracts the fused kernels of a model exactly as ``compile`` produces them
  (the target's Relax phases up to its ``schedule`` phase, in the same ``layout``),
  measures each kernel's default schedule first, then spends trials on the kernels by
  their share of the model's measured time, searching graphopt's own rules, MetaSchedule's
  generic space or both (``space``; see docs/tuning.md), here or on devices behind TVM's
  RPC tracker; every measured batch is appended to the database. It ends by timing the
  model before and after, next to onnxruntime. Its build and measurement worker processes
  are kept for the next ``tune`` in the same process; :func:`release_workers` stops them.
- :class:`TuningDatabase` is that database (a directory; see ``_database.py`` for why it
  survives ``kill -9``); :func:`open_database` opens one for ``compile``, refusing one
  from another target or a corrupt one.
- :func:`ApplyTuningDatabase` is the Relax pass a target puts before its default
  schedules: kernels with a record faster than their default schedule use it.
- :func:`last_measured` is ``tune``'s last whole-model timing of a model with the
  database (``DB/model-latency.json``): ``compile`` keeps the default schedules for a
  model that did not measure ``_latency.MODEL_MIN_GAIN`` (0.98) of its default time or
  less with the database, unless :func:`last_passing` has an earlier check that passed:
  then it applies the records that check timed.
"""

from __future__ import annotations

import os

from graphopt.tuning._apply import SCHEDULE_RULE, ApplyTuningDatabase
from graphopt.tuning._database import TuningDatabase, TuningDatabaseError
from graphopt.tuning._latency import ModelLatency, last_measured, last_passing
from graphopt.tuning._measure import RPCError, release_workers
from graphopt.tuning._options import TuningError, parse_duration
from graphopt.tuning._report import ProgressPrinter, TaskResult, TuneReport, format_report
from graphopt.tuning._tuner import tune

__all__ = [
    "tune",
    "release_workers",
    "TuneReport",
    "TaskResult",
    "TuningDatabase",
    "TuningDatabaseError",
    "TuningError",
    "RPCError",
    "ApplyTuningDatabase",
    "SCHEDULE_RULE",
    "open_database",
    "ModelLatency",
    "last_measured",
    "last_passing",
    "parse_duration",
    "format_report",
    "ProgressPrinter",
]


def open_database(path: str | os.PathLike, spec, precision: str | None = None) -> TuningDatabase:  # noqa: ANN001 - TargetSpec
    """An existing database for ``spec``, read-only use (compile); one tuned at another
    ``precision`` is refused (None: any; its workloads differ from another precision's
    kernels, so none of its records would match them anyway)."""
    return TuningDatabase(path, spec, create=False, precision=precision)
