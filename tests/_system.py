"""Tests that need a system tool from Debian's packages skip, naming the package, when it
is absent; ``.ci/run`` installs every one and sets ``GRAPHOPT_REQUIRE_TOOLS=1``, so in CI
they run (and a missing tool fails them) instead of skipping quietly."""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["needs_tool", "CROSS_GXX", "QEMU", "DOT"]


def needs_tool(tool: str, package: str) -> pytest.MarkDecorator:
    """Skip unless ``tool`` is on PATH; the reason says which apt package brings it."""
    missing = shutil.which(tool) is None and os.environ.get("GRAPHOPT_REQUIRE_TOOLS") != "1"
    return pytest.mark.skipif(
        missing, reason=f"needs {tool}: apt-get install {package} (see README, 'Tests')"
    )


CROSS_GXX = needs_tool("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")
QEMU = needs_tool("qemu-aarch64", "qemu-user")
DOT = needs_tool("dot", "graphviz")
