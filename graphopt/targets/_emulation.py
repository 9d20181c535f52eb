"""Run aarch64 artifacts on an x86 host under QEMU user-mode emulation.

The kit lives in ``$GRAPHOPT_CACHE`` (default ``~/.cache/graphopt``) under
``aarch64-tvm-<tvm version>/``: the aarch64 ``libtvm_runtime.so`` and ``libtvm_ffi.so``
taken from the PyPI wheels of the TVM versions installed here, and graphopt's runner
(``_aarch64_runner.cc``) cross-built against them. :func:`ensure_kit` builds it once
(``graphopt setup-emulation`` does it ahead of time). ``GRAPHOPT_AARCH64_WHEELS`` may
name a folder holding those two wheels, for machines without PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from graphopt.errors import ArtifactError

__all__ = ["EmulatedRunner", "ensure_kit", "kit_dir", "QEMU"]

QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")
_RUNNER_SRC = Path(__file__).with_name("_aarch64_runner.cc")
# wheel project name -> the library the runner links against
_WHEEL_LIBS = {
    "apache_tvm": "tvm/lib/libtvm_runtime.so",
    "apache_tvm_ffi": "tvm_ffi/lib/libtvm_ffi.so",
}
_DL_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}


def _versions() -> tuple[str, str]:
    from importlib.metadata import version

    return version("apache-tvm"), version("apache-tvm-ffi")


def cache_root() -> Path:
    """graphopt's cache: ``$GRAPHOPT_CACHE``, else ``~/.cache/graphopt`` (README)."""
    return Path(os.environ.get("GRAPHOPT_CACHE", Path.home() / ".cache" / "graphopt"))


def kit_dir() -> Path:
    tvm_version, ffi_version = _versions()
    return cache_root() / f"aarch64-tvm-{tvm_version}-ffi-{ffi_version}"


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ArtifactError(
            f"running an ARM artifact on this {os.uname().machine} host needs {tool}: "
            f"apt-get install {package} (or copy the artifact to an aarch64 device; see README)"
        )
    return path


def _fetch_wheels(dest: Path) -> list[Path]:
    local = os.environ.get("GRAPHOPT_AARCH64_WHEELS")
    if local:
        return sorted(Path(local).glob("*.whl"))
    tvm_version, ffi_version = _versions()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--platform",
        "manylinux_2_28_aarch64",
        "--python-version",
        "3.11",
        f"apache-tvm=={tvm_version}",
        f"apache-tvm-ffi=={ffi_version}",
        "-d",
        str(dest),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ArtifactError(f"cannot download the aarch64 TVM runtime wheels: {last}")
    return sorted(dest.glob("*.whl"))


def ensure_kit(log=None) -> Path:  # noqa: ANN001 - callable(str)
    """Return the kit folder, building it on first use."""
    _need(QEMU, "qemu-user")
    kit = kit_dir()
    runner = kit / "runner"
    if runner.is_file():
        return kit
    cxx = _need("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")
    (log or (lambda _m: None))(f"building the aarch64 emulation kit in {kit} (once)")
    kit.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kit.parent) as tmp:
        tmp = Path(tmp)
        build = tmp / "kit"
        build.mkdir()
        wheels = _fetch_wheels(tmp)
        for project, member in _WHEEL_LIBS.items():
            wheel = next(
                (w for w in wheels if w.name.split("-")[0] == project and "aarch64" in w.name), None
            )
            if wheel is None:
                raise ArtifactError(
                    f"no aarch64 wheel of {project} among {[w.name for w in wheels]}"
                )
            with zipfile.ZipFile(wheel) as zf:
                (build / Path(member).name).write_bytes(zf.read(member))
        import tvm_ffi

        include = Path(tvm_ffi.__file__).parent / "include"
        cmd = [
            cxx,
            "-std=c++17",
            "-O2",
            f"-I{include}",
            str(_RUNNER_SRC),
            f"-L{build}",
            "-Wl,--no-as-needed",
            "-ltvm_runtime",
            "-ltvm_ffi",
            "-Wl,-rpath,$ORIGIN",
            "-o",
            str(build / "runner"),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ArtifactError(f"building the aarch64 runner failed: {result.stderr[-500:]}")
        try:
            build.rename(kit)
        except OSError:  # another process finished first
            if not runner.is_file():
                raise
    return kit


class EmulatedRunner:
    """Runs an aarch64 artifact through the kit's runner under qemu-aarch64."""

    emulated = True

    def __init__(self, artifact: Path) -> None:
        self.artifact = Path(artifact).resolve()
        self.kit = ensure_kit()
        self.qemu = _need(QEMU, "qemu-user")

    def _invoke(
        self, arrays: list[np.ndarray], repeat: int
    ) -> tuple[list[np.ndarray], list[float]]:
        with tempfile.TemporaryDirectory(prefix="graphopt-arm-") as tmp:
            tmp = Path(tmp)
            # The runner's Module::LoadFromFile picks its loader by the file's suffix: a
            # link named .so lets an artifact of any name (model.art) load.
            library = tmp / "model.so"
            library.symlink_to(self.artifact)
            lines = []
            for i, arr in enumerate(arrays):
                arr = np.ascontiguousarray(arr)
                path = tmp / f"in{i}.bin"
                path.write_bytes(arr.tobytes())
                bits = 8 if arr.dtype.kind == "b" else arr.dtype.itemsize * 8
                dims = " ".join(str(d) for d in arr.shape)
                lines.append(f"{_DL_CODES[arr.dtype.kind]} {bits} {arr.ndim} {dims} {path}")
            (tmp / "spec.txt").write_text("\n".join(lines) + "\n")
            cmd = [
                self.qemu,
                "-L",
                str(SYSROOT),
                str(self.kit / "runner"),
                str(library),
                str(tmp / "spec.txt"),
                str(tmp),
                str(repeat),
            ]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise ArtifactError(f"the ARM artifact failed under emulation: {detail}")
            outs = []
            i = 0
            while (tmp / f"out{i}.txt").exists():
                code, bits, *dims = (int(v) for v in (tmp / f"out{i}.txt").read_text().split())
                kind = {v: k for k, v in _DL_CODES.items()}[code]
                dtype = np.dtype(bool) if kind == "b" else np.dtype(f"{kind}{bits // 8}")
                data = np.frombuffer((tmp / f"out{i}.bin").read_bytes(), dtype=dtype)
                outs.append(data.reshape(dims).copy())
                i += 1
            times = [
                float(line.split()[1]) / 1e3
                for line in result.stdout.splitlines()
                if line.startswith("time_ms ")
            ]
            return outs, times

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self._invoke(arrays, 0)[0]

    def time(self, arrays: list[np.ndarray], repeat: int, warmup: int = 1) -> list[float]:
        """Seconds per emulated call: useful to compare runs, not to judge the device."""
        return self._invoke(arrays, repeat)[1]
