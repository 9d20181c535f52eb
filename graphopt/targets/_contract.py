"""The target contract: what every target provides, as one frozen record.

Callers (compile, tune, the CLI) read these fields and nothing else; they never probe a
target module for optional functions. Optional parts have defaults: a target without
a cross compiler leaves ``cross_compiler`` None, one that always runs here keeps the
default ``cannot_run_here``. Extra schedule passes (a tuning database's) are handed to
``phases`` by the caller, so targets never import ``graphopt.tuning``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.targets._layout import Layout

__all__ = ["Target"]


def _no_features(_tvm: dict) -> list[str]:
    return []


def _runs_anywhere(_tvm: dict) -> str | None:
    return None


@dataclass(frozen=True)
class Target:
    """One compilation target.

    ``phases(target, layout, extra_schedule_passes)`` returns the Relax passes per phase
    (TVM's ``relax/backend/<target>/pipeline.py`` shape) for a ``tvm.target.Target`` and
    a layout name from ``layouts`` (None: the default); ``extra_schedule_passes`` go first
    in the schedule phase. ``load(path, manifest)`` returns a runner (``run``, ``time``,
    ``close``). ``tunable``: whether ``graphopt tune`` databases apply. ``keeps_fp32``:
    the calls ``--precision`` leaves in float32 (:mod:`graphopt.targets._precision`).
    """

    name: str
    description: str
    options: dict[str, str]  # option -> help, the keyword arguments of ``tvm_target``
    layouts: dict[str, Layout]  # default first
    tvm_target: Callable[..., dict]
    accepts: Callable[[dict], bool]  # does a TVM target dict belong to this target?
    check_tvm_dict: Callable[[dict], dict]
    phases: Callable[[Any, str | None, Sequence], dict[str, list]]
    export: Callable[[Any, Path], None]
    load: Callable[[Path, dict], Any]
    features: Callable[[dict], list[str]] = field(default=_no_features)
    cross_compiler: Callable[[], str] | None = None  # path of the C++ linker for the device
    cannot_run_here: Callable[[dict], str | None] = field(default=_runs_anywhere)
    tunable: bool = False
    # (conv or matmul call, precision) -> True where the target computes that call faster
    # in fp32 than in the lower precision (x86: Winograd's 3x3 convs without AMX)
    keeps_fp32: Callable[[Any, str], bool] | None = None

    @property
    def default_layout(self) -> str:
        return next(iter(self.layouts))
