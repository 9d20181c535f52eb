"""``graphopt evaluate`` (:func:`evaluate`): an artifact and its fp32 reference on labelled data.

:func:`evaluate` runs the compiled artifact and the model it came from (onnxruntime for
ONNX, torch eager for a torch model: the reference ``compile`` verifies against) on the
same samples and reports, for both: accuracy, per-class precision, recall and F1 (and
their macro averages), the confusion matrix; between them: top-1 agreement and the
largest output differences (absolute and relative, with where they occur).

The data (``data``):

- a folder of ``.npz`` files (or one file), read in sorted name order: each holds one
  array per model input, named as the input, and a ``labels`` array (integer class ids);
  all share dim 0, the sample axis. Dims after the first must be the input's. Files may
  hold any number of samples: they are cut and joined into the artifact's batch size
  (the last batch is padded with copies of its last sample, whose results are dropped).
  :func:`write_dataset` writes this format.
- from Python, also any iterable of ``(inputs, label)``: a ``torch.utils.data.Dataset``
  (one sample each) or a ``DataLoader`` (a batch each); ``inputs`` is an array or tensor
  (one-input models), a tuple in input order, or a dict by input name.

The prediction is the argmax over the last axis of the chosen output (default: the
first); labels have the prediction's shape (``(N,)`` for ``(N, classes)`` logits). The
relative difference is ``|artifact - reference| / max(|reference|, 1e-3)``, so logits
near zero do not blow it up. Sample numbers count from 0 in the order read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from graphopt import frontends
from graphopt.artifact import Artifact
from graphopt.errors import InputError, VerificationError
from graphopt.prepare import load_model, reference_for

__all__ = [
    "LABELS",
    "ClassMetrics",
    "EngineMetrics",
    "Evaluation",
    "OutputDiff",
    "Peak",
    "confusion_matrix",
    "engine_metrics",
    "evaluate",
    "plot_confusion",
    "render",
    "write_dataset",
]

LABELS = "labels"  # the .npz array holding the class ids
REL_FLOOR = 1e-3  # relative differences divide by max(|reference|, this)
DYNAMIC_BATCH = 32  # samples per call for an artifact that takes any batch size
SHOWN_DISAGREEMENTS = 20


# --- metrics -----------------------------------------------------------------------------
def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """``m[true, predicted]`` counts, ``classes`` x ``classes`` int64."""
    m = np.zeros((classes, classes), np.int64)
    np.add.at(m, (np.asarray(labels).ravel(), np.asarray(predicted).ravel()), 1)
    return m


@dataclass(frozen=True)
class ClassMetrics:
    """One class: precision, recall and F1 (0 where undefined, as scikit-learn's
    ``zero_division=0``) and its support (samples whose label it is)."""

    label: int
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EngineMetrics:
    """One engine's predictions judged against the labels."""

    engine: str
    confusion: np.ndarray  # [true, predicted]

    @property
    def samples(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion)) / self.samples if self.samples else 0.0

    @property
    def per_class(self) -> list[ClassMetrics]:
        m = self.confusion
        tp = np.diag(m).astype(np.float64)
        predicted, actual = m.sum(0), m.sum(1)
        fp, fn = predicted - tp, actual - tp
        out = []
        for c in range(len(m)):
            p = tp[c] / predicted[c] if predicted[c] else 0.0
            r = tp[c] / actual[c] if actual[c] else 0.0
            denom = 2 * tp[c] + fp[c] + fn[c]
            f1 = 2 * tp[c] / denom if denom else 0.0
            out.append(ClassMetrics(c, float(p), float(r), float(f1), int(actual[c])))
        return out

    def macro(self) -> dict[str, float]:
        """Unweighted means over classes (scikit-learn's ``average="macro"``)."""
        rows = self.per_class
        return {
            k: float(np.mean([getattr(r, k) for r in rows])) if rows else 0.0
            for k in ("precision", "recall", "f1")
        }

    def to_dict(self) -> dict:
        return {
            "engine": self.engine,
            "accuracy": self.accuracy,
            "macro": self.macro(),
            "per_class": [vars(r) for r in self.per_class],
            "confusion": self.confusion.tolist(),
        }


def engine_metrics(
    engine: str, labels: np.ndarray, predicted: np.ndarray, classes: int
) -> EngineMetrics:
    return EngineMetrics(engine, confusion_matrix(labels, predicted, classes))


# --- output differences ------------------------------------------------------------------
@dataclass
class Peak:
    """The largest difference of one kind seen so far, where it is (``(sample, index in
    the sample's output)``) and the two values there."""

    value: float = 0.0
    at: tuple = ()
    artifact: float | None = None
    reference: float | None = None

    def offer(self, diff: np.ndarray, got: np.ndarray, exp: np.ndarray, first: int) -> None:
        flat = int(np.argmax(diff))
        if self.at and not diff.flat[flat] > self.value:
            return
        where = np.unravel_index(flat, diff.shape)
        self.value = float(diff.flat[flat])
        self.at = (first + int(where[0]), *map(int, where[1:]))
        self.artifact, self.reference = float(got.flat[flat]), float(exp.flat[flat])

    def to_dict(self) -> dict:
        return {
            "value": self.value,
            "sample": self.at[0] if self.at else None,
            "index": list(self.at[1:]),
            "artifact": self.artifact,
            "reference": self.reference,
        }


@dataclass
class OutputDiff:
    """The largest absolute and relative differences on one output, and the mean."""

    output: str
    absolute: Peak = field(default_factory=Peak)
    relative: Peak = field(default_factory=Peak)  # |diff| / max(|reference|, REL_FLOOR)
    total: float = 0.0
    count: int = 0

    @property
    def mean_abs(self) -> float:
        return self.total / self.count if self.count else 0.0

    def update(self, got: np.ndarray, exp: np.ndarray, first_sample: int) -> None:
        """Take in one batch's outputs; ``first_sample`` numbers its first row."""
        if not got.size:
            return
        got64, exp64 = got.astype(np.float64), exp.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(got64 - exp64)
        same = (got64 == exp64) | (np.isnan(got64) & np.isnan(exp64))  # equal inf, both NaN
        diff = np.where(same, 0.0, np.where(np.isfinite(diff), diff, np.inf))
        scale = np.maximum(np.abs(np.nan_to_num(exp64, posinf=0, neginf=0)), REL_FLOOR)
        self.absolute.offer(diff, got, exp, first_sample)
        self.relative.offer(diff / scale, got, exp, first_sample)
        self.total += float(np.sum(diff[np.isfinite(diff)]))
        self.count += diff.size

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "max_abs": self.absolute.to_dict(),
            "max_rel": self.relative.to_dict(),
            "mean_abs": self.mean_abs,
        }


# --- the result --------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured."""

    artifact: str
    target: str
    precision: str  # the artifact's, from its manifest ("fp32" when it records none)
    reference: str  # "onnxruntime" or "torch" (fp32)
    output: str  # the output whose argmax is the prediction
    classes: int
    graphopt: EngineMetrics
    ref: EngineMetrics
    agreement: float  # fraction of predictions equal between the two engines
    disagreements: int
    first_disagreements: list[int]  # sample numbers, the first SHOWN_DISAGREEMENTS
    differences: list[OutputDiff]  # one per output

    @property
    def samples(self) -> int:
        return self.graphopt.samples

    def to_dict(self) -> dict:
        return {
            "artifact": self.artifact,
            "target": self.target,
            "precision": self.precision,
            "reference": self.reference,
            "output": self.output,
            "samples": self.samples,
            "classes": self.classes,
            "agreement": self.agreement,
            "disagreements": self.disagreements,
            "first_disagreements": self.first_disagreements,
            "graphopt": self.graphopt.to_dict(),
            "reference_metrics": self.ref.to_dict(),
            "differences": [d.to_dict() for d in self.differences],
        }


# --- the data ----------------------------------------------------------------------------
def write_dataset(
    folder: str | os.PathLike,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray,
    batch_size: int = 64,
) -> list[Path]:
    """Write samples as the ``.npz`` batches :func:`evaluate` reads: ``batch-0000.npz``,
    ... each with ``batch_size`` samples (the last may hold fewer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    written = []
    for i, start in enumerate(range(0, len(labels), batch_size)):
        path = folder / f"batch-{i:04d}.npz"
        part = {k: np.asarray(v)[start : start + batch_size] for k, v in inputs.items()}
        np.savez(path, **part, **{LABELS: labels[start : start + batch_size]})
        written.append(path)
    return written


def _npz_batches(path: Path, names: list[str]) -> Iterator[tuple[dict, np.ndarray]]:
    if not path.exists():
        raise InputError(f"evaluation data not found: {path}")
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"no .npz files in {path}")
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise InputError(f"cannot read {f} as .npz: {exc}") from None
        missing = [n for n in [*names, LABELS] if n not in arrays]
        if missing:
            raise InputError(
                f"{f} lacks array(s) {', '.join(missing)}: each .npz holds one array per "
                f"model input ({', '.join(names)}) and {LABELS!r}"
            )
        yield {n: arrays[n] for n in names}, arrays[LABELS]


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, maybe on a device or needing grad
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _python_batches(data: Iterable, specs: list[dict]) -> Iterator[tuple[dict, np.ndarray]]:
    """``(inputs, label)`` items, one sample or one batch each (told apart by rank)."""
    names = [s["name"] for s in specs]
    items = (data[i] for i in range(len(data))) if _map_style(data) else iter(data)
    for n, item in enumerate(items):
        try:
            x, label = item
        except (TypeError, ValueError):
            raise InputError(f"data item {n} is not an (inputs, label) pair") from None
        if isinstance(x, dict):
            arrays = {k: _as_array(x[k]) for k in names}
        else:
            parts = x if isinstance(x, tuple | list) else (x,)
            if len(parts) != len(names):
                raise InputError(f"data item {n} has {len(parts)} input(s), the model {len(names)}")
            arrays = {k: _as_array(v) for k, v in zip(names, parts, strict=True)}
        label = _as_array(label)
        if arrays[names[0]].ndim == len(specs[0]["shape"]) - 1:  # one sample
            arrays = {k: v[None] for k, v in arrays.items()}
            label = label[None]
        yield arrays, label


def _map_style(data: Any) -> bool:
    """A ``torch.utils.data.Dataset``: indexable with a length, maybe not iterable."""
    return hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, dict)


def _checked(batches: Iterator, specs: list[dict]) -> Iterator[tuple[dict, np.ndarray]]:
    for arrays, labels in batches:
        labels = np.asarray(labels)
        for s in specs:
            a = arrays[s["name"]]
            want = tuple(s["shape"][1:])
            if a.ndim != len(s["shape"]) or tuple(a.shape[1:]) != want:
                raise InputError(
                    f"input {s['name']!r}: data of shape {a.shape}, the artifact takes "
                    f"(N, {', '.join(map(str, want))}) (dim 0: samples)"
                )
            if len(a) != len(labels):
                raise InputError(f"{len(a)} samples of {s['name']!r} but {len(labels)} labels")
            dtype = np.dtype(s["dtype"])
            if not np.can_cast(a.dtype, dtype, "same_kind"):
                raise InputError(
                    f"input {s['name']!r}: data of dtype {a.dtype}, the artifact takes {dtype}"
                )
            arrays[s["name"]] = a.astype(dtype, copy=False)
        if labels.dtype.kind not in "iu":
            raise InputError(f"labels must be integer class ids, not {labels.dtype}")
        yield arrays, labels


def _rebatch(batches: Iterator, size: int, pad: bool) -> Iterator[tuple[dict, np.ndarray, int]]:
    """Chunks of exactly ``size`` samples: ``(inputs, labels, valid)``; the last is padded
    with copies of its last sample when ``pad`` (``valid`` says how many are real)."""
    held: list[tuple[dict, np.ndarray]] = []
    count = 0
    for arrays, labels in batches:
        held.append((arrays, labels))
        count += len(labels)
        while count >= size:
            joined = _join(held)
            chunk = {k: v[:size] for k, v in joined[0].items()}, joined[1][:size]
            rest = {k: v[size:] for k, v in joined[0].items()}, joined[1][size:]
            yield *chunk, size
            held, count = [rest], len(rest[1])
    if count:
        arrays, labels = _join(held)
        if pad:
            extra = size - count
            arrays = {
                k: np.concatenate([v, np.repeat(v[-1:], extra, 0)]) for k, v in arrays.items()
            }
            labels = np.concatenate([labels, np.repeat(labels[-1:], extra, 0)])
        yield arrays, labels, count


def _join(held: list[tuple[dict, np.ndarray]]) -> tuple[dict, np.ndarray]:
    if len(held) == 1:
        return held[0]
    keys = held[0][0].keys()
    return (
        {k: np.concatenate([h[0][k] for h in held]) for k in keys},
        np.concatenate([h[1] for h in held]),
    )


# --- running both ------------------------------------------------------------------------
def _reference(artifact: Artifact, model: Any, trust_pickle: bool) -> tuple[str, Callable]:
    """The fp32 reference at the artifact's input shapes (as ``graphopt verify`` makes it)."""
    torch = sys.modules.get("torch")  # an nn.Module means torch is imported already
    if torch is not None and isinstance(model, torch.nn.Module):
        example = artifact.random_inputs()
        model = frontends.from_torch(model, tuple(example[s["name"]] for s in artifact.input_specs))
    shapes = {s["name"]: tuple(s["shape"]) for s in artifact.input_specs}
    source, graph = load_model(model, shapes, trust_pickle=trust_pickle)
    name, make = reference_for(source, graph)
    try:
        return name, make()
    except Exception as exc:  # e.g. an onnxruntime too old for the file's IR version
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(
            f"{name} cannot run this model, so graphopt cannot evaluate against it: {msg}"
        ) from None


def evaluate(
    artifact: Artifact | str | os.PathLike,
    reference: Any,
    data: str | os.PathLike | Iterable,
    *,
    output: str | None = None,
    batch_size: int | None = None,
    trust_pickle: bool = False,
    log: Callable[[str], None] | None = None,
) -> Evaluation:
    """Run ``artifact`` and ``reference`` (the model it was compiled from: ONNX path or
    ``ModelProto``, ``.pt2`` path, ``graphopt.from_torch`` result, ``ExportedProgram`` or
    ``nn.Module``) on ``data`` (see the module docstring) and judge both.

    ``output``: the output whose argmax is the prediction (default: the first).
    ``batch_size``: samples per call for a dynamic-batch artifact (default 32); a
    fixed-batch artifact takes its own.
    """
    options = {"output": output, "batch_size": batch_size, "trust_pickle": trust_pickle}
    if isinstance(artifact, Artifact):
        return _evaluate(artifact, reference, data, log=log, **options)
    with Artifact(artifact) as art:  # opened here: its code is unloaded when done
        return _evaluate(art, reference, data, log=log, **options)


def _evaluate(  # noqa: ANN001
    art: Artifact, reference, data, *, output, batch_size, trust_pickle, log
) -> Evaluation:
    say = log or (lambda _msg: None)
    specs = art.input_specs
    output = output or art.output_names[0]
    if output not in art.output_names:
        raise InputError(f"no output {output!r}; the artifact has {', '.join(art.output_names)}")
    dynamic = bool(art.symbolic_dims)
    size = (batch_size or DYNAMIC_BATCH) if dynamic else int(specs[0]["shape"][0])
    ref_name, run_reference = _reference(art, reference, trust_pickle)
    if isinstance(data, str | os.PathLike):
        batches = _npz_batches(Path(data), [s["name"] for s in specs])
    else:
        batches = _python_batches(data, specs)
    preds: dict[str, list] = {"graphopt": [], "reference": []}
    labels_seen: list[np.ndarray] = []
    diffs = {name: OutputDiff(name) for name in art.output_names}
    classes = None
    done = 0
    for inputs, labels, valid in _rebatch(_checked(batches, specs), size, pad=not dynamic):
        got, exp = art.run(inputs), run_reference(inputs)
        for name, d in diffs.items():
            g, e = np.asarray(got[name])[:valid], np.asarray(exp[name])[:valid]
            if g.shape != e.shape:
                raise InputError(f"output {name!r}: artifact shape {g.shape}, reference {e.shape}")
            d.update(g, e, done)
        logits = np.asarray(got[output])
        if logits.ndim < 2:
            raise InputError(f"output {output!r} of shape {logits.shape} has no class axis")
        classes = logits.shape[-1]
        for key, out in (("graphopt", logits), ("reference", np.asarray(exp[output]))):
            preds[key].append(out[:valid].argmax(-1))
        if preds["graphopt"][-1].shape != labels[:valid].shape:
            raise InputError(
                f"labels of shape {labels[:valid].shape[1:]} per batch, but output {output!r} "
                f"gives predictions of shape {preds['graphopt'][-1].shape[1:]}"
            )
        labels_seen.append(labels[:valid])
        done += valid
    if not done:
        raise InputError("the evaluation data holds no samples")
    labels = np.concatenate(labels_seen).ravel()
    if labels.min() < 0 or labels.max() >= classes:
        raise InputError(
            f"labels must lie in 0..{classes - 1} (output {output!r} has {classes} classes)"
        )
    ours, theirs = (np.concatenate(preds[k]) for k in ("graphopt", "reference"))
    differ = np.flatnonzero((ours != theirs).reshape(len(ours), -1).any(1))
    agreement = float(np.mean(ours.ravel() == theirs.ravel()))
    say(f"evaluated {done} samples with graphopt and {ref_name}")
    return Evaluation(
        artifact=str(art.path),
        target=art.manifest["target"]["name"],
        precision=str(art.manifest.get("precision", "fp32")),
        reference=ref_name,
        output=output,
        classes=classes,
        graphopt=engine_metrics("graphopt", labels, ours.ravel(), classes),
        ref=engine_metrics(ref_name, labels, theirs.ravel(), classes),
        agreement=agreement,
        disagreements=len(differ),
        first_disagreements=[int(i) for i in differ[:SHOWN_DISAGREEMENTS]],
        differences=list(diffs.values()),
    )


# --- showing it --------------------------------------------------------------------------
def agreement_line(result: Evaluation) -> str:
    """``top-1 agreement 99.72% with onnxruntime (1 of 360 samples differ: 17)``."""
    shown = ", ".join(map(str, result.first_disagreements))
    more = ", ..." if result.disagreements > len(result.first_disagreements) else ""
    which = f": {shown}{more}" if result.disagreements else ""
    return (
        f"top-1 agreement {100 * result.agreement:.2f}% with {result.reference} "
        f"({result.disagreements} of {result.samples} samples differ{which})"
    )


def render(result: Evaluation, file: IO[str] | None = None) -> None:
    """Print the metrics of both engines side by side, the agreement and the differences."""
    from rich.console import Console  # only for the tables, not on ``import graphopt``
    from rich.table import Table

    console = Console(file=file, highlight=False)
    if not console.is_terminal:
        console.width = 120
    ours, ref = result.graphopt, result.ref
    head = f"graphopt ({result.precision})", f"{result.reference} (fp32)"
    console.print(
        f"{Path(result.artifact).name} ({result.target}, {result.precision}) vs "
        f"{result.reference} (fp32) on {result.samples} samples, {result.classes} classes "
        f"(argmax of output {result.output!r})",
        markup=False,
    )
    summary = Table()
    summary.add_column("metric")
    for h in head:
        summary.add_column(h, justify="right")
    summary.add_row("accuracy", f"{100 * ours.accuracy:.2f}%", f"{100 * ref.accuracy:.2f}%")
    m_ours, m_ref = ours.macro(), ref.macro()
    for k in ("precision", "recall", "f1"):
        summary.add_row(f"macro {k}", f"{m_ours[k]:.4f}", f"{m_ref[k]:.4f}")
    console.print(summary)

    per = Table(title="per class (graphopt / reference)", title_justify="left")
    for name in ("class", "support", "precision", "recall", "F1"):
        per.add_column(name, justify="right")
    for a, b in zip(ours.per_class, ref.per_class, strict=True):
        per.add_row(
            str(a.label),
            str(a.support),
            f"{a.precision:.4f} / {b.precision:.4f}",
            f"{a.recall:.4f} / {b.recall:.4f}",
            f"{a.f1:.4f} / {b.f1:.4f}",
        )
    console.print(per)
    console.print(agreement_line(result), markup=False)

    diffs = Table(title="largest output differences (graphopt - reference)", title_justify="left")
    for name in (
        "output",
        "max |diff|",
        "at (sample, index)",
        "graphopt",
        "reference",
        "max rel",
        "at",
        "mean |diff|",
    ):
        diffs.add_column(name, justify="left" if name == "output" else "right")
    for d in result.differences:
        diffs.add_row(
            d.output,
            f"{d.absolute.value:.3g}",
            str(d.absolute.at),
            f"{d.absolute.artifact:.6g}",
            f"{d.absolute.reference:.6g}",
            f"{d.relative.value:.3g}",
            str(d.relative.at),
            f"{d.mean_abs:.3g}",
        )
    console.print(diffs)


def plot_confusion(result: Evaluation, path: str | os.PathLike) -> Path:
    """Both confusion matrices side by side as a PNG (matplotlib, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'graphopt[eval]'") from None
    n = result.classes
    fig = Figure(figsize=(5.5 * 2, 5), layout="constrained")
    FigureCanvasAgg(fig)  # a canvas of its own: pyplot's global backend is left alone
    axes = fig.subplots(1, 2)
    engines = (
        (result.graphopt, f"graphopt ({result.precision})"),
        (result.ref, f"{result.reference} (fp32)"),
    )
    for ax, (metrics, title) in zip(axes, engines, strict=True):
        m = metrics.confusion
        image = ax.imshow(m, cmap="Blues")
        ax.set_title(f"{title}: accuracy {100 * metrics.accuracy:.2f}%")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ticks = range(n) if n <= 30 else range(0, n, max(1, n // 10))
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
        if n <= 30:
            for (i, j), v in np.ndenumerate(m):
                if v:
                    dark = v > m.max() / 2
                    ax.text(
                        j,
                        i,
                        str(v),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{Path(result.artifact).name}: {agreement_line(result)}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
