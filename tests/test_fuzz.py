"""Fuzz ``graphopt compile`` with mutated ONNX models (hypothesis).

Every mutant of a small valid model must meet the CLI contract: exit 0 with a verified
artifact, or exit 2 with one ``error:`` line; never an internal error (exit 1), a crash,
a traceback or a hang. Compiles run in worker processes (:mod:`tests._fuzz_worker`), so
a segfault in TVM is a finding, not the end of the test run.

Default tier: 100 distinct mutants, a fixed seed, well under a minute. Slow tier
(``-m slow``): 2,000, a fresh seed each run (printed). ``GRAPHOPT_FUZZ_SEED`` and
``GRAPHOPT_FUZZ_MODELS`` override both. Every breaching model is kept, with what was done
to it and the command that reproduces it, in ``GRAPHOPT_FUZZ_FAILURES`` (default
``.pytest_cache/d/fuzz-failures``). Models that exit 2 because TVM failed on something
graphopt accepted ("a graphopt/TVM limitation: please report it") keep the contract; they
are printed and kept in its ``limitations/`` folder, as leads for earlier checks.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from tests._fuzz import Campaign, WorkerPool, contract_breach, mutants, seed_bytes

# One worker per core (2 on the development machine), each compiling single-threaded;
# at most 4, as each holds TVM and onnxruntime in memory.
WORKERS = min(len(os.sched_getaffinity(0)), 4)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    pool = WorkerPool(WORKERS, tmp_path_factory.mktemp("fuzz-workers"))
    yield pool
    pool.close()


@pytest.fixture
def failures_dir(pytestconfig, tmp_path_factory) -> Path:
    """Where breaching models are kept: somewhere that outlives the run."""
    if os.environ.get("GRAPHOPT_FUZZ_FAILURES"):
        return Path(os.environ["GRAPHOPT_FUZZ_FAILURES"])
    cache = getattr(pytestconfig, "cache", None)  # None under -p no:cacheprovider
    return cache.mkdir("fuzz-failures") if cache else tmp_path_factory.mktemp("fuzz-failures")


def fuzz(pool: WorkerPool, workdir: Path, failures: Path, count: int, fuzz_seed: int) -> None:
    """Compile ``count`` distinct mutants; fail listing every breach (not only the
    first), so one run reports all it found."""
    count = int(os.environ.get("GRAPHOPT_FUZZ_MODELS", count))
    fuzz_seed = int(os.environ.get("GRAPHOPT_FUZZ_SEED", fuzz_seed))
    campaign = Campaign(pool, workdir, failures)
    start = time.monotonic()

    # Generating a mutant takes about a millisecond; room for the duplicates it skips.
    @seed(fuzz_seed)
    @settings(
        max_examples=3 * count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(mutants())
    def run(mutant):
        if len(campaign.seen) < count:
            campaign.add(mutant)

    run()
    campaign.finish()
    exits, total = campaign.exits, len(campaign.seen)
    print(
        f"\nfuzzed {total} distinct models ({campaign.duplicates} duplicates skipped) in "
        f"{time.monotonic() - start:.0f} s, seed {fuzz_seed}: exit statuses {dict(exits)}, "
        f"{pool.restarts} worker restarts"
    )
    if campaign.limitations:  # reported, not failed: see tests._fuzz.Campaign.finish
        print(f"{len(campaign.limitations)} TVM limitation(s):\n" + "\n".join(campaign.limitations))
    assert not campaign.breaches, (
        f"{len(campaign.breaches)} of {total} mutants break the compile contract (seed "
        f"{fuzz_seed}; models kept in {failures}):\n" + "\n".join(campaign.breaches)
    )
    assert total >= count, f"only {total} distinct mutants of {count}"
    # A fuzzer that never gets past the frontend, or never reaches it, tests little.
    assert exits["0"] and exits["2"], f"exit statuses {dict(exits)}"


def test_a_crash_or_hang_is_a_finding_not_the_end(tmp_path):
    """A worker killed mid-compile (as the OOM killer or a segfault in TVM would) or
    running past the timeout is reported against its model, and the next model gets a
    fresh worker.

    SIGKILL, not SIGSEGV: a SIGSEGV sent from outside runs the crash handlers (Python's
    faulthandler, LLVM's stack printer) at whatever point the compile is in, and under
    load one of them once hung past the 60 s limit; the pool's handling of a dead worker
    is the same for every signal."""
    commands = {}
    for name in ("cnn", "lstm"):
        (tmp_path / f"{name}.onnx").write_bytes(seed_bytes(name))
        commands[name] = ["compile", str(tmp_path / f"{name}.onnx"), "-o", str(tmp_path / "m.so")]
    pool = WorkerPool(1, tmp_path, timeout=60)
    try:
        pool.map([["--version"]])  # started and warm
        threading.Timer(0.3, pool.workers[0][0].send_signal, [signal.SIGKILL]).start()
        crashed, after = pool.map([commands["cnn"], commands["cnn"]])
        assert crashed["rc"] == "worker killed by SIGKILL"
        assert contract_breach(crashed, tmp_path / "m.so").startswith("exit status worker killed")
        assert after["rc"] == 0 and pool.restarts == 1
        pool.timeout = 0.2  # a first LSTM compile takes longer
        assert pool.map([commands["lstm"]])[0]["rc"] == "timeout after 0 s"
        pool.timeout = 60
        assert pool.map([["--version"]])[0]["rc"] == 0 and pool.restarts == 2
    finally:
        pool.close()


def test_fuzz_compile(pool, tmp_path, failures_dir):
    fuzz(pool, tmp_path, failures_dir, count=100, fuzz_seed=0)


@pytest.mark.slow
def test_fuzz_compile_long(pool, tmp_path, failures_dir):
    fuzz(pool, tmp_path, failures_dir, count=2000, fuzz_seed=random.randrange(2**32))
