"""benchmarks/gpu_remote.py: an artifact built here runs where only TVM's runtime is.

The GPU half needs a GPU; its CPU dry run (``--arch x86`` / ``--device cpu``) goes through
the same code: the manifest read from the file's tail, ``tvm.runtime.load_module``, the
Relax VM, the comparison with onnxruntime's outputs. It runs with TVM_USE_RUNTIME_LIB=1 so
TVM's compiler library is never loaded, as on a deployment host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_remote.py"


def _script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_built_artifact_runs_on_the_runtime_alone_and_a_wrong_one_fails(tmp_path):
    built = _script("build", str(tmp_path), "--arch", "x86", "--models", "mlp_head")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "mlp_head.so").exists() and (tmp_path / "mlp_head.npz").exists()

    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "TVM_NUM_THREADS": "1"}
    ran = _script("run", str(tmp_path), "--device", "cpu", "--repeat", "2", env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    row = next(line for line in ran.stdout.splitlines() if line.startswith("| mlp_head"))
    assert "| yes |" in row

    # a reference that does not match must fail the run, not print "yes"
    data = dict(np.load(tmp_path / "mlp_head.npz"))
    data["ref:0"] = data["ref:0"] + 1.0
    np.savez(tmp_path / "mlp_head.npz", **data)
    wrong = _script("run", str(tmp_path), "--device", "cpu", "--repeat", "2", env=env)
    assert wrong.returncode == 1
    assert "| NO |" in wrong.stdout
