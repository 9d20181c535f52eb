"""Run a loaded Relax VM on numpy arrays; shared by the target modules' ``load``."""

from __future__ import annotations

import os
import time

import numpy as np

__all__ = ["VMRunner", "use_all_cores"]

THREAD_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


def use_all_cores() -> int:
    """Size TVM's CPU thread pool to the physical cores this process may run on.

    Why: with neither variable set, TVM's runtime takes half the logical CPUs on x86,
    assuming two hyperthreads per core. On a machine without SMT (most cloud VMs: 2 vCPUs
    that are 2 cores) that is half the machine, and every parallel kernel runs at half
    speed. onnxruntime and torch count physical cores; so does graphopt. The pool reads
    ``TVM_NUM_THREADS`` once, when it starts, so this runs before the first kernel; a value
    the user set is kept. Child processes (tuning's measurement workers) inherit it.
    Returns the thread count in effect.
    """
    for var in THREAD_VARS:
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = psutil.cpu_count(logical=False) or usable or 1
    threads = max(1, min(physical, usable or physical))
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads


class VMRunner:
    """Calls ``main`` of a Relax VM. Inputs and outputs are numpy arrays, in order."""

    def __init__(self, vm, device) -> None:  # noqa: ANN001 - tvm objects
        self.vm = vm
        self.device = device

    def _to_device(self, arrays: list[np.ndarray]) -> list:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in arrays]

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        result = self.vm["main"](*self._to_device(arrays))
        return [r.numpy() for r in result]

    def time(self, arrays: list[np.ndarray], repeat: int, warmup: int = 1) -> list[float]:
        """Seconds per call for ``repeat`` calls, inputs already on the device."""
        args = self._to_device(arrays)
        fn = self.vm["main"]
        for _ in range(warmup):
            fn(*args)
        self.device.sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn(*args)
            self.device.sync()
            times.append(time.perf_counter() - start)
        return times
