"""Tests that need a system tool from Debian's packages skip, naming the package, when it
is absent; ``.ci/run`` installs every one and sets ``GRAPHOPT_REQUIRE_TOOLS=1``, so in CI
they run (and a missing tool fails them) instead of skipping quietly.

Tests that run bf16 kernels on this machine need a CPU feature no package brings: they
skip, naming it, on a CPU without ``avx512_bf16`` (an AVX2-only Zen 3, say), where
``precision=bf16`` is refused by design."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

__all__ = ["needs_tool", "CROSS_GXX", "QEMU", "DOT", "HOST_BF16", "needs_host_bf16"]


def needs_tool(tool: str, package: str) -> pytest.MarkDecorator:
    """Skip unless ``tool`` is on PATH; the reason says which apt package brings it."""
    missing = shutil.which(tool) is None and os.environ.get("GRAPHOPT_REQUIRE_TOOLS") != "1"
    return pytest.mark.skipif(
        missing, reason=f"needs {tool}: apt-get install {package} (see README, 'Tests')"
    )


CROSS_GXX = needs_tool("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")
QEMU = needs_tool("qemu-aarch64", "qemu-user")
DOT = needs_tool("dot", "graphviz")

_CPUINFO = Path("/proc/cpuinfo")
HOST_BF16 = _CPUINFO.exists() and "avx512_bf16" in _CPUINFO.read_text()
needs_host_bf16 = pytest.mark.skipif(
    not HOST_BF16, reason="needs a CPU with avx512_bf16 (/proc/cpuinfo) to run bf16 kernels"
)
