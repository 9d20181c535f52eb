"""Transparent huge pages for a loaded artifact's memory (Linux): its weights and the
buffers its VM allocates on the first call.

Why: a CNN's weights are read once per call, spread over tens to hundreds of MB (ResNet-50
with its Winograd weights: about 300 MB), and in 4 KiB pages every few KB of them is a
TLB miss, which in a virtual machine walks two page tables. Linux backs anonymous memory
with 2 MiB pages only where it is asked to (``transparent_hugepage/enabled`` is
``madvise`` on most distributions), and neither TVM nor glibc asks. Measured on a 2-core
Xeon KVM guest, off and on in pairs of processes: ResNet-50 0.94x the time (six pairs,
0.88-1.00), MobileNetV2 0.97x; onnxruntime given the same, 0.94x and 1.00x.

How: :func:`snapshot` lists the process's private anonymous mappings before the library
loads; :func:`back` advises ``MADV_HUGEPAGE`` on every mapping that is new or changed since
then (so the weights and the VM's buffers, not the caller's earlier memory) and asks
``MADV_COLLAPSE`` (Linux 6.1 and later) to move them into huge pages now; before 6.1 the
kernel's khugepaged does it over the next minutes. ``GRAPHOPT_HUGEPAGES=0`` in the
environment turns it off; so does ``never`` in ``transparent_hugepage/enabled``.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["back", "enabled", "snapshot"]

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25  # Linux 6.1+
_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def enabled() -> bool:
    """Whether this process may ask for huge pages: Linux, not switched off by
    ``GRAPHOPT_HUGEPAGES=0`` or by the kernel's setting."""
    if not sys.platform.startswith("linux") or os.environ.get("GRAPHOPT_HUGEPAGES") == "0":
        return False
    try:
        with open(_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _mappings() -> dict[int, int]:
    """Private anonymous writable mappings of this process (the heap's included): start
    -> end."""
    out = {}
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            perms = fields[1]
            if not perms.startswith("rw") or not perms.endswith("p"):
                continue
            if len(fields) > 5 and fields[5] != "[heap]":  # a file, the stack, vdso
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out[lo] = hi
    return out


def snapshot() -> dict[int, int] | None:
    """The mappings :func:`back` will leave alone, or None where huge pages are off."""
    if not enabled():
        return None
    try:
        return _mappings()
    except OSError:
        return None


def back(before: dict[int, int] | None) -> int:
    """Advise huge pages for, and collapse into them, the 2 MiB-aligned part of every
    mapping not in ``before`` (new, grown or merged since :func:`snapshot`); the bytes
    advised. Errors (an old kernel, memory too fragmented to collapse) leave the pages
    as they were."""
    if before is None:
        return 0
    try:
        now = _mappings()
    except OSError:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    total = 0
    for lo, hi in now.items():
        if before.get(lo) == hi:
            continue
        start, end = -(-lo // _HUGE) * _HUGE, hi // _HUGE * _HUGE
        if end <= start:
            continue
        if madvise(start, end - start, _MADV_HUGEPAGE) == 0:
            total += end - start
            madvise(start, end - start, _MADV_COLLAPSE)
    return total
