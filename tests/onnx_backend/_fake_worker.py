"""A stand-in for regenerate's worker (light to import in a spawned process): case
``crash`` kills the process, ``hang`` never answers, ``bad`` fails, others pass."""

from __future__ import annotations

import os
import signal
import time


def worker(conn, root: str) -> None:  # noqa: ANN001, ARG001
    while (name := conn.recv()) is not None:
        if name == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if name == "hang":
            time.sleep(600)
        conn.send(("fail", "UnsupportedOpsError: no") if name == "bad" else ("pass", ""))
