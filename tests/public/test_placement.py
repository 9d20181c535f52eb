"""benchmarks/_placement.py: the core-to-core round trip printed beside benchmark figures.
A real program on real CPUs; the test asserts that it runs and what its line says, not a
time (benchmarks are not tests)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("_placement", _BENCH / "_placement.py")
pl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pl)

_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two = pytest.mark.skipif(len(_CPUS) < 2, reason="needs two CPUs to pass a line between")
needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="needs a C compiler (apt package gcc)",
)


@needs_two
@needs_cc
def test_round_trip_is_built_cached_and_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    ns = pl.core_to_core_ns(trips=20_000, runs=1)
    assert ns is not None and 0 < ns < 1e5  # a round trip, in nanoseconds
    built = list(tmp_path.glob("pingpong-*"))
    assert [p for p in built if p.suffix == ""], built  # the program, kept for the next run
    assert pl.core_to_core_ns((_CPUS[1], _CPUS[0]), trips=20_000, runs=1) is not None


@needs_cc
def test_a_cpu_it_may_not_run_on_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    absent = max(_CPUS or [0]) + 4096  # no machine here has it: pinning fails
    assert pl.core_to_core_ns((_CPUS[0] if _CPUS else 0, absent), trips=10, runs=1) is None


@pytest.mark.parametrize(
    ("ns", "says"),
    [(60.0, "60 ns (a shared cache"), (350.0, "350 ns (no shared cache"), (None, "not measured")],
)
def test_placement_line_says_which(monkeypatch, ns, says):
    monkeypatch.setattr(pl, "core_to_core_ns", lambda: ns)
    line = pl.placement_line("before")
    assert line.startswith("core-to-core round trip (before): ") and says in line
