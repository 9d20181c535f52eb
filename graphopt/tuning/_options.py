"""The options of one ``tune`` run: budgets, batch and search sizes, time limits.

One frozen record, checked once when it is made, so the session that runs the search
reads its knobs from a single place instead of threading each one through its calls.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from graphopt.errors import GraphoptError
from graphopt.tuning._tasks import Task

# The search spaces ``--space`` names (see ``_space.py``); kept here, free of TVM, so
# the CLI can offer them without importing MetaSchedule.
SPACES = ("generic", "graphopt", "both")

__all__ = ["TuneOptions", "TuningError", "parse_duration", "SPACES"]

# Trials for a task when no budget is given, on average (weighted by FLOPs).
DEFAULT_TRIALS_PER_TASK = 64
# With only --time-budget, budgets are this many trials per task (weighted): the clock
# stops the run long before, and the weights still share the time.
_TIME_ONLY_TRIALS_PER_TASK = 2000


class TuningError(GraphoptError):
    """Bad tuning options, or nothing to tune."""


def parse_duration(text: str | float | int | None) -> float | None:
    """``"30m"``, ``"1h30m"``, ``"90s"``, ``"45"`` (seconds) -> seconds (must be > 0)."""
    if text is None:
        return None
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = text.strip().lower()
        if s.startswith("-"):
            raise TuningError(f"--time-budget must be positive, got {text!r}")
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            parts = re.fullmatch(
                r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s
            )
            if not s or parts is None:
                raise TuningError(f"--time-budget {text!r}: use e.g. 30m, 1h30m, 90s")
            h, m, sec = (float(p) if p else 0.0 for p in parts.groups())
            seconds = h * 3600 + m * 60 + sec
    if not seconds > 0:
        raise TuningError(f"--time-budget must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True)
class TuneOptions:
    """How much to tune and how: budgets, batch and search sizes, time limits.

    ``trials``: in all, shared by each kernel's measured default time x calls (FLOPs x
    calls until the defaults are measured) (at least 1 per task); ``per_task``: each
    task's (with ``trials``: a cap); ``time_budget``: seconds, or a text such as ``"30m"``
    (see :func:`parse_duration`), read as seconds once made. ``build_timeout`` and
    ``run_timeout`` bound one candidate's build and run (seconds). Bad values raise
    :class:`TuningError` in the order the CLI documents its flags.
    """

    trials: int | None = None
    per_task: int | None = None
    time_budget: float | None = None  # seconds once made (a text is parsed)
    batch_size: int = 16
    population: int = 64  # candidates the evolutionary search keeps per generation
    build_timeout: float = 60.0
    run_timeout: float = 10.0
    seed: int = 0
    space: str = "both"  # "generic" (MetaSchedule's), "graphopt" (the default rules'), "both"
    # A task stops once this many trials in a row found nothing 1% faster (0: never).
    patience: int = 64
    measure_model: bool = True  # time the whole model before/after (and onnxruntime)

    def __post_init__(self) -> None:
        for flag, value in (("--trials", self.trials), ("--per-task", self.per_task)):
            if value is not None and value < 1:
                raise TuningError(f"{flag} must be at least 1, got {value}")
        if self.space not in SPACES:
            raise TuningError(f"--space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.patience < 0:
            raise TuningError(f"patience must be at least 0, got {self.patience}")
        if self.batch_size < 1:
            raise TuningError(f"batch size must be at least 1, got {self.batch_size}")
        # the record is frozen: this is the one place a text becomes seconds
        object.__setattr__(self, "time_budget", parse_duration(self.time_budget))

    @property
    def nominal_budgets(self) -> bool:
        """Only a time budget was given: the clock, not the trial counts, ends the run."""
        return self.trials is None and self.per_task is None and self.time_budget is not None

    def budgets(self, tasks: Sequence[Task]) -> list[int]:
        """Each task's trial budget, in the order of ``tasks``."""
        trials, per_task = self.trials, self.per_task
        if trials is None and per_task is not None:
            return [per_task] * len(tasks)
        if trials is None:
            per = DEFAULT_TRIALS_PER_TASK
            if self.time_budget is not None:
                per = _TIME_ONLY_TRIALS_PER_TASK
            trials = per * len(tasks)
        # One trial each first (no task is left out; with fewer trials than tasks that is
        # the whole budget), then the rest by weight, largest remainders first, so the
        # shares add up to exactly max(trials, len(tasks)).
        rest = max(trials - len(tasks), 0)
        total = sum(t.weight for t in tasks) or 1.0
        exact = [rest * t.weight / total for t in tasks]
        out = [1 + math.floor(e) for e in exact]
        by_remainder = sorted(range(len(tasks)), key=lambda i: math.floor(exact[i]) - exact[i])
        for i in by_remainder[: rest - sum(math.floor(e) for e in exact)]:
            out[i] += 1
        return [min(n, per_task) for n in out] if per_task is not None else out
