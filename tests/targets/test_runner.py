"""The CPU runtime's thread pool: one thread per physical core, unless the user says."""

import os
import subprocess
import sys

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


def _threads(path, **env) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


def test_one_thread_per_physical_core(artifact):
    # TVM alone takes half the logical CPUs on x86 (it assumes hyperthreads): on a VM
    # whose vCPUs are cores that is half the machine.
    usable = len(os.sched_getaffinity(0))
    assert _threads(artifact.path) == min(psutil.cpu_count(logical=False) or usable, usable)


def test_a_thread_count_the_user_set_is_kept(artifact):
    assert _threads(artifact.path, TVM_NUM_THREADS="1") == 1
    assert _threads(artifact.path, OMP_NUM_THREADS="1") == 1
