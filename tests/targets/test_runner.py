"""The CPU runtime's thread pool: one thread per physical core, unless the user says."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from onnx import helper

import graphopt
from graphopt.targets._runner import THREAD_VARS
from tests.conftest import make_model

_PROBE = """
import sys, graphopt, tvm
art = graphopt.load(sys.argv[1])
art.run(art.random_inputs(seed=0))
print(tvm.get_global_func("runtime.NumThreads")())
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": (4, 64)}, {"y": (4, 64)})
    return graphopt.compile(model, "x86", tmp_path_factory.mktemp("t") / "t.so")


def _probe(script: str, path, drop=THREAD_VARS, **env) -> int:  # noqa: ANN001
    """The last number ``script`` prints, run on ``path`` in a fresh Python without the
    variables in ``drop`` and with ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


def _threads(path, **env) -> int:  # noqa: ANN001
    return _probe(_PROBE, path, **env)


def test_one_thread_per_physical_core(artifact):
    # TVM alone takes half the logical CPUs on x86 (it assumes hyperthreads): on a VM
    # whose vCPUs are cores that is half the machine.
    usable = len(os.sched_getaffinity(0))
    assert _threads(artifact.path) == min(psutil.cpu_count(logical=False) or usable, usable)


def test_a_thread_count_the_user_set_is_kept(artifact):
    assert _threads(artifact.path, TVM_NUM_THREADS="1") == 1
    assert _threads(artifact.path, OMP_NUM_THREADS="1") == 1


_PINNED = """
import os, sys, graphopt
art = graphopt.load(sys.argv[1])
art.run(art.random_inputs(seed=0))
every = os.sched_getaffinity(0)
tids = [int(t) for t in os.listdir("/proc/self/task")]
print(sum(os.sched_getaffinity(t) != every for t in tids))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin to")
def test_pool_threads_are_not_pinned_unless_asked(tmp_path):
    """TVM pins its pool's workers to cores but not the calling thread, which then shared
    a core with a worker in some processes (DenseNet-121 58 ms instead of 37 on a 2-core
    VM); graphopt leaves them unpinned unless TVM_BIND_THREADS says otherwise."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], {"x": (64, 1024)}, {"y": (64, 1024)}
    )
    path = graphopt.compile(model, "x86", tmp_path / "big.so").path
    drop = (*THREAD_VARS, "TVM_BIND_THREADS")
    assert _probe(_PINNED, path, drop) == 0
    assert _probe(_PINNED, path, drop, TVM_BIND_THREADS="1") > 0  # what TVM does by itself


def test_emulation_hands_its_runner_a_so_name(tmp_path, monkeypatch):
    # The aarch64 runner's Module::LoadFromFile picks its loader by the file's suffix, so
    # graphopt passes it a link named .so to the artifact (model.art). No qemu needed:
    # the runner's command is caught where it would start.
    from graphopt.targets import _emulation

    artifact = tmp_path / "model.art"
    artifact.write_bytes(b"the library")
    monkeypatch.setattr(_emulation, "ensure_kit", lambda: tmp_path)
    monkeypatch.setattr(_emulation, "_need", lambda tool, _package: tool)
    seen = {}

    def fake_run(cmd, **_kwargs):
        _qemu, _l, _sysroot, _runner, library, _spec, outdir, _repeat = cmd
        seen.update(name=Path(library).name, data=Path(library).read_bytes())
        (Path(outdir) / "out0.txt").write_text("2 32 1 3")  # float32, shape (1, 3)
        (Path(outdir) / "out0.bin").write_bytes(np.arange(3, dtype=np.float32).tobytes())
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(_emulation.subprocess, "run", fake_run)
    outs = _emulation.EmulatedRunner(artifact).run([np.zeros((1, 4), np.float32)])
    assert seen == {"name": "model.so", "data": b"the library"}
    np.testing.assert_array_equal(outs[0], [[0, 1, 2]])
