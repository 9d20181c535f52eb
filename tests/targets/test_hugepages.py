"""An artifact's memory in transparent huge pages (graphopt/targets/_hugepages.py): only
what is new since the snapshot is advised, the kernel collapses it, the switch works, and
a runner's results do not change."""

from __future__ import annotations

import mmap
import platform
import sys
import time

import numpy as np
import pytest

from graphopt.targets import _hugepages

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's"
)


def _kernel_collapses() -> bool:
    """MADV_COLLAPSE: Linux 6.1 and later."""
    major, minor = (int(p) for p in platform.release().split(".")[:2])
    return (major, minor) >= (6, 1)


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


def test_only_memory_new_since_the_snapshot_is_advised(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("GRAPHOPT_HUGEPAGES", raising=False)
    if not _hugepages.enabled():
        pytest.skip("transparent huge pages are off in this kernel (enabled: never)")
    before = _hugepages.snapshot()
    assert _hugepages.back(_hugepages.snapshot()) == 0  # nothing new: nothing advised
    # 64 MiB in a mapping of its own (numpy's allocator may reuse an old one), touched
    memory = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    weights = np.frombuffer(memory, np.float32)
    weights[:] = 1
    advised = _hugepages.back(before)
    assert advised >= weights.nbytes - (4 << 20)
    if _kernel_collapses():
        address = weights.ctypes.data + weights.nbytes // 2  # past the unaligned head
        assert _huge_bytes_at(address) >= 32 << 20, "MADV_COLLAPSE left 4 KiB pages"
    assert float(weights.sum()) == weights.size  # the values survive the move


def test_graphopt_hugepages_0_switches_it_off(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("GRAPHOPT_HUGEPAGES", "0")
    assert not _hugepages.enabled()
    assert _hugepages.snapshot() is None
    assert _hugepages.back(None) == 0


def test_a_runner_backs_its_memory_after_the_first_call_and_computes_the_same(
    monkeypatch,  # noqa: ANN001
) -> None:
    pytest.importorskip("tvm")
    import graphopt
    from graphopt.zoo import build

    monkeypatch.delenv("GRAPHOPT_HUGEPAGES", raising=False)
    if not _hugepages.enabled():
        pytest.skip("transparent huge pages are off in this kernel (enabled: never)")
    art = graphopt.compile(build("small_cnn"), "x86")
    inputs = art.random_inputs(seed=1)
    monkeypatch.setenv("GRAPHOPT_HUGEPAGES", "0")
    plain = graphopt.load(art.path)
    expected = plain.run(inputs)
    assert plain._load()._life.pages is None  # switched off: no snapshot taken
    monkeypatch.delenv("GRAPHOPT_HUGEPAGES")
    backed = graphopt.load(art.path)
    life = backed._load()._life
    assert life.pages is not None  # the snapshot, until the first call
    runner = backed.runner()
    first = runner.run(inputs)
    assert life.pages is None
    time.sleep(0.2)  # the move runs on a thread of its own
    for _ in range(3):
        for name, value in runner.run(inputs).items():
            np.testing.assert_array_equal(value, expected[name])
    for name, value in first.items():
        np.testing.assert_array_equal(value, expected[name])
