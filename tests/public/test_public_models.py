"""Public model definitions (benchmarks/_public_models.py): the torchvision loader, seeded
builds, the ONNX export cache; and, in the slow tier, issue 14's five models compiled and
verified through both the ONNX and the torch path.

Needs the ``bench`` extra (torchvision, timm); skipped, naming it, without.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "_public_models.py"
_spec = importlib.util.spec_from_file_location("_public_models", _PATH)
pm = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("_public_models", pm)
_spec.loader.exec_module(pm)

if pm.missing_extra():
    pytest.skip(pm.missing_extra(), allow_module_level=True)

import graphopt  # noqa: E402


def test_torchvision_imports_and_a_working_extension_is_left_alone():
    tv = pm.import_torchvision()
    assert callable(tv.models.resnet18)
    boxes, scores = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1.1]]), torch.tensor([0.9, 0.8])
    if tv.extension._has_ops():  # a torchvision whose C extension loads: nothing declared
        assert pm._declared == []
        assert tv.ops.nms(boxes, scores, 0.5).tolist() == [0]
    else:  # schemas only: nms still fails with torchvision's own message
        assert len(pm._declared) == 1
        with pytest.raises(RuntimeError, match="Couldn't load custom C"):
            tv.ops.nms(boxes, scores, 0.5)


def test_every_model_of_the_table_exists_in_its_library():
    timm = pm.import_timm()
    for spec in pm.MODELS.values():
        if spec.library == "timm":
            assert timm.is_model(spec.factory), spec.name
        else:
            assert pm._factory(spec) is not None
    assert len(pm.ISSUE13) == 20 and len(pm.ISSUE14) == 5


def test_builds_are_seeded_and_batchnorm_statistics_random():
    a, b, c = pm.build("resnet18"), pm.build("resnet18"), pm.build("resnet18", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    assert not a.training
    var = a.bn1.running_var
    assert not torch.allclose(var, torch.ones_like(var)) and float(var.min()) >= 0.75
    module, (x,) = pm.torch_model("resnet18")
    assert x.shape == (1, 3, 224, 224) and torch.isfinite(module(x)).all()


def test_onnx_export_is_cached_written_atomically_and_matches_torch(tmp_path):
    path = pm.export_onnx("squeezenet1_1", folder=tmp_path)
    model = onnx.load(path)
    assert model.opset_import[0].version == 17
    mtime = path.stat().st_mtime_ns
    assert pm.export_onnx("squeezenet1_1", folder=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # not exported again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    module, (x,) = pm.torch_model("squeezenet1_1")
    sess = ort.InferenceSession(str(path))
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-4, atol=1e-5)


# --- slow tier: issue 14's five models end to end -------------------------------------------
def _compile(name: str, path: str, cache: Path) -> graphopt.Artifact:
    if path == "onnx":
        return graphopt.compile(str(pm.export_onnx(name, folder=cache)), "x86")
    module, inputs = pm.torch_model(name)
    return graphopt.compile(graphopt.from_torch(module, inputs), "x86")


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("public-models")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["onnx", "torch"])
@pytest.mark.parametrize("name", [m.name for m in pm.ISSUE14])
def test_issue14_model_compiles_and_verifies(name, path, onnx_cache):
    start = time.perf_counter()
    artifact = _compile(name, path, onnx_cache)
    seconds = time.perf_counter() - start
    verification = artifact.manifest["verification"]
    assert verification["ok"]
    assert verification["reference"] == ("torch" if path == "torch" else "onnxruntime")
    print(f"{name} via {path}: compiled and verified in {seconds:.1f} s")
