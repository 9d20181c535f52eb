"""A measurement function that crashes on one call and hangs on another (in the worker)."""

from __future__ import annotations

import os
import time


def faulty_run_evaluator(rt_mod, device, evaluator_config, repeated_args):  # noqa: ANN001, ANN201
    from tvm.s_tir.meta_schedule.runner.local_runner import default_run_evaluator

    counter = os.environ["TUNING_TEST_FAULT_COUNTER"]
    with open(counter, "a") as f:
        f.write("x")
    calls = os.path.getsize(counter)
    if calls == int(os.environ["TUNING_TEST_CRASH_AT"]):
        os._exit(139)  # as if the kernel segfaulted
    if calls == int(os.environ["TUNING_TEST_HANG_AT"]):
        time.sleep(600)
    return default_run_evaluator(rt_mod, device, evaluator_config, repeated_args)
