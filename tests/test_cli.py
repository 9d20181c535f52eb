"""The CLI as a user drives it: the happy path, and every bad input ending in one
``error:`` line with exit status 2."""

import importlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.cli import main
from graphopt.errors import GraphoptError
from tests.conftest import make_model, zoo_model


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cnn_file(tmp_path):
    p = tmp_path / "small_cnn.onnx"
    onnx.save(zoo_model("small_cnn"), p)
    return p


def test_compile_run_inspect(tmp_path, capsys, cnn_file):
    out_so = tmp_path / "cnn.so"
    code, out, _ = _run(capsys, "compile", cnn_file, "--target", "x86", "-o", out_so)
    assert code == 0
    assert "verification: passed against onnxruntime" in out
    assert "fold-batchnorm (folded 2)" in out and "compile time:" in out
    assert "fast-path coverage: " in out  # and a warning for each generic conv/matmul kernel

    inputs = {"input": np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype("float32")}
    np.savez(tmp_path / "in.npz", **inputs)
    code, out, _ = _run(
        capsys,
        "run",
        out_so,
        "--inputs",
        tmp_path / "in.npz",
        "--outputs",
        tmp_path / "out.npz",
        "--repeat",
        3,
    )
    assert code == 0 and "median" in out and "over 3 runs" in out
    with np.load(tmp_path / "out.npz") as got:
        name = zoo_model("small_cnn").graph.output[0].name
        assert got[name].shape == (1, 10)

    code, out, _ = _run(capsys, "inspect", cnn_file)
    assert code == 0 and "BatchNormalization x2" in out and "every op is supported" in out
    code, out, _ = _run(capsys, "inspect", out_so)
    assert code == 0 and '"verification"' in out


def test_target_json_and_cpu_option(tmp_path, capsys, tiny_model):
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_model, p)
    code, out, err = _run(
        capsys,
        "compile",
        p,
        "-o",
        tmp_path / "a.so",
        "--target",
        '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}',
    )
    assert code == 0, err
    assert "(x86-64-v3)" in out
    code, out, err = _run(capsys, "compile", p, "-o", tmp_path / "b.so", "--cpu", "skylake")
    assert code == 0, err


def test_layout_option_and_manifest(tmp_path, capsys, cnn_file):
    code, out, err = _run(
        capsys, "compile", cnn_file, "-o", tmp_path / "nhwc.so", "--layout", "NHWC"
    )
    assert code == 0, err
    assert "  layout:       nhwc\n" in out and "verification: passed" in out
    code, out, _ = _run(capsys, "inspect", tmp_path / "nhwc.so")
    assert code == 0 and json.loads(out)["target"]["layout"] == "nhwc"
    code, out, _ = _run(capsys, "compile", cnn_file, "-o", tmp_path / "x.so", "--no-verify")
    assert code == 0 and "  layout:       nchwc\n" in out  # x86's default


def test_targets_lists_layouts_and_defaults(capsys):
    code, out, _ = _run(capsys, "targets")
    assert code == 0
    blocks = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            name = line.split()[0]
        blocks.setdefault(name, []).append(line)
    layouts = {
        t: [ln.split()[0] for ln in lines if ln.startswith("           ")]
        for t, lines in blocks.items()
    }
    assert layouts == {
        "x86": ["nchwc", "nhwc", "nchw"],
        "arm": ["nhwc", "nchwc", "nchw"],
        "cuda": ["nhwc", "nchw"],
    }
    assert "nchwc (default)" in "\n".join(blocks["x86"])
    assert "nhwc (default)" in "\n".join(blocks["arm"])
    assert "nhwc (default)" in "\n".join(blocks["cuda"])


def test_verify_inputs_file(tmp_path, capsys, tiny_model):
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_model, p)
    np.savez(tmp_path / "v.npz", x=np.ones((1, 2, 4, 4), np.float32))
    code, out, _ = _run(
        capsys, "compile", p, "-o", tmp_path / "a.so", "--verify-inputs", tmp_path / "v.npz"
    )
    assert code == 0 and "user inputs" in out
    code, out, _ = _run(capsys, "compile", p, "-o", tmp_path / "b.so", "--no-verify")
    assert code == 0 and "skipped" in out


def _bad_files(tmp_path, tiny_model):
    not_onnx = tmp_path / "text.onnx"
    not_onnx.write_text("hello")
    data = tiny_model.SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 3])
    checker = tmp_path / "checker.onnx"
    onnx.save(
        make_model([helper.make_node("Relu", ["nope"], ["y"])], {"x": (1,)}, {"y": (1,)}), checker
    )
    unsupported = tmp_path / "unsupported.onnx"
    onnx.save(
        make_model(
            [
                helper.make_node("Celu", ["x"], ["a"], name="celu_a"),
                helper.make_node("Hardmax", ["a"], ["y"], name="hm_b"),
            ],
            {"x": (2, 2)},
            {"y": (2, 2)},
        ),
        unsupported,
    )
    good = tmp_path / "tiny.onnx"
    onnx.save(tiny_model, good)
    return {
        "missing": tmp_path / "missing.onnx",
        "not_onnx": not_onnx,
        "cut": cut,
        "checker": checker,
        "unsupported": unsupported,
        "good": good,
    }


CASES = {
    "missing file": (["compile", "{missing}"], "not found"),
    "not onnx": (["compile", "{not_onnx}"], "not a readable ONNX model"),
    "truncated": (["compile", "{cut}"], "not a readable ONNX model"),
    "checker": (["compile", "{checker}"], "onnx.checker"),
    "unsupported op": (
        ["compile", "{unsupported}"],
        r"Celu \(node 'celu_a'\).*Hardmax \(node 'hm_b'\)",
    ),
    "unsupported op (inspect)": (["inspect", "{unsupported}"], None),
    "bad target": (["compile", "{good}", "--target", "riscv"], "unknown target 'riscv'"),
    "bad target json": (["compile", "{good}", "--target", '{"kind": "llvm"'], "JSON"),
    "bad cpu": (["compile", "{good}", "--cpu", "pentium9000"], "does not know x86 CPU"),
    "unknown layout": (["compile", "{good}", "--layout", "nwhc"], "unknown layout 'nwhc'"),
    "layout the target lacks": (
        ["compile", "{good}", "--target", "cuda", "--layout", "nchwc"],
        "target cuda does not support layout 'nchwc'; it supports nhwc \\(default\\), nchw",
    ),
    "unknown layout (tune)": (["tune", "{good}", "--layout", "nhcw"], "unknown layout 'nhcw'"),
    "malformed input shape": (
        ["compile", "{good}", "--input-shape", "x=1,two"],
        "malformed --input-shape",
    ),
    "unknown input name": (["compile", "{good}", "--input-shape", "z=1,2,4,4"], "unknown input"),
    "verify inputs missing": (["compile", "{good}", "--verify-inputs", "{missing}"], "not found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case, tmp_path, capsys, tiny_model):
    files = _bad_files(tmp_path, tiny_model)
    argv, pattern = CASES[case]
    argv = [str(files[a[1:-1]]) if a[1:-1] in files else a for a in argv]
    if argv[0] == "compile":
        argv += ["-o", str(tmp_path / "out.so")]
    if argv[0] == "tune":
        argv += ["--db", str(tmp_path / "db")]
    code, out, err = _run(capsys, *argv)
    if pattern is None:  # inspect reports unsupported ops as information, exit 0
        assert code == 0 and "Celu (node 'celu_a')" in out and "Hardmax (node 'hm_b')" in out
        return
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and len([ln for ln in lines if "error" in ln]) == 1
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[-1]), lines[-1]
    assert not (tmp_path / "out.so").exists()
    assert not (tmp_path / "db").exists()


@pytest.fixture
def compiled(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("cli")
    p = d / "tiny.onnx"
    onnx.save(tiny_model, p)
    assert main(["compile", str(p), "-o", str(d / "tiny.so")]) == 0
    return d / "tiny.so"


@pytest.mark.parametrize(
    "inputs,pattern",
    [
        ({"y": np.zeros((1, 2, 4, 4), np.float32)}, "missing x; unknown y"),
        (
            {"x": np.zeros((1, 2, 5, 4), np.float32)},
            r"shape \(1, 2, 5, 4\), expected \(1, 2, 4, 4\)",
        ),
        ({"x": np.zeros((1, 2, 4, 4), np.int32)}, "dtype int32, expected float32"),
    ],
)
def test_run_with_bad_inputs_file(inputs, pattern, compiled, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", **inputs)
    code, _, err = _run(capsys, "run", compiled, "--inputs", tmp_path / "bad.npz")
    assert code == 2
    import re

    assert re.search(pattern, err) and err.startswith("error: ")


def test_run_rejects_non_artifact(tmp_path, capsys, tiny_model):
    p = tmp_path / "model.onnx"
    onnx.save(tiny_model, p)
    code, _, err = _run(capsys, "run", p)
    assert code == 2 and "not a graphopt artifact" in err


def test_real_process_exit_status_and_debug(tmp_path):
    missing = tmp_path / "missing.onnx"
    r = subprocess.run(
        [sys.executable, "-m", "graphopt", "compile", str(missing)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: model file not found: {missing}"]
    r = subprocess.run(
        [sys.executable, "-m", "graphopt", "compile", str(missing), "--debug"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_example_writes_every_zoo_model(tmp_path, capsys):
    code, out, _ = _run(capsys, "example")
    assert code == 0 and "resnet18" in out and "mobilenetv2" in out
    code, _, _ = _run(capsys, "example", "mlp_head", "-o", tmp_path / "m.onnx")
    assert code == 0
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"))
    code, _, err = _run(capsys, "example", "alexnet")
    assert code == 2 and "unknown example" in err


def test_verify_command_checks_an_existing_artifact(compiled, tmp_path, capsys, tiny_model):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model, model)
    code, out, _ = _run(capsys, "verify", compiled, model)
    assert code == 0 and "verification passed against onnxruntime" in out
    # Against a different model with the same signature: must fail, one error line.
    other = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        {"x": (1, 2, 4, 4)},
        {"y": (1, 3, 4, 4)},
        {"w": np.ones((3, 2, 3, 3), np.float32)},
    )
    onnx.save(other, tmp_path / "other.onnx")
    code, _, err = _run(capsys, "verify", compiled, tmp_path / "other.onnx")
    assert code == 2 and err.startswith("error: output 'y' differs")


def test_inspect_torch_program(tmp_path, capsys):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(Net(), (torch.zeros(2, 3),)), path)
    code, out, err = _run(capsys, "inspect", path)
    assert code == 0, err
    assert "2x3 float32" in out and "every op is supported" in out


def test_profile_command(tmp_path, capsys, cnn_file):
    report = tmp_path / "profile.json"
    code, out, _ = _run(capsys, "profile", cnn_file, "--repeat", 3, "--top", 4, "--json", report)
    assert code == 0
    assert "fast-path coverage: " in out and "of conv/matmul FLOPs" in out
    assert "GFLOP/s" in out and "faster kernels not shown" in out
    data = json.loads(report.read_text())
    assert data["kernels"] and abs(sum(k["share_percent"] for k in data["kernels"]) - 100) < 0.01
    assert 0 <= data["schedule"]["coverage"] <= 100


def test_profile_refuses_a_target_that_cannot_run_here(capsys, cnn_file):
    code, _, err = _run(capsys, "profile", cnn_file, "--target", "cuda")
    if "no CUDA GPU" not in err:
        pytest.skip("this machine has a CUDA GPU")
    assert code == 2 and err.startswith("error: cannot profile target cuda here")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "precision", "passed"),
    [
        ("compile", None, {"precision": "fp32"}),
        ("compile", "bf16", {"precision": "bf16"}),
        ("tune", "fp16", {"precision": "fp16"}),
        ("tune", None, {"precision": "fp32"}),
        ("profile", "bf16", {"precision": "bf16"}),
    ],
)
def test_precision_reaches_the_api(command, precision, passed, monkeypatch, capsys, cnn_file):
    """--precision goes to graphopt.compile, graphopt.profile and tuning.tune (default
    fp32)."""
    seen = {}

    def fake(*_args, **kwargs):
        seen.update(kwargs)
        raise GraphoptError("stop here")

    if command in ("compile", "profile"):
        monkeypatch.setattr(graphopt, command, fake)
    else:
        monkeypatch.setattr(importlib.import_module("graphopt.tuning"), "tune", fake)
    argv = [command, cnn_file] + (["--precision", precision] if precision else [])
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "stop here" in err
    assert {k: v for k, v in seen.items() if k == "precision"} == passed


def test_precision_choices_are_checked(capsys, cnn_file):
    with pytest.raises(SystemExit) as exc:
        main(["compile", str(cnn_file), "--precision", "int4"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "passed"),
    [
        ([], {"space": "both", "patience": 64, "measure_model": True}),
        (
            ["--space", "graphopt", "--patience", "0", "--no-model-latency"],
            {"space": "graphopt", "patience": 0, "measure_model": False},
        ),
        (["--space", "generic"], {"space": "generic", "patience": 64, "measure_model": True}),
    ],
)
def test_tune_search_options_reach_the_api(argv, passed, monkeypatch, capsys, cnn_file):
    seen = {}

    def fake(*_args, **kwargs):
        seen.update(kwargs)
        raise GraphoptError("stop here")

    monkeypatch.setattr(importlib.import_module("graphopt.tuning"), "tune", fake)
    code, _, err = _run(capsys, "tune", cnn_file, *argv)
    assert code == 2 and "stop here" in err
    assert {k: seen[k] for k in passed} == passed


def test_tune_space_choices_are_checked(capsys, cnn_file):
    with pytest.raises(SystemExit) as exc:
        main(["tune", str(cnn_file), "--space", "random"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
