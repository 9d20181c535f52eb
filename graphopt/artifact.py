"""The artifact: one deployable file, a TVM shared library with graphopt's manifest.

Layout: the exact bytes ``export_library`` wrote, then the manifest as UTF-8 JSON, its
length as 8 little-endian bytes, then ``MAGIC``. The dynamic loader ignores bytes past
the ELF segments, so the file loads unchanged with ``tvm.runtime.load_module`` (TVM
runtime alone), and the manifest is readable on any machine without loading the code.

The manifest records the SHA-256 of the library bytes before it (``library.sha256``);
graphopt checks it before it loads any code, so a truncated, zeroed or spliced file (a
manifest from another build) is one clear error, not a crash or wrong numbers.

A dynamic-batch artifact's manifest names its batch dim in the shapes (``["N", 3, 224,
224]``) and lists it in ``symbolic_dims``; it runs inputs of any size there, one size
shared by every input that names the symbol.

Running: ``Artifact.run`` (any number of threads) and, for serving, ``Artifact.runner()``:
a :class:`Runner` for one thread that keeps its VM and input buffers between calls and
can write outputs into the caller's arrays (docs/serving.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from graphopt.errors import ArtifactError, InputError
from graphopt.targets import target_named
from graphopt.targets._runner import BoundVM, bind
from graphopt.verify import random_inputs

__all__ = [
    "Artifact",
    "Runner",
    "load",
    "read_manifest",
    "append_manifest",
    "library_digest",
    "is_artifact",
    "check_library",
    "MAGIC",
    "check_inputs",
    "symbolic_dims",
    "concrete_specs",
]

MAGIC = b"\x00GRAPHOPT-MANIFEST-v1"
_LEN = 8


def append_manifest(path: Path, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with open(path, "ab") as f:
        f.write(data + len(data).to_bytes(_LEN, "little") + MAGIC)


def library_digest(path: str | os.PathLike, size: int | None = None) -> dict:
    """``{"sha256", "bytes"}`` of the first ``size`` bytes of ``path`` (all when None)."""
    h = hashlib.sha256()
    left = Path(path).stat().st_size if size is None else size
    done = 0
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
            done += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": done}


def _manifest_span(path: Path) -> tuple[int, int]:
    """``(library bytes, manifest bytes)`` of an artifact file, checking its trailer."""
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
        return size - tail - n, n


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file ending in graphopt's manifest marker (cheap: reads the
    last bytes only; :func:`read_manifest` and :func:`check_library` check the rest)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size <= len(MAGIC):
        return False
    with open(path, "rb") as f:
        f.seek(-len(MAGIC), os.SEEK_END)
        return f.read() == MAGIC


def read_manifest(path: str | os.PathLike) -> dict:
    """Read the manifest of an artifact file without loading its code."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    start, n = _manifest_span(path)
    with open(path, "rb") as f:
        f.seek(start)
        try:
            manifest = json.loads(f.read(n))
        except ValueError:
            raise ArtifactError(f"{path} has a corrupt manifest") from None
    if not isinstance(manifest, dict) or not all(
        k in manifest for k in ("target", "inputs", "outputs")
    ):
        raise ArtifactError(f"{path} has a corrupt manifest (fields missing)")
    return manifest


def check_library(path: str | os.PathLike, manifest: dict) -> dict:
    """Check the library bytes of ``path`` against ``manifest["library"]``; return the
    digest. Raises :class:`ArtifactError` for a damaged file or a foreign manifest."""
    path = Path(path)
    recorded = manifest.get("library")
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        raise ArtifactError(
            f"{path} records no library checksum (written by an older graphopt?): recompile it"
        )
    size, _ = _manifest_span(path)
    digest = library_digest(path, size)
    if digest["bytes"] != recorded.get("bytes") or digest["sha256"] != recorded["sha256"]:
        raise ArtifactError(
            f"{path} is damaged: its library ({digest['bytes']} bytes, sha256 "
            f"{digest['sha256'][:12]}...) is not the one its manifest records "
            f"({recorded.get('bytes')} bytes, {str(recorded['sha256'])[:12]}...); "
            "recompile or copy it again"
        )
    return digest


def symbolic_dims(specs: list[dict]) -> list[str]:
    """The symbols (dynamic batch) among the dims of ``specs``, in order of appearance."""
    names = [d for s in specs for d in s["shape"] if isinstance(d, str)]
    return list(dict.fromkeys(names))


def concrete_specs(specs: list[dict], size: int = 1) -> list[dict]:
    """``specs`` with every symbolic dim set to ``size`` (to make inputs of that batch)."""
    return [{**s, "shape": [size if isinstance(d, str) else d for d in s["shape"]]} for s in specs]


def _shape_error(spec: dict, arr: np.ndarray, bound: dict[str, int]) -> str | None:
    """Why ``arr`` does not fit ``spec``'s shape, binding its symbolic dims in ``bound``
    (the first input that names a symbol sets its size; the others must agree)."""
    want = spec["shape"]
    if arr.ndim == len(want):
        for got, dim in zip(arr.shape, want, strict=True):
            if not isinstance(dim, str):
                if got != dim:
                    break
            elif got < 1:
                return f"dim {dim} must be at least 1, got {got}"
            elif bound.setdefault(dim, got) != got:
                return f"dim {dim} is {bound[dim]} in another input, here {got}"
        else:
            return None
    return f"expected {tuple(want)}"


def check_inputs(specs: list[dict], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Validate ``inputs`` against the manifest's input specs; return them in order.
    A symbolic dim takes any size of at least 1, the same in every input."""
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
    bound: dict[str, int] = {}
    for spec in specs:
        arr = np.asarray(inputs[spec["name"]])
        why = _shape_error(spec, arr, bound)
        if why is not None:
            raise InputError(f"input {spec['name']!r} has shape {tuple(arr.shape)}, {why}")
        if str(arr.dtype) != spec["dtype"]:
            raise InputError(
                f"input {spec['name']!r} has dtype {arr.dtype}, expected {spec['dtype']}"
            )
        arrays.append(arr)
    return arrays


class _Inputs:
    """``check_inputs`` made cheap for the calls that pass it: the names, dtypes and the
    last accepted shapes are kept as tuples, so a call whose inputs have those shapes and
    dtypes costs a few comparisons. Anything else goes through :func:`check_inputs`, so
    every error is the same one, worded the same way. Safe across threads: a verdict
    depends only on the shapes, and the kept shapes are swapped whole."""

    def __init__(self, specs: list[dict]) -> None:
        self.specs = specs
        self.names = tuple(s["name"] for s in specs)
        self.dtypes = tuple(np.dtype(s["dtype"]) for s in specs)
        fixed = not symbolic_dims(specs)
        self.shapes = tuple(tuple(s["shape"]) for s in specs) if fixed else None

    def from_dict(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if len(inputs) == len(self.names):
            try:
                given = [inputs[n] for n in self.names]
            except KeyError:
                pass
            else:
                return self.from_list(given)
        return check_inputs(self.specs, inputs)  # raises: names missing or unknown

    def from_list(self, given: Sequence) -> Sequence[np.ndarray]:
        """``given`` (in input order) as checked arrays (``given`` itself when it passes
        the fast check: numpy arrays of the kept shapes and the dtypes)."""
        shapes = self.shapes
        if shapes is not None and len(given) == len(shapes):
            for a, shape, dtype in zip(given, shapes, self.dtypes):  # noqa: B905 - same length
                if type(a) is not np.ndarray or a.shape != shape or a.dtype != dtype:
                    break
            else:
                return given
        names = self.names
        if len(given) > len(names):
            raise InputError(
                f"{len(given)} inputs given, the model takes {len(names)}: " + ", ".join(names)
            )
        arrays = check_inputs(self.specs, dict(zip(names, given)))  # noqa: B905 - raises
        self.shapes = tuple(a.shape for a in arrays)
        return arrays


class Runner:
    """The hot path for serving: ``runner = artifact.runner()``, then ``runner(x)`` or
    ``runner.run({"x": x})``, again and again.

    It keeps what ``Artifact.run`` looks up or makes on each call: its own Relax VM, the
    input tensors (for the shapes of the last call; a dynamic batch of a new size makes
    new ones, once) and the checks' expectations. Inputs are checked as ``Artifact.run``
    checks them (names, shapes, dtypes; the same :class:`InputError`), copied into the
    held tensors (large aligned inputs are lent without a copy), and each output is
    copied once into a new array, or into the caller's ``out`` arrays. A returned array
    is the caller's: a later call does not change it.

    One thread at a time: a second thread calling while a call is in progress gets an
    :class:`ArtifactError` (make one runner per thread; they share the loaded code and
    weights). Closing the artifact makes later calls raise; the code is unloaded once
    every runner has seen the close or been dropped.
    """

    def __init__(self, artifact: Artifact, batch: int | None = None) -> None:
        if batch is not None and (not isinstance(batch, int) or batch < 1):
            raise InputError(f"batch must be a whole number of at least 1, got {batch!r}")
        self.artifact = artifact
        self.input_names = artifact._inputs.names
        self.output_names = tuple(artifact.output_names)
        self._inputs = artifact._inputs
        self._busy = threading.Lock()
        self._bound = bind(artifact._load())
        if isinstance(self._bound, BoundVM):  # the buffers now, not on the first call
            specs = concrete_specs(artifact.input_specs, batch or 1)
            self._bound.hold(tuple(tuple(s["shape"]) for s in specs), self._inputs.dtypes)

    def __repr__(self) -> str:
        return f"Runner({self.artifact!r})"

    def __call__(
        self, *arrays: np.ndarray, out: Sequence[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Outputs (in ``output_names`` order) for ``arrays`` (in ``input_names`` order);
        with ``out``, copied into those arrays (each exactly the output's shape and dtype),
        which are returned."""
        return self._run(self._inputs.from_list(arrays), None if out is None else list(out))

    def run(
        self, inputs: dict[str, np.ndarray], out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """As ``Artifact.run``: a dict of outputs by name; ``out`` maps output names to
        arrays to fill (all of the outputs)."""
        arrays = self._inputs.from_dict(inputs)
        names = self.output_names
        if out is not None:
            if len(out) != len(names) or any(n not in out for n in names):
                raise InputError(
                    f"out must name every output ({', '.join(names)}); got {', '.join(out)}"
                )
            out = [out[n] for n in names]
        return dict(zip(names, self._run(arrays, out), strict=True))

    def _run(self, checked: Sequence[np.ndarray], out: list | None) -> list[np.ndarray]:
        if not self._busy.acquire(False):
            raise ArtifactError(
                "a Runner was called from two threads at once: make one per thread "
                "(artifact.runner()), or call Artifact.run"
            )
        try:
            bound = self._bound
            if bound is None:
                bound = self._bound = bind(self.artifact._load())
            try:
                return bound.run(checked, out, self.output_names)
            except InputError:
                raise
            except BaseException:  # TVM does not say a VM whose call raised is sound
                self._bound = None
                raise
        finally:
            self._busy.release()


class Artifact:
    """A compiled model: ``artifact(**inputs)`` or ``artifact.run(inputs)`` -> outputs dict."""

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: dict | None = None,
        *,
        check: bool = True,
        owned_dir: str | os.PathLike | None = None,
    ) -> None:
        """``check=False`` skips the library checksum: only for a library graphopt has
        just built and not yet sealed with its manifest (``compile`` verifying it).
        ``owned_dir``: a temporary folder holding the library (``compile`` without an
        ``output``), removed with this artifact: at :meth:`close`, or when the last
        reference goes (or at interpreter exit). Keep a copy with :meth:`save`."""
        self.path = Path(path)
        self._remove = (
            weakref.finalize(self, shutil.rmtree, Path(owned_dir), ignore_errors=True)
            if owned_dir is not None
            else None
        )
        self._check = check
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        self._runner = None
        self._lock = threading.Lock()
        self._closed = False
        self._inputs = _Inputs(self.manifest["inputs"])
        self._output_names = [o["name"] for o in self.manifest["outputs"]]

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.manifest['target']['name']!r})"

    @property
    def input_specs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    def _load(self):  # noqa: ANN202
        runner = self._runner
        if runner is not None:
            return runner
        with self._lock:  # one load, however many threads call first
            if self._closed:
                raise ArtifactError(f"{self.path} is closed")
            if self._runner is None:
                target = target_named(self.manifest["target"]["name"])
                if self._check:  # before any of its code loads
                    check_library(self.path, self.manifest)
                self._runner = target.load(self.path, self.manifest)
            return self._runner

    def close(self) -> None:
        """Release the loaded code and its memory (weights, workspaces). Idempotent;
        ``run`` afterwards raises. ``with graphopt.load(path) as art:`` closes on exit.
        An artifact ``compile`` wrote to a temporary folder (no ``output``) removes it."""
        with self._lock:
            self._closed = True
            runner, self._runner = self._runner, None
        if runner is not None and hasattr(runner, "close"):
            runner.close()
        if self._remove is not None:
            self._remove()

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def emulated(self) -> bool:
        """True when this host runs the artifact under emulation (an ARM one on x86)."""
        return bool(getattr(self._load(), "emulated", False))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for ``inputs`` by name (checked: names, shapes, dtypes). Safe
        from any number of threads; for the least overhead per call see :meth:`runner`."""
        arrays = self._inputs.from_dict(inputs)
        outs = self._load().run(arrays)
        return dict(zip(self._output_names, outs, strict=True))

    def runner(self, batch: int | None = None) -> Runner:
        """A :class:`Runner`: the hot path for serving, for one thread. Its buffers are
        made now for the manifest's shapes (a dynamic batch: for ``batch`` when given);
        other batch sizes still run. Loads the code if no call has yet."""
        return Runner(self, batch)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(inputs)

    def benchmark(self, inputs: dict[str, np.ndarray], repeat: int = 10) -> dict:
        """Latency in milliseconds over ``repeat`` runs after one warm-up run."""
        arrays = self._inputs.from_dict(inputs)
        times = [t * 1e3 for t in self._load().time(arrays, repeat)]
        return {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "max_ms": max(times),
            "repeat": repeat,
        }

    @property
    def symbolic_dims(self) -> list[str]:
        """The dims (a dynamic batch) that take any size at run time; [] for fixed shapes."""
        return symbolic_dims(self.input_specs)

    def random_inputs(self, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
        """Seeded inputs; a symbolic dim (dynamic batch) gets size ``batch``."""
        return random_inputs(concrete_specs(self.input_specs, batch), seed)

    def save(self, path: str | os.PathLike) -> Artifact:
        """Copy to ``path`` atomically (a complete file or the old one, never half).
        Refused after :meth:`close` when the library lived in a temporary folder."""
        path = Path(path)
        if not self.path.exists():
            raise ArtifactError(f"cannot save {self.path}: it no longer exists (closed?)")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        os.close(fd)
        try:
            shutil.copyfile(self.path, tmp)
            shutil.copymode(self.path, tmp)  # mkstemp made it 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Artifact(path, self.manifest)


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
