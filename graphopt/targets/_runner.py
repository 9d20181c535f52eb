"""Run a loaded Relax VM on numpy arrays; shared by the target modules' ``load``.

The hot path of a call is :class:`BoundVM`: one VM, input tensors held across calls, one
copy per output. :class:`VMRunner` pools them for ``Artifact.run`` (any number of threads);
:func:`bind` gives one to ``Artifact.runner()``. See docs/serving.md for what a call costs.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence

import numpy as np

from graphopt.errors import ArtifactError, InputError
from graphopt.targets import _hugepages

__all__ = ["BoundVM", "VMRunner", "bind", "load_library", "use_all_cores", "ZERO_COPY_BYTES"]

THREAD_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")
_LINK_IDS = itertools.count()  # makes every load's library name unique in this process
_CPU = 1  # DLDeviceType kDLCPU
# Inputs this large, C-contiguous and 64-byte aligned go to the VM without a copy: below
# it a copy (about 0.3 us for a small input) is cheaper than checking the address (1 us).
ZERO_COPY_BYTES = 1 << 18
_from_dlpack = np.from_dlpack
_ALIGN = 64  # what TVM's kernels assume of a tensor's address (and from_dlpack checks)


def use_all_cores() -> int:
    """Size TVM's CPU thread pool to the physical cores this process may run on.

    Why: with neither variable set, TVM's runtime takes half the logical CPUs on x86,
    assuming two hyperthreads per core. On a machine without SMT (most cloud VMs: 2 vCPUs
    that are 2 cores) that is half the machine, and every parallel kernel runs at half
    speed. onnxruntime and torch count physical cores; so does graphopt. The pool reads
    ``TVM_NUM_THREADS`` once, when it starts, so this runs before the first kernel; a value
    the user set is kept. Child processes (tuning's measurement workers) inherit it.
    Returns the thread count in effect.

    Also ``TVM_BIND_THREADS=0`` unless set: TVM pins its pool's worker threads to cores
    but not the calling thread (worker 0), and on a 2-core Zen 4 VM about one process in
    three ran with both on one core: DenseNet-121 at 58 ms instead of 37, for the life of
    the process. Unpinned (as onnxruntime's threads are by default), 9 of 10 processes
    ran at 36-37 ms (the tenth at 59 ms median, 36 ms at best: the VM's own drift).
    """
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    for var in THREAD_VARS:
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    import psutil

    usable = usable_cpus()
    physical = psutil.cpu_count(logical=False) or usable
    threads = max(1, min(physical, usable))
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads


def usable_cpus() -> int:
    """The logical CPUs this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


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


class _Life:
    """Whether the library is still open: shared by a :class:`VMRunner` and its
    :class:`BoundVM` objects without a reference cycle (a cycle would keep the code mapped
    until the garbage collector ran, not until the last reference went). ``pages``: the
    mappings before the library loaded, until the first call backs the rest with huge
    pages (:mod:`graphopt.targets._hugepages`; None: nothing to do)."""

    __slots__ = ("closed", "pages")

    def __init__(self, pages: dict | None = None) -> None:
        self.closed = False
        self.pages = pages

    def first_call(self) -> None:
        """After a first call (the VM's buffers allocated): the weights and buffers into
        huge pages, once per library, on a thread of its own (moving ResNet-50's 260 MB
        took 0.6-0.7 s on a Xeon, which the first call should not wait for)."""
        before, self.pages = self.pages, None
        threading.Thread(
            target=_hugepages.back, args=(before,), name="graphopt-hugepages", daemon=True
        ).start()


@functools.cache
def _ffi() -> tuple:
    """``(tvm_ffi.Array, ffi.ArrayGetItem)``, looked up once (no TVM on import).
    ``ffi.ArrayGetItem`` called directly takes 0.3 us an item, where ``Array.__getitem__``
    with its Python index normalisation takes 0.7 us."""
    import tvm_ffi

    return tvm_ffi.Array, tvm_ffi.get_global_func("ffi.ArrayGetItem")


def _lend(a: np.ndarray):  # noqa: ANN202 - a tvm tensor sharing a's memory, or None
    """``a`` as a tensor without a copy when TVM's kernels may read it in place."""
    if not a.flags.c_contiguous or a.ctypes.data % _ALIGN:
        return None
    import tvm_ffi

    try:  # a read-only array, for one, cannot be exported through DLPack 0.8
        return tvm_ffi.from_dlpack(a, require_alignment=_ALIGN, require_contiguous=True)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None


class BoundVM:
    """One Relax VM and input tensors held for the shapes of the last call: the hot path.

    A call copies each numpy input into its held tensor (on the CPU through a numpy view
    of it: well under a microsecond for a small input) or, for a large C-contiguous input
    already aligned as TVM's kernels require (64 bytes), lends the array to the VM without
    a copy (DLPack). New shapes (a dynamic batch) make new held tensors, once. Each output
    is copied once out of the VM's memory into a new array, or into the caller's ``out``
    array: results never alias the VM's buffers, the held inputs or an earlier call's.

    One call at a time: a VM keeps its frames in itself, and the held tensors are shared
    state. :class:`VMRunner` hands each thread its own from a pool; :func:`bind` gives
    one to a caller that guards it.
    """

    def __init__(self, main, device, life: _Life) -> None:  # noqa: ANN001 - tvm objects
        self.main = main
        self.device = device
        self._life = life
        self._cpu = device.dlpack_device_type() == _CPU
        self._array, self._get_item = _ffi()
        self._shapes: tuple = ()  # of the held tensors
        self._held: list = []  # tvm tensors, passed to main
        self._views: list = []  # numpy views of them on the CPU (None: copyfrom)
        self._plain = False  # every input is copied through a view: the short loop
        self._arity = -1  # outputs of main, -1 until the first call; 0: not a tuple

    def hold(self, shapes: tuple, dtypes: tuple) -> None:
        """Allocate the held input tensors for ``shapes`` (tuples) and numpy ``dtypes``."""
        import tvm

        held = [
            tvm.runtime.empty(s, str(d), self.device) for s, d in zip(shapes, dtypes, strict=True)
        ]
        views = []
        for t in held:
            try:
                views.append(np.from_dlpack(t) if self._cpu else None)
            except (BufferError, RuntimeError, TypeError):  # a dtype numpy lacks (bfloat16)
                views.append(None)
        self._held, self._views, self._shapes = held, views, tuple(map(tuple, shapes))
        self._plain = all(v is not None and v.nbytes < ZERO_COPY_BYTES for v in views)

    def args(self, arrays: Sequence[np.ndarray]) -> list:
        """The tensors to call ``main`` with: ``arrays`` copied (or lent) into them."""
        shapes = self._shapes
        if len(arrays) != len(shapes) or any(
            a.shape != s
            for a, s in zip(arrays, shapes)  # noqa: B905 - same length
        ):
            self.hold(tuple(a.shape for a in arrays), tuple(a.dtype for a in arrays))
        args = []
        for a, t, view in zip(arrays, self._held, self._views):  # noqa: B905
            if view is None:  # another device, or a dtype numpy cannot view
                t.copyfrom(np.require(a, requirements="C"))  # keeps a 0-d array 0-d
                args.append(t)
            elif a.nbytes >= ZERO_COPY_BYTES and (lent := _lend(a)) is not None:
                args.append(lent)
            else:
                view[...] = a
                args.append(t)
        return args

    def call(self, arrays: Sequence[np.ndarray]) -> list:
        """``main`` on ``arrays`` (checked by the caller: dtypes, shapes that fit); its
        outputs as tensors, the VM's own."""
        if self._life.closed:  # let go of the VM: the code unmaps with the last one
            self.main, self._held, self._views, self._shapes = None, [], [], ()
            raise ArtifactError("the artifact is closed")
        main = self.main
        if self._plain and len(arrays) == len(self._shapes):
            # The common case in one loop (a microsecond counts here): small inputs of
            # the held shapes, copied through the views.
            for a, view, shape in zip(arrays, self._views, self._shapes):  # noqa: B905
                if a.shape != shape:
                    break
                view[...] = a
            else:
                result = main(*self._held)
                return self._outputs(result)
        return self._outputs(main(*self.args(arrays)))

    def _outputs(self, result) -> list:  # noqa: ANN001 - what main returned
        arity = self._arity
        if arity < 0:
            arity = self._arity = len(result) if isinstance(result, self._array) else 0
            if self._life.pages is not None:
                self._life.first_call()
        if arity == 1:
            return [self._get_item(result, 0)]
        if not arity:
            return [result]
        get = self._get_item
        return [get(result, i) for i in range(arity)]

    def run(
        self,
        arrays: Sequence[np.ndarray],
        out: list[np.ndarray] | None = None,
        names: Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Outputs of ``main`` on ``arrays`` (checked by the caller: dtypes, shapes that
        fit) as new arrays, or copied into ``out`` (one array per output, in order; their
        shapes and dtypes must be the outputs') and ``out`` returned. ``names`` name the
        outputs in errors."""
        tensors = self.call(arrays)
        if out is None:
            if not self._cpu:
                return [t.numpy() for t in tensors]
            if len(tensors) == 1:  # no comprehension: 0.2 us of a 4 us call
                return [_from_dlpack(tensors[0]).copy()]
            return [_from_dlpack(t).copy() for t in tensors]
        return fill(out, [self._view(t) for t in tensors], names)

    def _view(self, t) -> np.ndarray:  # noqa: ANN001 - a tvm tensor
        if self._cpu:
            try:
                return _from_dlpack(t)
            except (BufferError, RuntimeError, TypeError):
                pass
        return t.numpy()


def fill(
    out: list[np.ndarray], results: list[np.ndarray], names: Sequence[str] | None = None
) -> list:
    """Copy ``results`` into the caller's ``out`` arrays, which must match them exactly
    (no broadcasting, no casting); return ``out``."""
    if len(out) != len(results):
        raise InputError(f"out has {len(out)} array(s); the model has {len(results)} output(s)")
    for i, (dst, src) in enumerate(zip(out, results, strict=True)):
        if type(dst) is not np.ndarray or dst.shape != src.shape or dst.dtype != src.dtype:
            what = f"{type(dst).__name__} {getattr(dst, 'shape', '')} {getattr(dst, 'dtype', '')}"
            name = repr(names[i]) if names else str(i)
            raise InputError(
                f"out array for output {name} is {what.strip()}; the output is ndarray "
                f"{src.shape} {src.dtype}"
            )
        dst[...] = src  # raises for a read-only array
    return out


class _Forward:
    """:func:`bind` for a runner without VMs (an ARM artifact under emulation)."""

    def __init__(self, runner) -> None:  # noqa: ANN001
        self._runner = runner

    def run(self, arrays: list[np.ndarray], out: list | None = None, names: list | None = None):  # noqa: ANN201
        results = self._runner.run(arrays)
        return results if out is None else fill(out, results, names)


def bind(runner):  # noqa: ANN001, ANN201 - what a target's load returned; a BoundVM or alike
    """A hot-path caller of ``runner`` for one thread: ``run(arrays, out=None, names=None)``.
    A :class:`VMRunner` gives a :class:`BoundVM` of its own; any other runner is called
    through its ``run``."""
    return runner.bind() if isinstance(runner, VMRunner) else _Forward(runner)


class VMRunner:
    """Calls ``main`` of a library's Relax VM on numpy arrays (inputs and outputs in order).

    Safe to call from any number of threads at once. A Relax VM keeps the frames and
    registers of the call in progress in the VM object itself, so two threads in one VM
    overwrite each other's (segfaults in ``StorageObj::AllocTensor``, ``reg <
    frame->register_file.size()``). Each call therefore takes a :class:`BoundVM` (a VM and
    its held input tensors) from a pool of idle ones, or makes one when none is idle, and
    puts it back: there are as many as calls ever ran at once. A VM is cheap (about 15 us
    and 10 KiB: the VMs share the library, its weights and TVM's memory pool). A pool
    costs the same per call as one VM per thread (``threading.local``; under 1 us either
    way) but does not build a VM for each new thread, and ``close`` can drop its VMs at
    once.
    """

    def __init__(self, lib, device, pages: dict | None = None) -> None:  # noqa: ANN001 - tvm objects
        """``lib``: a module from :func:`load_library`. Makes the first VM now, so a library
        that is not a Relax executable fails at load, not at the first call. ``pages``: the
        mappings before ``lib`` loaded (:func:`_hugepages.snapshot`), for the first call."""
        self.device = device
        self._lib = lib
        self._life = _Life(pages)
        self._lock = threading.Lock()
        self._idle = [self._new()]

    @classmethod
    def open(cls, path: str | os.PathLike, device) -> VMRunner:  # noqa: ANN001 - tvm Device
        """Load the artifact at ``path`` (:func:`load_library`) into VMs on ``device``; on
        the CPU its memory goes to huge pages after the first call (:mod:`._hugepages`)."""
        pages = _hugepages.snapshot() if device.dlpack_device_type() == _CPU else None
        lib = load_library(path)
        try:
            return cls(lib, device, pages)
        except Exception as exc:
            raise ArtifactError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None

    def _new(self) -> BoundVM:
        """A new VM's ``main``, bound; the function holds its VM, the VM the library."""
        import tvm
        import tvm.runtime.vm  # not loaded by a runtime-only TVM (TVM_USE_RUNTIME_LIB=1)

        main = tvm.runtime.vm.VirtualMachine(self._lib, self.device)["main"]
        return BoundVM(main, self.device, self._life)

    def _take(self) -> BoundVM:
        # list.pop and list.append are atomic: the pool needs no lock of its own (0.3 us
        # a call saved). A give-back racing close() may land in the cleared list: it goes
        # with the runner, which the artifact dropped on close.
        if self._life.closed:
            raise ArtifactError("the artifact is closed")
        try:
            return self._idle.pop()
        except IndexError:
            pass
        with self._lock:  # TVM does not say vm_load_executable is thread-safe
            if self._lib is None:
                raise ArtifactError("the artifact is closed")
            return self._new()

    def _give_back(self, bound: BoundVM) -> None:
        if not self._life.closed:  # after close, the last reference goes here
            self._idle.append(bound)

    def bind(self) -> BoundVM:
        """A :class:`BoundVM` of the caller's own (not pooled), for one thread at a time.
        It raises :class:`ArtifactError` once :meth:`close` ran, and keeps the library
        mapped until it is dropped."""
        return self._take()

    def run(self, arrays: list[np.ndarray], out: list | None = None) -> list[np.ndarray]:
        bound = self._take()
        outputs = bound.run(arrays, out)
        # Not after an error: TVM does not say a VM whose call raised is sound; drop it.
        self._give_back(bound)
        return outputs

    def time(self, arrays: list[np.ndarray], repeat: int, warmup: int = 1) -> list[float]:
        """Seconds per call for ``repeat`` calls, inputs already on the device, one VM."""
        bound = self._take()
        args = bound.args(arrays)
        for _ in range(warmup):
            bound.main(*args)
        self.device.sync()
        if self._life.pages is not None:
            self._life.first_call()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            bound.main(*args)
            self.device.sync()
            times.append(time.perf_counter() - start)
        self._give_back(bound)
        return times

    def close(self) -> None:
        """Drop the idle VMs and the library. Calls in progress finish on their own VM (it
        holds the library), which is dropped when they end; the code is unloaded after the
        last reference goes (a :meth:`bind` caller's included). Later calls raise
        :class:`ArtifactError`."""
        with self._lock:
            self._lib = None
            self._life.closed = True
            self._idle.clear()
