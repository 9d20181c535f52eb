"""The artifact: one deployable file, a TVM shared library with graphopt's manifest.

Layout: the exact bytes ``export_library`` wrote, then the manifest as UTF-8 JSON, its
length as 8 little-endian bytes, then ``MAGIC``. The dynamic loader ignores bytes past
the ELF segments, so the file loads unchanged with ``tvm.runtime.load_module`` (TVM
runtime alone), and the manifest is readable on any machine without loading the code.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

from graphopt.errors import ArtifactError, InputError

__all__ = ["Artifact", "load", "read_manifest", "append_manifest", "MAGIC", "check_inputs"]

MAGIC = b"\x00GRAPHOPT-MANIFEST-v1"
_LEN = 8


def append_manifest(path: Path, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with open(path, "ab") as f:
        f.write(data + len(data).to_bytes(_LEN, "little") + MAGIC)


def read_manifest(path: str | os.PathLike) -> dict:
    """Read the manifest of an artifact file without loading its code."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        tail = len(MAGIC) + _LEN
        if size < tail:
            raise ArtifactError(f"{path} is not a graphopt artifact (too short)")
        f.seek(size - tail)
        end = f.read(tail)
        if end[_LEN:] != MAGIC:
            raise ArtifactError(f"{path} is not a graphopt artifact (no manifest)")
        n = int.from_bytes(end[:_LEN], "little")
        if n > size - tail:
            raise ArtifactError(f"{path} has a corrupt manifest")
        f.seek(size - tail - n)
        try:
            return json.loads(f.read(n))
        except ValueError:
            raise ArtifactError(f"{path} has a corrupt manifest") from None


def check_inputs(specs: list[dict], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Validate ``inputs`` against the manifest's input specs; return them in order."""
    names = [s["name"] for s in specs]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unknown {', '.join(extra)}")
        raise InputError(
            f"inputs do not match the model ({'; '.join(parts)}); expected: "
            + ", ".join(f"{s['name']}{tuple(s['shape'])}:{s['dtype']}" for s in specs)
        )
    arrays = []
    for spec in specs:
        arr = np.asarray(inputs[spec["name"]])
        if tuple(arr.shape) != tuple(spec["shape"]):
            raise InputError(
                f"input {spec['name']!r} has shape {tuple(arr.shape)}, "
                f"expected {tuple(spec['shape'])}"
            )
        if str(arr.dtype) != spec["dtype"]:
            raise InputError(
                f"input {spec['name']!r} has dtype {arr.dtype}, expected {spec['dtype']}"
            )
        arrays.append(arr)
    return arrays


class Artifact:
    """A compiled model: ``artifact(**inputs)`` or ``artifact.run(inputs)`` -> outputs dict."""

    def __init__(self, path: str | os.PathLike, manifest: dict | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        self._runner = None

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.manifest['target']['name']!r})"

    @property
    def input_specs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def _load(self):  # noqa: ANN202
        if self._runner is None:
            from graphopt.targets import module_for

            self._runner = module_for(self.manifest["target"]["name"]).load(self.path)
        return self._runner

    @property
    def emulated(self) -> bool:
        """True when this host runs the artifact under emulation (an ARM one on x86)."""
        return bool(getattr(self._load(), "emulated", False))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = check_inputs(self.input_specs, inputs)
        outs = self._load().run(arrays)
        return dict(zip(self.output_names, outs, strict=True))

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(inputs)

    def benchmark(self, inputs: dict[str, np.ndarray], repeat: int = 10) -> dict:
        """Latency in milliseconds over ``repeat`` runs after one warm-up run."""
        arrays = check_inputs(self.input_specs, inputs)
        times = [t * 1e3 for t in self._load().time(arrays, repeat)]
        return {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "max_ms": max(times),
            "repeat": repeat,
        }

    def random_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        return random_inputs(self.input_specs, seed)

    def save(self, path: str | os.PathLike) -> Artifact:
        """Copy to ``path`` atomically (a complete file or the old one, never half)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        os.close(fd)
        try:
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Artifact(path, self.manifest)


def random_inputs(specs: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal floats, small non-negative ints, random bools."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        if dtype.kind == "f":
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec["name"]] = rng.integers(0, 10, shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec["name"]] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise InputError(f"cannot make random inputs of dtype {dtype} for {spec['name']!r}")
    return out


def load(path: str | os.PathLike) -> Artifact:
    """Open an artifact written by :func:`graphopt.compile` (the code loads on first run)."""
    return Artifact(path)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise InputError(f"cannot read {path} as .npz: {exc}") from None
