"""Where the host put this machine's CPUs: how long a cache line takes to go from one CPU
to another and back, printed beside every benchmark figure.

Why: on the 2-vCPU KVM guests of benchmarks/RESULTS.md the host moves the two vCPUs
between cores that share an L3 and cores that do not, for seconds to minutes at a time,
and nothing in ``lscpu`` changes. On the Zen 4 guest (2026-12-07) the round trip read
52-82 ns in one placement and 335-381 ns in the other, and graphopt's latency followed
it process by process: GoogLeNet 9.2 ms against 13.1-13.4, SqueezeNet 1.1 about 3.1
against 6. Its kernels split each loop over both threads, and the next kernel reads
what the other core wrote: pools ran 2.9x and concatenations 4.2x their time, Winograd
convs 1.37x, dense convs 1.23x (GoogLeNet, each kernel timed inside the model). One
thread alone showed no such modes (GoogLeNet 16.8-17.3 ms in six processes), and the
FMA rate of each vCPU stayed at 127-128 GFLOP/s in both placements. So a figure comes
with the placement it was measured in; the ping-pong runs before and after a run,
since the placement can change in between.

The measurement is a small C program (two threads pinned to two CPUs, one atomic int
passed back and forth), built once with the system's C compiler and cached; Python's
threads could not time a round trip of tens of nanoseconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
from pathlib import Path

__all__ = ["SHARED_BELOW_NS", "core_to_core_ns", "placement_line"]

# Below this the two CPUs share a cache (52-82 ns measured on the Zen 4 guest; Intel's
# mesh is slower, about 100-200 ns); above it they do not (335-381 ns there).
SHARED_BELOW_NS = 200.0

_SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static _Atomic int flag __attribute__((aligned(64)));
static long trips;
static int pin(int cpu) {
  cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s);
  return pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}
static void* other(void* cpu) {
  if (pin(*(int*)cpu)) exit(3);
  for (long i = 0; i < trips; i++) {
    while (atomic_load(&flag) != 1) {}
    atomic_store(&flag, 0);
  }
  return 0;
}
int main(int argc, char** argv) {
  if (argc != 4) return 2;
  int a = atoi(argv[1]), b = atoi(argv[2]);
  trips = atol(argv[3]);
  if (pin(a)) return 3;
  pthread_t t;
  if (pthread_create(&t, 0, other, &b)) return 4;
  struct timespec s, e;
  clock_gettime(CLOCK_MONOTONIC, &s);
  for (long i = 0; i < trips; i++) {
    atomic_store(&flag, 1);
    while (atomic_load(&flag) != 0) {}
  }
  clock_gettime(CLOCK_MONOTONIC, &e);
  pthread_join(t, 0);
  printf("%.3f\n", ((e.tv_sec - s.tv_sec) * 1e9 + (e.tv_nsec - s.tv_nsec)) / trips);
  return 0;
}
"""


def _binary() -> Path | None:
    """The ping-pong program, built on first use into graphopt's cache (``GRAPHOPT_CACHE``,
    as README says); None without a C compiler or where it does not build (not Linux)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    from graphopt.targets._emulation import cache_root

    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    cache = cache_root()
    path = cache / f"pingpong-{digest}"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"pingpong-{digest}.c"
    src.write_text(_SOURCE)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    built = subprocess.run(
        [compiler, "-O2", "-pthread", str(src), "-o", str(tmp)], capture_output=True
    )
    if built.returncode != 0:
        return None
    os.replace(tmp, path)  # atomic: a concurrent build leaves one complete program
    return path


def core_to_core_ns(
    cpus: tuple[int, int] | None = None, trips: int = 100_000, runs: int = 3
) -> float | None:
    """The median over ``runs`` of a cache line's round trip in nanoseconds between two
    CPUs (``cpus``; default: the first two this process may run on). None where there
    are fewer than two, no C compiler, or the program failed."""
    if cpus is None:
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(mine) < 2:
            return None
        cpus = (mine[0], mine[1])
    program = _binary()
    if program is None:
        return None
    times = []
    for _ in range(runs):
        try:
            done = subprocess.run(
                [str(program), str(cpus[0]), str(cpus[1]), str(trips)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode != 0:
                return None
            times.append(float(done.stdout.strip()))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None
    return statistics.median(times)


def placement_line(when: str = "") -> str:
    """One line for a benchmark's output: the round trip, and what it says."""
    return describe(core_to_core_ns(), when)


def describe(ns: float | None, when: str = "") -> str:
    """:func:`placement_line` of a round trip already measured (``ns``; None: not)."""
    label = f"core-to-core round trip{f' ({when})' if when else ''}"
    if ns is None:
        return f"{label}: not measured (one CPU, or no C compiler)"
    where = "a shared cache" if ns < SHARED_BELOW_NS else "no shared cache"
    return f"{label}: {ns:.0f} ns ({where}; see benchmarks/_placement.py)"
