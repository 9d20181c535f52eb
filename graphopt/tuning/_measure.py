"""Building and measuring candidates: here, or on devices behind TVM's RPC tracker.

Builds run in a *persistent* pool of worker processes (MetaSchedule's LocalBuilder starts a
fresh pool per batch, and each fresh worker imports TVM's tensor intrinsics: ~20 s per
batch on a loaded 2-core machine). A build that crashes or passes ``build_timeout`` kills
only its worker and becomes a failed candidate. Measurement uses MetaSchedule's own
runners, which run each candidate in a worker process with a timeout: a candidate that
crashes or hangs is reported as an error, and the run goes on.

The builders' and the local runners' worker processes are also *kept between runs* in
one process (:func:`_kept`): each fresh worker imports TVM, about 4 s (``tvm_ffi``
imports torch where it is installed), and a ``tune`` of a two-kernel model spent 12 of
its 14 s starting its two build workers and its two runners (search and re-measure). A
second ``tune`` in the same process (the tuning benchmark's four models, a user's
script, the test suite) starts none. Kept workers are idle processes (four on a 2-core
machine, 0.40-0.47 GB resident each). A pool is started
afresh when its settings, or the environment its workers inherit (``TVM_*``, ``OMP_*``,
``GRAPHOPT_*``: thread counts, graphopt's switches), differ from the kept one's. A run
that ends by an exception or a second Ctrl-C stops them (a worker may hold a result
nobody read); :func:`release_workers` (also called at exit) stops them all. Each thread
keeps its own: a run failing in one thread never stops the pools a run in another uses;
those of a thread that has ended are stopped at the next run's start.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.runner import (
    EvaluatorConfig,
    LocalRunner,
    RPCConfig,
    RPCRunner,
    Runner,
    RunnerInput,
)
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from graphopt.errors import GraphoptError
from graphopt.targets._runner import use_all_cores

__all__ = [
    "PersistentBuilder",
    "measure",
    "release_workers",
    "local_runner",
    "rpc_runner",
    "check_tracker",
    "RPCError",
]


class RPCError(GraphoptError):
    """The RPC tracker cannot be reached, or has no device under the key."""


def _build_and_export(mod, target, cross_compiler):  # noqa: ANN001, ANN202 - runs in a worker
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    rt_mod = tvm.compile(mod, target=target)
    folder = tempfile.mkdtemp(prefix="graphopt-tune-")
    if cross_compiler:
        from tvm.support import cc

        path = os.path.join(folder, "kernel.so")
        rt_mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    else:
        from tvm.support.tar import tar

        path = os.path.join(folder, "kernel.tar")
        rt_mod.export_library(path, fcompile=tar)
    return path


def _build_one(args: tuple) -> str:
    return _build_and_export(*args)


@derived_object
class PersistentBuilder(PyBuilder):
    """A builder whose worker processes outlive a batch, and the run (:func:`_kept`): restarted
    only when one dies.

    ``cross_compiler``: a C++ compiler that links for the device (else a tar the device
    links itself, as MetaSchedule does).
    """

    def __init__(
        self, max_workers: int = 1, timeout_sec: float = 60.0, cross_compiler: str | None = None
    ) -> None:
        super().__init__()
        self.cross_compiler = cross_compiler
        self.timeout_sec = timeout_sec
        self.workers = max_workers
        self.pool = _kept(
            "build",
            (max_workers, timeout_sec),
            lambda: PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec),
        )
        self.build_seconds = 0.0

    def build(self, build_inputs: list) -> list:
        start = time.perf_counter()
        results = []
        for res in self.pool.map_with_error_catching(
            _build_one,
            [(b.mod, b.target, self.cross_compiler) for b in build_inputs],
        ):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, f"build failed: {res.value}"))
        self.build_seconds += time.perf_counter() - start
        return results


def measure(
    builder: PyBuilder, runner: Runner, target: tvm.target.Target, mods: list, args_infos: list
) -> tuple[list, float, float]:
    """Build and run ``mods`` for ``target``.

    Returns ``(run_secs or None, error or None)`` per mod, then the seconds spent building
    and measuring. A candidate that fails to build or run comes back as its error, so one
    bad schedule does not stop the search.
    """
    t0 = time.perf_counter()
    built = builder.build([BuilderInput(m, target) for m in mods])
    t1 = time.perf_counter()
    results: list[tuple] = [None] * len(mods)
    inputs, where = [], []
    for i, b in enumerate(built):
        if b.error_msg is not None:
            results[i] = (None, b.error_msg)
        else:
            inputs.append(RunnerInput(b.artifact_path, _device_type(target), args_infos[i]))
            where.append(i)
    if inputs:
        futures = runner.run(inputs)
        for i, fut in zip(where, futures, strict=True):
            r = fut.result()
            if r.error_msg is not None or not r.run_secs:
                results[i] = (None, r.error_msg or "no measurement")
            else:
                results[i] = ([float(s) for s in r.run_secs], None)
    for b in built:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    return results, t1 - t0, time.perf_counter() - t1


def _device_type(target: tvm.target.Target) -> str:
    kind = str(target.kind.name)
    return "cpu" if kind == "llvm" else kind


def _evaluator(number: int, repeat: int, min_repeat_ms: int, cold: bool = False) -> EvaluatorConfig:
    return EvaluatorConfig(
        number=number, repeat=repeat, min_repeat_ms=min_repeat_ms, enable_cpu_cache_flush=cold
    )


def local_runner(
    *,
    timeout_sec: float = 10.0,
    number: int = 3,
    repeat: int = 1,
    min_repeat_ms: int = 20,
    cold: bool = False,
) -> LocalRunner:
    """Measure on this machine, one candidate at a time, each in a worker with a timeout.

    The workers inherit graphopt's thread count, so kernels are timed as artifacts run.
    ``cold``: flush the CPU caches of every argument but the first before each repeat,
    as a kernel meets them in a model run (its input just written by the kernel before,
    its weights and output not touched since the last run); run hot, the same kernel
    called over and over keeps its weights in cache, which favours schedules that lose
    in the model.
    """
    return _kept(
        f"run-{number}x{repeat}",
        (timeout_sec, number, repeat, min_repeat_ms, cold),
        lambda: LocalRunner(
            timeout_sec=timeout_sec,
            evaluator_config=_evaluator(number, repeat, min_repeat_ms, cold),
        ),
    )


# (thread, kind) -> (settings and environment, the pool or the runner holding it). Per
# thread: a run that ends by an exception stops its own pools, never those of a run in
# another thread. What workers inherit that changes what they build or measure: TVM's and
# OpenMP's thread settings and graphopt's own switches (not all of the environment:
# importing xgboost sets KMP_* variables in the middle of the first run).
_ENV = ("TVM_", "OMP_", "GRAPHOPT_")
_KEPT: dict[tuple[int, str], tuple[tuple, Any]] = {}
_KEPT_LOCK = threading.Lock()


def _kept(kind: str, settings: tuple, start: Callable[[], Any]) -> Any:  # noqa: ANN401
    """The worker pool (or runner) ``kind`` with ``settings``: the one this thread kept from
    an earlier run in this process if it was started with the same settings under the same
    environment, else ``start()`` (this thread's kept one of this kind is stopped)."""
    use_all_cores()  # first: its thread settings are part of the environment workers get
    key = (settings, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV))))
    slot = (threading.get_ident(), kind)
    alive = {t.ident for t in threading.enumerate()}
    _stop_at_exit()
    with _KEPT_LOCK:
        held = _KEPT.pop(slot, None)
        # the pools of threads that have ended: nothing can reuse them
        gone = [_KEPT.pop(s) for s in list(_KEPT) if s[0] not in alive]
    if held is not None and held[0] != key:
        gone.append(held)
        held = None
    for _, pool in gone:
        _stop(pool)
    started = start() if held is None else held[1]
    with _KEPT_LOCK:
        _KEPT[slot] = (key, started)
    return started


@functools.cache
def _stop_at_exit() -> None:
    """Once, when a first pool is kept (nothing is registered at import)."""
    atexit.register(release_workers)


def _stop(held: Any) -> None:  # noqa: ANN401 - a PopenPoolExecutor, or a runner with one
    getattr(held, "pool", held).shutdown(wait=False)


def release_workers(this_thread_only: bool = False) -> None:
    """Stop the worker processes tuning keeps for the next run in this process (those of
    every thread, or of the calling thread's runs only)."""
    me = threading.get_ident()
    with _KEPT_LOCK:
        slots = [s for s in _KEPT if not this_thread_only or s[0] == me]
        held = [_KEPT.pop(s) for s in slots]
    for _, pool in held:
        _stop(pool)


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RPCError(f"--rpc-tracker must be HOST:PORT, got {text!r}")
    return host, int(port)


def check_tracker(host: str, port: int, key: str, timeout: float = 5.0) -> int:
    """Fail fast (one line) if the tracker is unreachable or ``key`` has no device.

    Returns how many servers the tracker lists under ``key``.
    """
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise RPCError(f"cannot reach the RPC tracker at {host}:{port}: {exc}") from None
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except Exception as exc:  # noqa: BLE001 - not a tracker, or it went away
        raise RPCError(f"{host}:{port} does not answer as a TVM RPC tracker: {exc}") from None
    servers = [s for s in summary.get("server_info", []) if s.get("key") == f"server:{key}"]
    queue = summary.get("queue_info", {}).get(key, {})
    if not servers and not queue.get("free"):
        known = sorted(
            {s.get("key", "").removeprefix("server:") for s in summary.get("server_info", [])}
            - {""}
        )
        raise RPCError(
            f"the RPC tracker at {host}:{port} has no device under key {key!r}"
            + (f" (keys it has: {', '.join(known)})" if known else " (it has no devices)")
        )
    return max(len(servers), int(queue.get("free", 0)))


def rpc_runner(
    host: str,
    port: int,
    key: str,
    devices: int,
    *,
    timeout_sec: float = 20.0,
    number: int = 3,
    repeat: int = 1,
    min_repeat_ms: int = 20,
) -> RPCRunner:
    """Measure on the devices registered under ``key``, up to one candidate per device."""
    config = RPCConfig(
        tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=int(timeout_sec)
    )
    return RPCRunner(
        rpc_config=config,
        evaluator_config=_evaluator(number, repeat, min_repeat_ms),
        max_workers=max(devices, 1),
    )
