"""The artifact file: manifest, one-file deployment with the TVM runtime alone, atomic writes."""

import subprocess
import sys

import numpy as np
import pytest

import graphopt
from graphopt.artifact import read_manifest
from graphopt.errors import ArtifactError, InputError, VerificationError


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from tests.conftest import zoo_model

    path = tmp_path_factory.mktemp("art") / "cnn.so"
    return graphopt.compile(zoo_model("small_cnn"), "x86", path)


def test_manifest_contents(artifact):
    import tvm

    m = read_manifest(artifact.path)
    assert m == artifact.manifest
    assert m["inputs"] == [{"name": "input", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert m["outputs"][0]["shape"] == [1, 10]
    assert m["target"]["name"] == "x86" and m["target"]["tvm"]["kind"] == "llvm"
    assert m["graphopt_version"] == graphopt.__version__ and m["tvm_version"] == tvm.__version__
    assert [p["name"] for p in m["passes"]][:1] == ["eliminate-identity"]
    assert m["verification"]["ok"] is True
    assert len(m["source"]["sha256"]) == 64


def test_load_and_call(artifact):
    again = graphopt.load(artifact.path)
    inputs = again.random_inputs(seed=3)
    out = again(**inputs)[again.output_names[0]]
    assert out.shape == (1, 10)
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out, artifact.run(inputs)[artifact.output_names[0]])


def test_runs_with_tvm_runtime_alone(artifact):
    # What README tells a user who deploys without graphopt: load_module + VirtualMachine.
    code = f"""
import sys, numpy as np, tvm
lib = tvm.runtime.load_module({str(artifact.path)!r})
vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())
x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype("float32")
out = vm["main"](tvm.runtime.tensor(x))[0].numpy()
assert "graphopt" not in sys.modules
np.save(sys.argv[1], out)
"""
    out_file = artifact.path.parent / "tvm_only.npy"
    subprocess.run([sys.executable, "-c", code, str(out_file)], check=True)
    expected = artifact.run(artifact.random_inputs(seed=3))[artifact.output_names[0]]
    np.testing.assert_array_equal(np.load(out_file), expected)


def test_input_validation(artifact):
    good = artifact.random_inputs()
    with pytest.raises(InputError, match="missing input"):
        artifact.run({})
    with pytest.raises(InputError, match="unknown extra"):
        artifact.run({**good, "extra": good["input"]})
    with pytest.raises(InputError, match="shape"):
        artifact.run({"input": np.zeros((1, 3, 16, 16), np.float32)})
    with pytest.raises(InputError, match="dtype"):
        artifact.run({"input": good["input"].astype(np.float64)})


def test_not_an_artifact(tmp_path):
    p = tmp_path / "plain.so"
    p.write_bytes(b"\x7fELF" + b"\x00" * 100)
    with pytest.raises(ArtifactError, match="not a graphopt artifact"):
        graphopt.load(p)
    with pytest.raises(ArtifactError, match="not found"):
        graphopt.load(tmp_path / "missing.so")


def test_failed_verification_leaves_existing_output_untouched(tmp_path, monkeypatch, tiny_model):
    out = tmp_path / "model.so"
    out.write_bytes(b"previous artifact")

    import graphopt.prepare as prepare

    real = prepare.onnxruntime_reference

    def off_by_one(proto):
        run = real(proto)
        return lambda inputs: {k: v + 1.0 for k, v in run(inputs).items()}

    monkeypatch.setattr(prepare, "onnxruntime_reference", off_by_one)
    with pytest.raises(VerificationError, match=r"output 'y'.*max \|diff\| 1"):
        graphopt.compile(tiny_model, "x86", out)
    assert out.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.so"]  # no temp files left

    kept = graphopt.compile(tiny_model, "x86", out, keep_unverified=True)
    assert kept.manifest["verification"]["ok"] is False
    assert read_manifest(out)["verification"]["first_mismatch"]["name"] == "y"


def test_tolerances_are_settable_and_recorded(tmp_path, tiny_model):
    a = graphopt.compile(tiny_model, "x86", tmp_path / "t.so", rtol=1e-2, atol=1e-3)
    assert (a.manifest["verification"]["rtol"], a.manifest["verification"]["atol"]) == (1e-2, 1e-3)
    b = graphopt.compile(tiny_model, "x86", tmp_path / "n.so", verify=False)
    assert b.manifest["verification"] == {"status": "skipped"}


def test_an_artifact_without_output_takes_its_temporary_folder_with_it(tmp_path, tiny_model):
    """``compile`` without ``output`` builds in a fresh temporary folder: a loop of
    compiles must not fill /tmp, so the folder goes with the artifact (close, or the last
    reference dropped); one given an ``output`` is the user's file and stays."""
    import gc

    art = graphopt.compile(tiny_model, "x86", verify=False)
    folder = art.path.parent
    x = art.random_inputs(seed=0)
    saved = art.save(tmp_path / "kept.so")
    art.close()
    assert not folder.exists()
    with pytest.raises(ArtifactError, match="no longer exists"):
        art.save(tmp_path / "late.so")
    np.testing.assert_array_equal(saved(**x)["y"], graphopt.load(saved.path)(**x)["y"])

    dropped = graphopt.compile(tiny_model, "x86", verify=False)
    folder = dropped.path.parent
    dropped(**x)  # its code loaded, then the last reference goes
    del dropped
    gc.collect()
    assert not folder.exists()

    kept = graphopt.compile(tiny_model, "x86", tmp_path / "mine.so", verify=False)
    kept.close()
    assert (tmp_path / "mine.so").exists()
