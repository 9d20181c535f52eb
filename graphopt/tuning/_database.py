"""The tuning database: a directory that survives ``kill -9`` at any point.

Layout of ``DB/``:

- ``meta.json``: format, target (name + TVM dict), TVM version. Written once, atomically
  (temporary file + rename), before anything else; a directory with records but no
  ``meta.json`` is refused.
- ``records.jsonl``: append-only, one JSON object per line, each written with a single
  ``write()`` on an ``O_APPEND`` descriptor (fsync'd per batch). Kinds (key ``t``):
  ``wl`` (a workload: key, task name, FLOPs, the PrimFunc as MetaSchedule's Workload JSON),
  ``rec`` (one measured candidate: its TuningRecord JSON (:func:`record_json`), or ``ok:
  false`` and the error),
  ``base`` (the default schedule's latency for a workload), ``end`` (the search space of a
  workload is exhausted: nothing left to try), ``chk`` (the best record and the default
  measured again side by side, which ``compile`` then judges the record by), ``ctx``
  (the best record and the default timed inside a model run, each kernel call meeting
  the caches its neighbours left: when made for the current best, ``compile`` judges the
  record by these instead).

``model-latency.json`` (written by ``tune``, atomically) caches the model's timing
before/after per model, layout and records size, so a rerun that adds nothing reuses it
and ``compile`` keeps the default schedules for a model that measured slower tuned.

A process killed mid-``write()`` can only leave a torn *last* line (no trailing newline):
it is dropped on open and cut off before the next append. Any other line that does not
parse means the file is corrupt, and it is refused (:class:`TuningDatabaseError`), never
half-applied.

Workloads are keyed by the structural hash of the normalized PrimFunc module, recomputed
on load (a TVM upgrade that changes hashing just re-keys), and checked with structural
equality, so a hash collision cannot apply one kernel's schedule to another.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir.meta_schedule.database import MemoryDatabase, TuningRecord, Workload
from tvm.s_tir.meta_schedule.database import database as _ms_database
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from graphopt.errors import GraphoptError

__all__ = ["TuningDatabase", "TuningDatabaseError", "workload_mod", "record_json", "FORMAT"]

FORMAT = "graphopt-tuning/1"
META = "meta.json"
RECORDS = "records.jsonl"
# Target keys that change generated code; others (num-cores, host) do not make a DB foreign.
_TARGET_KEYS = ("kind", "mtriple", "mcpu", "mattr", "arch")
# A failed candidate's latency in the MetaSchedule database (as its AddToDatabase does).
FAILED_SECS = 1e10
# A record "improves" a workload (for early stopping) when this much faster than its best.
_GAIN = 0.99


class TuningDatabaseError(GraphoptError):
    """A tuning database that is corrupt, from another target, or not one at all."""


def record_json(record: TuningRecord):  # noqa: ANN201 - JSON types
    """``record`` as JSON types, as ``TuningRecord.as_json`` makes them, with an index map
    (the input of a trace's ``transform_layout``) written as its JSON graph text.

    Why: TVM 0.27's ``as_json`` raises on an ``IndexMap`` ("Not supported type"), so a
    trace that transforms a buffer's layout (a 1x1 conv's pixels as one row,
    ``_cpu_schedules._flatten_pixels``) could not be written; that text, braces and
    all, is the form ``TuningRecord.from_json`` reads an index map back from."""
    return _json_types(_ms_database._ffi_api.TuningRecordAsJSON(record))


def _json_types(obj):  # noqa: ANN001, ANN202
    if obj is None or isinstance(obj, bool | int | float):
        return obj
    if isinstance(obj, tvm.tirx.IntImm | tvm.tirx.FloatImm):
        return obj.value
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, tvm.tirx.IndexMap):
        return tvm.ir.save_json(obj)
    if isinstance(obj, tvm_ffi.Map):
        return {_json_types(k): _json_types(v) for k, v in obj.items()}
    if isinstance(obj, tvm_ffi.Array):
        return [_json_types(item) for item in obj]
    raise TypeError(f"a tuning record holds a {type(obj).__name__}, not written as JSON")


def workload_mod(func) -> tvm.IRModule:  # noqa: ANN001 - tirx.PrimFunc
    """The IRModule MetaSchedule tunes for one kernel (the key of its records)."""
    return _normalize_mod(func)


def _target_identity(tvm_dict: dict) -> dict:
    out = {}
    for key in _TARGET_KEYS:
        if key in tvm_dict:
            value = tvm_dict[key]
            out[key] = sorted(value) if isinstance(value, list | tuple) else value
    return out


@dataclass
class _Entry:
    """Everything the database knows about one workload."""

    key: str
    workload: Workload
    name: str
    flops: float
    trials: int = 0
    failed: int = 0
    best_secs: float | None = None
    best: TuningRecord | None = None
    baseline_secs: float | None = None
    exhausted: bool = False
    improved_at: int = 0  # the trial count when the best last got >= 1% faster
    # (default, best, best_secs then): the best record re-measured beside the default
    checked: tuple[float, float, float] | None = None
    line: dict = field(default_factory=dict)
    # every record that ran, by its mean seconds (how a whole-model check's selection
    # names it: ``record_at``)
    records: dict[float, TuningRecord] = field(default_factory=dict)
    # every record timed inside a model run, by its mean seconds: (default, record) per
    # call there, the latest timing of each, in the order they were made
    in_models: dict[float, tuple[float, float]] = field(default_factory=dict)

    @property
    def in_model(self) -> tuple[float, float, float] | None:
        """(default, record, the record's seconds): the last timing inside a model run."""
        if not self.in_models:
            return None
        at, (default, best) = next(reversed(self.in_models.items()))
        return default, best, at

    def note_in_model(self, default: float, best: float, at: float) -> None:
        """The record that measured ``at`` seconds and the default, each timed per call
        inside a model run: the latest timing of that record, made last."""
        self.in_models.pop(at, None)
        self.in_models[at] = (default, best)

    def confirmed(self) -> tuple[float | None, float | None]:
        """(default, best) seconds to judge the best record by: timed inside a model
        run when that was done for the current best, else the side-by-side check when it
        was, else the search's measurements."""
        if self.best_secs in self.in_models:
            return self.in_models[self.best_secs]
        if self.checked is not None and self.checked[2] == self.best_secs:
            return self.checked[0], self.checked[1]
        return self.baseline_secs, self.best_secs

    def choice(self) -> tuple[TuningRecord, float, float | None, float] | None:
        """The record ``compile`` applies, the seconds it measured in the search (its
        name in :attr:`records`) and the (default, record) seconds that judged it, or
        None (the default schedule): the best record where it beats its default
        (``beats_default``, by :meth:`confirmed`'s times); else, where an earlier record
        beat the default inside a model run at its latest timing there, the latest such.

        Why the earlier record: a longer search finds records faster alone, and the new
        best can lose inside the model where an earlier best won there (MobileNetV2 on
        the Zen 5 of benchmarks/RESULTS.md: 4 of the 30-minute search's 10 records
        dropped inside the model); without it, that kernel went back to its default."""
        default, best = self.confirmed()
        if self.best is not None and beats_default(default, best):
            return self.best, self.best_secs, default, best
        for secs, (d, b) in reversed(self.in_models.items()):
            record = self.record_at(secs)
            if secs != self.best_secs and record is not None and beats_default(d, b):
                return record, secs, d, b
        return None

    def judged(self) -> tuple[float | None, float | None]:
        """(default, tuned) seconds of what compile builds for this kernel: those of
        :meth:`choice`, else :meth:`confirmed`'s (which the default beats)."""
        chosen = self.choice()
        return (chosen[2], chosen[3]) if chosen is not None else self.confirmed()

    def record_at(self, secs: float | None) -> TuningRecord | None:
        """The record that measured ``secs`` (a ``best_secs`` of the past), or None."""
        return self.records.get(secs) if secs is not None else None

    def stalled(self, patience: int) -> bool:
        """Whether the last ``patience`` trials found nothing 1% faster (0: never)."""
        return patience > 0 and self.trials - self.improved_at >= patience


class TuningDatabase:
    """Open (or create) the database at ``path`` for ``target`` (a TargetSpec).

    ``create=False`` refuses a directory that is not already a database (for compile).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        target,  # noqa: ANN001
        *,
        create: bool = True,
        precision: str | None = "fp32",
    ) -> None:
        self.path = Path(path)
        self.target = target
        self.precision = precision  # None: take the database's, whatever it is
        self.memory = MemoryDatabase()  # the search strategies' view (top-k per workload)
        self._entries: dict[str, list[_Entry]] = {}  # structural hash -> entries
        self._by_line_key: dict[str, _Entry] = {}  # the key records.jsonl lines use
        self._fd: int | None = None
        self._open(create)

    # --- opening -------------------------------------------------------------------------
    def _open(self, create: bool) -> None:
        meta_path = self.path / META
        records = self.path / RECORDS
        if self.path.exists() and not self.path.is_dir():
            raise TuningDatabaseError(f"tuning database {self.path} is a file, not a directory")
        if not meta_path.exists():
            if records.exists() and records.stat().st_size > 0:
                raise TuningDatabaseError(
                    f"tuning database {self.path} has records but no {META}: refusing to use it"
                )
            if not create:
                raise TuningDatabaseError(
                    f"{self.path} is not a tuning database (no {META}); "
                    "create one with `graphopt tune`"
                )
            self._write_meta()
        self._check_meta(meta_path)
        self._load(records)

    def _write_meta(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "target": {"name": self.target.name, "tvm": self.target.tvm},
            "tvm_version": tvm.__version__,
            "precision": self.precision or "fp32",
        }
        tmp = self.path / f".{META}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, self.path / META)

    def _check_meta(self, meta_path: Path) -> None:
        try:
            meta = json.loads(meta_path.read_text())
            fmt, target = meta["format"], meta["target"]
            name, tvm_dict = target["name"], target["tvm"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TuningDatabaseError(
                f"tuning database {self.path}: unreadable {META} ({type(exc).__name__})"
            ) from None
        if fmt != FORMAT:
            raise TuningDatabaseError(
                f"tuning database {self.path} has format {fmt!r}; this graphopt reads {FORMAT!r}"
            )
        mine = _target_identity(self.target.tvm)
        theirs = _target_identity(tvm_dict)
        if name != self.target.name or mine != theirs:
            raise TuningDatabaseError(
                f"tuning database {self.path} was tuned for {name} {json.dumps(theirs)}, "
                f"not {self.target.name} {json.dumps(mine)}; use a database per target"
            )
        theirs_p = meta.get("precision", "fp32")  # databases from before precisions: fp32
        if self.precision is None:
            self.precision = theirs_p
        elif theirs_p != self.precision:
            raise TuningDatabaseError(
                f"tuning database {self.path} was tuned at precision {theirs_p}, not "
                f"{self.precision}; use a database per precision"
            )

    def _load(self, records: Path) -> None:
        if not records.exists():
            return
        data = records.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        if torn:
            # a write cut short by a kill: drop it now, cut it off before appending
            self._torn_at = len(data) - len(torn)
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                self._apply_line(json.loads(raw))
            except Exception as exc:  # noqa: BLE001 - any bad line: corrupt file
                raise TuningDatabaseError(
                    f"tuning database {records} is corrupt at line {number} "
                    f"({type(exc).__name__}); refusing to use it"
                ) from None

    _torn_at: int | None = None

    def _apply_line(self, line: dict) -> None:
        kind = line["t"]
        if kind == "wl":
            workload = Workload.from_json(line["mod"])
            entry = self._add_entry(workload, line["name"], float(line["flops"]))
            entry.key = line["w"]
            self._by_line_key[line["w"]] = entry
            return
        entry = self._by_line_key[line["w"]]
        if kind == "rec":
            entry.trials += 1
            if line["ok"]:
                record = TuningRecord.from_json(line["r"], entry.workload)
                self._note_record(entry, record)
                # the search's view too: a resumed search neither re-measures a candidate
                # nor starts blind (it mutates the best measured ones)
                self.memory.commit_tuning_record(record)
            else:
                entry.failed += 1
        elif kind == "base":
            entry.baseline_secs = float(line["secs"])
        elif kind == "end":
            entry.exhausted = True
        elif kind in ("chk", "ctx"):
            made = (float(line["default"]), float(line["best"]), float(line["at"]))
            if kind == "chk":
                entry.checked = made
            else:
                entry.note_in_model(*made)
        else:
            raise ValueError(f"unknown line kind {kind!r}")

    # --- lookup --------------------------------------------------------------------------
    def _add_entry(self, workload: Workload, name: str, flops: float) -> _Entry:
        mod = workload.mod
        key = str(tvm_ffi.structural_hash(mod))
        for entry in self._entries.get(key, []):
            if tvm_ffi.structural_equal(entry.workload.mod, mod):
                return entry
        workload = self.memory.commit_workload(mod)
        n = len(self._by_line_key)
        while f"w{n}" in self._by_line_key:
            n += 1
        entry = _Entry(key=f"w{n}", workload=workload, name=name, flops=flops)
        self._entries.setdefault(key, []).append(entry)
        return entry

    def find(self, mod: tvm.IRModule) -> _Entry | None:
        """The entry for a normalized kernel module, or None if never tuned."""
        for entry in self._entries.get(str(tvm_ffi.structural_hash(mod)), []):
            if tvm_ffi.structural_equal(entry.workload.mod, mod):
                return entry
        return None

    def entry(self, key: str) -> _Entry | None:
        """The entry ``records.jsonl`` names ``key`` (``w0``, ``w1``, ...), or None."""
        return self._by_line_key.get(key)

    def entries(self) -> list[_Entry]:
        return [e for es in self._entries.values() for e in es]

    @staticmethod
    def _note_record(entry: _Entry, record: TuningRecord) -> None:
        secs = _mean(record.run_secs)
        if secs is not None:
            entry.records.setdefault(secs, record)
        if secs is not None and (entry.best_secs is None or secs < entry.best_secs):
            if entry.best_secs is None or secs < entry.best_secs * _GAIN:
                entry.improved_at = entry.trials
            entry.best_secs, entry.best = secs, record

    # --- appending -----------------------------------------------------------------------
    def _append(self, lines: list[dict]) -> None:
        if self._fd is None:
            path = self.path / RECORDS
            if self._torn_at is not None:
                os.truncate(path, self._torn_at)
                self._torn_at = None
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for line in lines:
            os.write(self._fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())
        os.fsync(self._fd)

    def add_workload(self, mod: tvm.IRModule, name: str, flops: float) -> _Entry:
        """Commit a kernel (idempotent); returns its entry."""
        found = self.find(mod)
        if found is not None:
            return found
        entry = self._add_entry(Workload(mod), name, flops)
        self._by_line_key[entry.key] = entry
        self._append(
            [
                {
                    "t": "wl",
                    "w": entry.key,
                    "name": name,
                    "flops": flops,
                    "mod": entry.workload.as_json(),
                }
            ]
        )
        return entry

    def add_results(self, entry: _Entry, results: list[tuple]) -> None:
        """``results``: ``(trace, run_secs or None, args_info, error or None)`` per candidate."""
        lines = []
        target = tvm.target.Target(self.target.tvm)
        for trace, run_secs, args_info, error in results:
            entry.trials += 1
            if run_secs is None:
                entry.failed += 1
                record = TuningRecord(trace, entry.workload, [FAILED_SECS], target, args_info)
                self.memory.commit_tuning_record(record)
                lines.append(
                    {
                        "t": "rec",
                        "w": entry.key,
                        "ok": False,
                        "error": (error or "failed").strip().splitlines()[-1][:300],
                    }
                )
                continue
            record = TuningRecord(trace, entry.workload, run_secs, target, args_info)
            self.memory.commit_tuning_record(record)
            self._note_record(entry, record)
            lines.append({"t": "rec", "w": entry.key, "ok": True, "r": record_json(record)})
        self._append(lines)

    def set_baseline(self, entry: _Entry, secs: float) -> None:
        entry.baseline_secs = secs
        self._append([{"t": "base", "w": entry.key, "secs": secs}])

    def set_checked(self, entry: _Entry, default: float, best: float) -> None:
        """The best record and the default, measured again side by side."""
        entry.checked = (default, best, entry.best_secs)
        line = {"t": "chk", "w": entry.key, "default": default, "best": best}
        self._append([{**line, "at": entry.best_secs}])

    def set_in_model(
        self, entry: _Entry, default: float, best: float, at: float | None = None
    ) -> None:
        """A record (the one that measured ``at`` seconds; the best by default) and the
        default, each timed per call inside a model run."""
        at = entry.best_secs if at is None else at
        entry.note_in_model(default, best, at)
        line = {"t": "ctx", "w": entry.key, "default": default, "best": best}
        self._append([{**line, "at": at}])

    def mark_exhausted(self, entry: _Entry) -> None:
        entry.exhausted = True
        self._append([{"t": "end", "w": entry.key}])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TuningDatabase:
        return self

    def __exit__(self, *_exc) -> None:  # noqa: ANN002
        self.close()


# A record replaces a default schedule only when it measured this much faster: kernel
# timings on a busy machine move by a few percent, and a "win" inside the noise loses
# end to end as often as it gains.
MIN_SPEEDUP = 1.05


def beats_default(default: float | None, best: float | None) -> bool:
    """Whether a record measured ``best`` seconds is applied over a default measured
    ``default``: it beats it by ``MIN_SPEEDUP`` (the default unknown: any record does)."""
    return best is not None and (default is None or best * MIN_SPEEDUP <= default)


def _mean(run_secs) -> float | None:  # noqa: ANN001
    if not run_secs:
        return None
    values = [float(s) for s in run_secs]
    if any(v >= FAILED_SECS for v in values):
        return None
    return sum(values) / len(values)
