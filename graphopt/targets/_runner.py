"""Run a loaded Relax VM on numpy arrays; shared by the target modules' ``load``."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["VMRunner"]


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
