"""Run ONNX's node cases through graphopt and rewrite ``unsupported.txt`` from the outcome.

    python -m tests.onnx_backend.regenerate                # every node case (~1,900)
    python -m tests.onnx_backend.regenerate --slice        # the CNN/RNN slice only
    python -m tests.onnx_backend.regenerate --cases test_flatten_axis0 test_lrn --dry-run

Each case runs exactly as the test suite runs it (the same ``BackendTest`` method) in a
worker process, so a crash (a segfault inside TVM) or a hang costs that case only: it is
listed with reason ``crash: ...`` or ``timeout: ...``, which the suite skips instead of
running. Cases that pass leave the list; cases that fail enter it with the first line
of their refusal or failure; cases not run this time keep their line.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import time
import traceback
import unittest
from pathlib import Path

from tests.onnx_backend import _data
from tests.onnx_backend.unsupported import LIST, read_unsupported, write_unsupported


def classify(exc: BaseException) -> str:
    """The reason line for a case that raised ``exc``."""
    from graphopt.backend import GraphoptRep
    from graphopt.errors import GraphoptError

    text = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if isinstance(exc, GraphoptError):
        return f"{type(exc).__name__}: {text[0] if text else ''}"
    if isinstance(exc, AssertionError):  # ONNX's comparison: shape, dtype or values
        heads = (
            "Not equal",
            "Mismatched elements",
            "Max abs",
            "Output",
            "Items",
            "ACTUAL",
            "DESIRED",
        )
        keep = [ln for ln in text if ln.startswith(heads)]
        return "wrong result: " + "; ".join((keep or text or ["assertion failed"])[:4])
    codes = {f.f_code for f, _ in traceback.walk_tb(exc.__traceback__)}
    where = "run" if GraphoptRep.run.__code__ in codes else "prepare"
    return f"error at {where}: {type(exc).__name__}: {text[0][:300] if text else ''}"


def _worker(conn, root: str) -> None:  # noqa: ANN001
    """Run the cases ``conn`` sends, one at a time; answer each with its outcome."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    from graphopt.backend import GraphoptBackend

    cls = _data.backend_test(GraphoptBackend, __name__, Path(root)).test_cases[
        "OnnxBackendNodeModelTest"
    ]
    while (name := conn.recv()) is not None:
        attr = f"{name}_cpu"
        try:
            getattr(cls(attr), attr)()
        except unittest.SkipTest as exc:
            conn.send(("skip", str(exc)))
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome here
            conn.send(("fail", classify(exc)))
        else:
            conn.send(("pass", ""))


class Pool:
    """One pipe per worker process, one case in flight per worker: a worker that dies or
    overruns costs its case only (``crash:``/``timeout:``) and is replaced."""

    def __init__(self, jobs: int, root: str, timeout: float, worker=None) -> None:  # noqa: ANN001
        self.ctx = mp.get_context("spawn")
        self.root, self.timeout, self.jobs = root, timeout, jobs
        self.worker = worker or _worker  # ``worker(conn, root)``: tests hand in a fake one

    def _start(self):  # noqa: ANN202
        ours, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=self.worker, args=(theirs, self.root), daemon=True)
        proc.start()
        theirs.close()
        return proc, ours

    def run(self, names: list[str], progress) -> dict[str, tuple[str, str]]:  # noqa: ANN001
        todo = collections.deque(names)
        outcomes: dict[str, tuple[str, str]] = {}
        busy = {}  # connection -> (process, case, started)
        idle = [self._start() for _ in range(min(self.jobs, len(names)))]
        while todo or busy:
            while idle and todo:
                proc, conn = idle.pop()
                name = todo.popleft()
                conn.send(name)
                busy[conn] = (proc, name, time.monotonic())
            ready = mp.connection.wait(list(busy), timeout=1.0)
            for conn in list(busy):
                proc, name, began = busy[conn]
                over = time.monotonic() - began > self.timeout
                if conn in ready:
                    try:
                        outcomes[name] = conn.recv()
                    except (EOFError, OSError):  # died mid-case
                        proc.join()
                        outcomes[name] = ("fail", f"crash: the worker died (exit {proc.exitcode})")
                elif over:
                    proc.kill()
                    proc.join()
                    outcomes[name] = ("fail", f"timeout: over {self.timeout:.0f} s")
                else:
                    continue
                del busy[conn]
                progress(name, outcomes[name])
                if proc.is_alive():
                    idle.append((proc, conn))
                else:
                    conn.close()
                    if todo:
                        idle.append(self._start())
        for proc, conn in idle:
            conn.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slice", action="store_true", help="only the CNN/RNN slice (default tier)")
    p.add_argument("--cases", nargs="*", help="only these cases (names as in unsupported.txt)")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    p.add_argument("--dry-run", action="store_true", help="print outcomes, leave the list")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case's outcome")
    args = p.parse_args(argv)

    root = _data.materialize()
    ops = _data.ops_under_test(root)
    names = sorted(ops)
    if args.slice:
        names = [n for n in names if ops[n] in _data.CNN_RNN_OPS]
    if args.cases:
        unknown = sorted(set(args.cases) - set(ops))
        if unknown:
            p.error(f"no such node case(s): {', '.join(unknown)}")
        names = sorted(args.cases)

    def progress(name: str, outcome: tuple[str, str]) -> None:
        if args.verbose or outcome[0] != "pass":
            print(f"{outcome[0]:5} {name}  {outcome[1]}", flush=True)

    started = time.monotonic()
    outcomes = Pool(max(1, args.jobs), str(root), args.timeout).run(names, progress)
    seconds = time.monotonic() - started

    listed = read_unsupported()
    for name, (status, reason) in outcomes.items():
        if status == "fail":
            listed[name] = reason
        else:
            listed.pop(name, None)
    counts = collections.Counter(s for s, _ in outcomes.values())
    kinds = collections.Counter(r.split(":")[0] for s, r in outcomes.values() if s == "fail")
    print(
        f"{len(names)} case(s) in {seconds:.0f} s with {args.jobs} worker(s): "
        f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skipped; failures: "
        + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    )
    if not args.dry_run:
        write_unsupported(listed)
        print(f"wrote {LIST} ({len(listed)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
