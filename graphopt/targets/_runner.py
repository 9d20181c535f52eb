"""Run a loaded Relax VM on numpy arrays; shared by the target modules' ``load``."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time

import numpy as np

from graphopt.errors import ArtifactError

__all__ = ["VMRunner", "load_library", "use_all_cores"]

THREAD_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")
_LINK_IDS = itertools.count()  # makes every load's library name unique in this process


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


def load_library(path: str | os.PathLike):  # noqa: ANN201 - a tvm_ffi.Module
    """Load a library TVM exported (an artifact), whatever its file name ends with.

    Why not ``tvm.runtime.load_module``: it picks its loader by the file's suffix (a
    ``model.art`` has none), and it adds every module it loads to TVM's global list for
    the life of the process, so each load kept its code, executable and weights until
    exit (200 loads of a 2.4 MB model: +454 MiB). TVM's ``.so`` loader, called directly,
    gives a module that lives as long as Python references it (the runner's VMs) and
    unloads its code (``dlclose``) with the last one.

    The library is opened through a symlink of a name no earlier load used: ``dlopen``
    hands back an already loaded library whose path *name* matches, whatever the file
    holds now, so an artifact replaced at the same path while the old one was still
    loaded would have run the old code. With fresh names the dynamic loader shares a
    mapping only between loads of the same file (same inode).
    """
    import tvm_ffi

    real = os.path.realpath(path)
    tmp = tempfile.mkdtemp(prefix="graphopt-lib-")
    link = os.path.join(tmp, f"{next(_LINK_IDS)}-{os.path.basename(real)}.so")
    try:
        os.symlink(real, link)
        return tvm_ffi.get_global_func("ffi.Module.load_from_file.so")(link, "so")
    except Exception as exc:
        detail = str(exc).splitlines()[0].replace(link, real) if str(exc) else repr(exc)
        raise ArtifactError(f"cannot load {path}: {detail}") from None
    finally:  # the mapping stays; the name is not needed once dlopen returned
        shutil.rmtree(tmp, ignore_errors=True)


class VMRunner:
    """Calls ``main`` of a library's Relax VM on numpy arrays (inputs and outputs in order).

    Safe to call from any number of threads at once. A Relax VM keeps the frames and
    registers of the call in progress in the VM object itself, so two threads in one VM
    overwrite each other's (segfaults in ``StorageObj::AllocTensor``, ``reg <
    frame->register_file.size()``). Each call therefore takes a VM from a pool of idle
    ones, or makes one when none is idle, and puts it back: there are as many VMs as calls
    ever ran at once. A VM is cheap (about 15 us and 10 KiB: the VMs share the library,
    its weights and TVM's memory pool). A pool costs the same per call as one VM per
    thread (``threading.local``; under 1 us either way) but does not build a VM for each
    new thread, and ``close`` can drop its VMs at once.
    """

    def __init__(self, lib, device) -> None:  # noqa: ANN001 - tvm objects
        """``lib``: a module from :func:`load_library`. Makes the first VM now, so a library
        that is not a Relax executable fails at load, not at the first call."""
        self.device = device
        self._lib = lib
        self._lock = threading.Lock()
        self._idle = [self._new_main()]

    @classmethod
    def open(cls, path: str | os.PathLike, device) -> VMRunner:  # noqa: ANN001 - tvm Device
        """Load the artifact at ``path`` (:func:`load_library`) into VMs on ``device``."""
        lib = load_library(path)
        try:
            return cls(lib, device)
        except Exception as exc:
            raise ArtifactError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None

    def _new_main(self):  # noqa: ANN202 - tvm_ffi.Function
        """``main`` of a new VM; the function holds its VM, the VM the library."""
        import tvm

        return tvm.runtime.vm.VirtualMachine(self._lib, self.device)["main"]

    def _take(self):  # noqa: ANN202 - tvm_ffi.Function
        with self._lock:
            if self._lib is None:
                raise ArtifactError("the artifact is closed")
            if self._idle:
                return self._idle.pop()
            # Made under the lock: TVM does not say vm_load_executable is thread-safe.
            return self._new_main()

    def _give_back(self, main) -> None:  # noqa: ANN001
        with self._lock:
            if self._lib is not None:  # after close, the last reference goes here
                self._idle.append(main)

    def _to_device(self, arrays: list[np.ndarray]) -> list:
        import tvm

        # np.require keeps a 0-d array 0-d (ascontiguousarray makes it shape (1,), which
        # the VM then refuses for a scalar input).
        return [tvm.runtime.tensor(np.require(a, requirements="C"), self.device) for a in arrays]

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        args = self._to_device(arrays)
        main = self._take()
        outputs = [r.numpy() for r in main(*args)]
        # Not after an error: TVM does not say a VM whose call raised is sound; drop it.
        self._give_back(main)
        return outputs

    def time(self, arrays: list[np.ndarray], repeat: int, warmup: int = 1) -> list[float]:
        """Seconds per call for ``repeat`` calls, inputs already on the device, one VM."""
        args = self._to_device(arrays)
        main = self._take()
        for _ in range(warmup):
            main(*args)
        self.device.sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            main(*args)
            self.device.sync()
            times.append(time.perf_counter() - start)
        self._give_back(main)
        return times

    def close(self) -> None:
        """Drop the idle VMs and the library. Calls in progress finish on their own VM (it
        holds the library), which is dropped when they end; the code is unloaded after the
        last reference goes. Later calls raise :class:`ArtifactError`."""
        with self._lock:
            self._lib = None
            self._idle.clear()
