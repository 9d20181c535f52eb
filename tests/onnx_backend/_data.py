"""ONNX's backend node cases on disk, and the ``BackendTest`` that runs graphopt on them.

onnx 1.23's wheel ships no node test data: ``collect_testcases()`` builds the 1,884
cases in memory (about 8 s, every time). :func:`materialize` writes them once into a
cache folder in the layout onnx's own test data had (``node/<case>/model.onnx``,
``test_data_set_N/input_K.pb``, ``output_K.pb``) plus a ``data.json`` per case (its
tolerances and the op under test). The folder is
``$GRAPHOPT_ONNX_NODE_DATA``, else ``$XDG_CACHE_HOME/graphopt/onnx-node-<onnx version>``
(``~/.cache`` without XDG_CACHE_HOME). It is built in a temporary sibling and renamed
into place, so two processes never see half a cache (the slower one discards its copy).

:func:`backend_test` hands these cases to ``onnx.backend.test.BackendTest``, which then
runs each as onnx's on-disk tests run (load ``model.onnx``, ``backend.prepare``, ``run``
on every data set, compare with onnx's tolerances).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import unittest.mock
import warnings
from pathlib import Path

import onnx
import onnx.backend.test.runner
from onnx import numpy_helper
from onnx.backend.test import BackendTest
from onnx.backend.test.case.test_case import TestCase

CACHE_ENV = "GRAPHOPT_ONNX_NODE_DATA"

# The CNN/RNN slice of issue 14 (the same list as benchmarks/onnx_node_cases.py): cases
# whose op under test (the model's first non-Constant node) is one of these.
CNN_RNN_OPS = frozenset(
    (
        "Conv ConvTranspose BatchNormalization InstanceNormalization LRN Relu LeakyRelu PRelu "
        "Elu Selu Sigmoid HardSigmoid HardSwish Tanh Softplus Clip MaxPool AveragePool "
        "GlobalAveragePool GlobalMaxPool Gemm MatMul Add Mul Concat Flatten Reshape Transpose "
        "Softmax LogSoftmax Pad Resize LSTM GRU RNN"
    ).split()
)


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "graphopt" / f"onnx-node-{onnx.__version__}"


def materialize(root: Path | None = None) -> Path:
    """The cache folder, with every node case in it (written on first use)."""
    root = cache_dir() if root is None else root
    if (root / "node").is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        from onnx.backend.test.case.node import collect_testcases

        with warnings.catch_warnings():  # the case generators' own deprecation noise
            warnings.simplefilter("ignore")
            cases = collect_testcases()
        for case in cases:
            _write_case(case, tmp / "node" / case.name)
        (tmp / "README").write_text(
            f"onnx {onnx.__version__} backend node cases ({len(cases)}), written by "
            "graphopt's tests/onnx_backend/_data.py; delete the folder to rebuild it\n"
        )
        try:
            os.rename(tmp, root)  # atomic; onto nothing or an empty folder
        except OSError:
            if not (root / "node").is_dir():  # not another process's complete copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def op_under_test(model: onnx.ModelProto) -> str:
    return next((n.op_type for n in model.graph.node if n.op_type != "Constant"), "Constant")


def _write_case(case: TestCase, folder: Path) -> None:
    graph = case.model.graph
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(case.model.SerializeToString())
    meta = {"rtol": case.rtol, "atol": case.atol, "op": op_under_test(case.model)}
    (folder / "data.json").write_text(json.dumps(meta, sort_keys=True))
    for i, (inputs, outputs) in enumerate(case.data_sets):
        data = folder / f"test_data_set_{i}"
        data.mkdir()
        for j, value in enumerate(inputs):
            proto = _to_proto(value, graph.input[j])
            (data / f"input_{j}.pb").write_bytes(proto.SerializeToString())
        for j, value in enumerate(outputs):
            proto = _to_proto(value, graph.output[j])
            (data / f"output_{j}.pb").write_bytes(proto.SerializeToString())


def _to_proto(value, info: onnx.ValueInfoProto):  # noqa: ANN001, ANN202
    """As onnx's ``cmd_tools generate-data`` writes a value of each type."""
    kind = info.type.WhichOneof("value")
    if kind == "sequence_type":
        return numpy_helper.from_list(value, info.name)
    if kind == "optional_type":
        return numpy_helper.from_optional(value, info.name)
    if kind == "map_type":
        return numpy_helper.from_dict(value, info.name)
    if isinstance(value, onnx.TensorProto):
        return value
    return numpy_helper.from_array(value, info.name)


def load_cases(root: Path) -> list[TestCase]:
    """The cached cases as onnx's loader describes on-disk ones (``model_dir`` set, so
    ``BackendTest`` reads ``model.onnx`` and the data sets from there)."""
    cases = []
    for folder in sorted((root / "node").iterdir()):
        meta = json.loads((folder / "data.json").read_text())
        cases.append(
            TestCase(
                name=folder.name,
                model_name=folder.name,
                url=None,
                model_dir=str(folder),
                model=None,
                data_sets=None,
                kind="node",
                rtol=meta["rtol"],
                atol=meta["atol"],
            )
        )
    return cases


def ops_under_test(root: Path) -> dict[str, str]:
    """Case name -> its op under test."""
    node = root / "node"
    return {f.name: json.loads((f / "data.json").read_text())["op"] for f in node.iterdir()}


def backend_test(backend, parent_module: str, root: Path) -> BackendTest:  # noqa: ANN001
    """``BackendTest`` over the cached node cases only.

    ``BackendTest`` has no setting for where its cases come from: its constructor calls
    ``load_model_tests(kind=...)`` for the node cases (built in memory in onnx 1.23) and
    for the real/simple/pytorch model kinds (downloads). For the constructor alone, that
    one name is replaced: the node kind gets the cached cases, the other kinds none.
    Everything after (test functions, running, comparing) is BackendTest's own.
    """
    cases = load_cases(root)

    def load_model_tests(data_dir: str | None = None, kind: str | None = None) -> list:  # noqa: ARG001
        return cases if kind == "node" else []

    with unittest.mock.patch.object(onnx.backend.test.runner, "load_model_tests", load_model_tests):
        return BackendTest(backend, parent_module)
