"""ONNX's own backend node tests, run through graphopt with ``onnx.backend.test.BackendTest``.

Every case compiles for x86 (``graphopt.backend``, verification off) and ONNX's harness
compares the outputs with its expected values and tolerances. Cases graphopt does not
get right are listed in ``unsupported.txt`` with the reason; they are strict xfails, so
a listed case that starts passing fails the suite (delete its line), and so does a
case that is not listed and fails. ``python -m tests.onnx_backend.regenerate`` rewrites
the list from a run.

Tiers: the cases of the CNN/RNN slice (``_data.CNN_RNN_OPS``, the op under test) run in
the default suite, the other node cases under ``-m slow``. The node data is written
once into a cache folder (see ``_data.py``).

A crash (a segfault inside TVM) would end the pytest process: the regeneration command
runs the cases in worker processes, lists such a case with reason ``crash: ...`` (or
``timeout: ...`` for a hang), and the suite skips those instead of running them.
"""

from __future__ import annotations

import pytest

from graphopt.backend import GraphoptBackend
from tests.onnx_backend import _data
from tests.onnx_backend.unsupported import NOT_RUN_IN_PROCESS, read_unsupported

ROOT = _data.materialize()
OPS = _data.ops_under_test(ROOT)
UNSUPPORTED = read_unsupported()
DEVICE = "cpu"  # CUDA variants are left out: graphopt's cuda target is checked elsewhere


def default_tier(case: str) -> bool:
    return OPS[case] in _data.CNN_RNN_OPS


def _node_tests() -> type:
    """BackendTest's node test class, with only the CPU cases, each marked for its tier
    and, when listed in unsupported.txt, as a strict xfail with the listed reason."""
    cls = _data.backend_test(GraphoptBackend, __name__, ROOT).test_cases["OnnxBackendNodeModelTest"]
    for attr in [a for a in vars(cls) if a.startswith("test_")]:
        case, _, device = attr.rpartition("_")
        if device != DEVICE:
            delattr(cls, attr)
            continue
        func = getattr(cls, attr)
        reason = UNSUPPORTED.get(case)
        if reason is not None and reason.startswith(NOT_RUN_IN_PROCESS):
            func = pytest.mark.skip(reason=reason)(func)  # it would take pytest down with it
        elif reason is not None:
            func = pytest.mark.xfail(strict=True, reason=reason)(func)
        if not default_tier(case):
            func = pytest.mark.slow(func)
        setattr(cls, attr, func)
    return cls


OnnxBackendNodeModelTest = _node_tests()


def test_unsupported_list_names_only_real_cases():
    stale = sorted(set(UNSUPPORTED) - set(OPS))
    assert not stale, f"unsupported.txt names cases onnx {_data.onnx.__version__} lacks: {stale}"
