"""``python -m tests._fuzz_worker``: run ``graphopt`` commands in one long-lived process.

The fuzz test (:mod:`tests.test_fuzz`) sends one JSON list of command-line arguments per
line on stdin; for each, this process runs :func:`graphopt.cli.main` exactly as the
``graphopt`` command would and answers one JSON line ``{"rc", "out", "err"}`` with
everything written to file descriptors 1 and 2 meanwhile (Python's streams and native
code such as TVM's logging alike, so a traceback printed anywhere is seen).

One process for many models, because importing TVM costs more than rejecting a typical
mutated model. A crash (a segfault in TVM, an abort) kills only this process; the
parent sees the pipe close, records the model, and starts another worker.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import sys
import tempfile
import traceback

# A mutated model may ask for absurd allocations; an address-space cap turns them into
# MemoryError here (a finding) instead of swapping or an OOM kill of the whole machine.
_MEMORY_LIMIT = int(os.environ.get("GRAPHOPT_FUZZ_MEMORY", str(8 << 30)))


def _run(argv: list[str]) -> dict:
    """Run one command with fds 1 and 2 captured; ``rc`` is the exit status, or the
    traceback text when ``main`` let an exception out (a contract breach)."""
    from graphopt.cli import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            rc: int | str = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: BLE001 - reported as the finding it is
            rc = "raised"
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        out.seek(0)
        err.seek(0)
        return {
            "rc": rc,
            "out": out.read().decode(errors="replace"),
            "err": err.read().decode(errors="replace"),
        }


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > _MEMORY_LIMIT:
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, hard))
    answers = os.fdopen(os.dup(1), "w", buffering=1)  # fd 1 itself is captured per command
    # A crash's Python stack goes to the worker's own stderr (the pool's log), not to a
    # capture file that dies with the process.
    faulthandler.enable(os.fdopen(os.dup(2), "w"))
    import onnxruntime  # noqa: F401 - pay for TVM and onnxruntime once, up front

    import graphopt.compiler  # noqa: F401
    import graphopt.lower.relax  # noqa: F401

    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        answers.write(json.dumps(_run(json.loads(line))) + "\n")


if __name__ == "__main__":
    main()
