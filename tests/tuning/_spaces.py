"""Checks shared by the tuning-space tests (tests/tuning, tests/targets): a design space's
random points build and compute what the default kernel computes."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir
from tvm.s_tir.meta_schedule.arg_info import ArgInfo


def run_kernel(mod: tvm.IRModule, args: list[np.ndarray]) -> np.ndarray:
    """Build ``mod`` for the host and run its ``main`` on ``args``: the last one's result."""
    lib = tvm.compile(mod, target=tvm.target.Target("llvm"))
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def random_args(mod: tvm.IRModule, rng: np.random.Generator) -> list[np.ndarray]:
    """Random arrays for every argument of ``mod``'s ``main`` (outputs included)."""
    return [
        rng.standard_normal([int(d) for d in info.shape]).astype(str(info.dtype))
        for info in ArgInfo.from_prim_func(mod["main"])
    ]


def assert_points_match(task_mod, space, expected, args, seeds) -> int:  # noqa: ANN001
    """Replay ``space``'s trace on ``task_mod`` with fresh random decisions, once per seed
    in ``seeds``; each point's output must match ``expected``. Returns the points run."""
    trace = space.trace.simplified(remove_postproc=True)
    for seed in seeds:
        sch = s_tir.Schedule(task_mod, seed=seed)
        s_tir.Trace(trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
        np.testing.assert_allclose(run_kernel(sch.mod, args), expected, rtol=1e-4, atol=1e-4)
    return len(seeds)
