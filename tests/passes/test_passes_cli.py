"""The pass features driven from the command line, as a user would."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.cli import main
from tests._system import DOT
from tests.conftest import make_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_passes.py"
HAS_DOT = shutil.which("dot") is not None


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def hardswish_file(tmp_path):
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    m = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("HardSigmoid", ["c"], ["h"], alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", ["c", "h"], ["y"]),
        ],
        {"x": (1, 3, 8, 8)},
        {"y": (1, 4, 8, 8)},
        {"w": w},
    )
    path = tmp_path / "hs.onnx"
    onnx.save(m, path)
    return path


def test_passes_lists_every_pass_with_doc_and_options(capsys):
    from graphopt.passes import PASSES

    code, out, _ = _run(capsys, "passes")
    assert code == 0
    for name, cls in PASSES.items():
        assert f"{name} " in out and cls.__doc__.strip().splitlines()[0] in out
    assert "max-elements: int = 16777216" in out and "default pipeline:" in out
    code, out, _ = _run(capsys, "passes", "--pass-plugin", EXAMPLE)
    assert "fuse-hardswish" in out and "op: str = 'Conv'" in out


def test_compile_with_a_plugin_pipeline_dumps_times_and_drawing(tmp_path, capsys, hardswish_file):
    dump = tmp_path / "ir"
    drawing = tmp_path / ("after.svg" if HAS_DOT else "after.dot")
    code, out, err = _run(
        capsys,
        "compile",
        hardswish_file,
        "-o",
        tmp_path / "hs.so",
        "--pass-plugin",
        EXAMPLE,
        "-p",
        "fuse-hardswish,fold-constants,count-ops{op=HardSwish},fuse-conv-act,dead-code",
        "--print-pass-times",
        "--dump-ir",
        dump,
        "--svg",
        drawing,
    )
    assert code == 0, err
    assert "verification: passed" in out
    assert "HardSwish x1" in out and "HardSigmoid" not in out
    table = out[out.index("  pass ") :]
    assert "fuse-hardswish" in table and "hard_sigmoid_mul x1" in table
    assert "count-ops" in table and "HardSwish x1" in table and "Conv+HardSwish x1" in table
    files = sorted(p.name for p in dump.iterdir())
    assert files[0] == "00-input.onnx.txt" and files[-1] == "06-relax.py"
    assert "01-fold-constants.before.onnx.txt" in files  # ordered by `after`
    assert "02-fuse-hardswish.after.onnx.txt" in files
    assert "HardSigmoid" in (dump / "02-fuse-hardswish.before.onnx.txt").read_text()
    assert "HardSwish" in (dump / "02-fuse-hardswish.after.onnx.txt").read_text()
    assert "R.function" in (dump / "06-relax.py").read_text()
    text = drawing.read_text()
    assert "fused: " in text  # the Conv+HardSwish group is drawn as one cluster


def _bad_rule_plugin(tmp_path):
    f = tmp_path / "bad_rule.py"
    f.write_text(
        "from graphopt.passes import RewriteRule, rewrite_pass\n\n"
        "def conv(op, x, w):\n    return op.Conv(x, w)\n\n"
        "def flat(op, x, w):\n    return op.Flatten(op.Conv(x, w))\n\n"
        "PASSES = [rewrite_pass('flatten-convs', [RewriteRule(conv, flat)], 'Wrong.')]\n"
    )
    return f


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-p", "fold-constants,no-such-pass"], "unknown pass 'no-such-pass'"),
        (["-p", "fold-constants{max-elements=8"], "malformed pipeline"),
        (["-p", "fold-constants{max-elements=big}"], "option 'max-elements' expects int"),
        (["--disable-pass", "nope"], "--disable-pass: unknown pass 'nope'"),
        (["--pass-plugin", "MISSING"], "no such file"),
        (["--pass-plugin", "SYNTAX"], "failed to import: SyntaxError"),
        (["--pass-plugin", "EMPTY"], "defines neither PASSES nor graphopt_passes()"),
        (
            ["--pass-plugin", "BADRULE", "-p", "flatten-convs"],
            "pass 'flatten-convs': rule 'conv' (at node 'Conv_0'): replacement changes value",
        ),
    ],
    ids=["unknown", "malformed", "type", "disable", "missing", "syntax", "empty", "shapes"],
)
def test_bad_pass_input_is_one_error_line(extra, message, tmp_path, capsys, hardswish_file):
    (tmp_path / "syntax.py").write_text("def broken(:\n")
    (tmp_path / "empty.py").write_text("X = 1\n")
    files = {
        "MISSING": tmp_path / "missing.py",
        "SYNTAX": tmp_path / "syntax.py",
        "EMPTY": tmp_path / "empty.py",
        "BADRULE": _bad_rule_plugin(tmp_path),
    }
    argv = [str(files.get(a, a)) for a in extra]
    code, out, err = _run(capsys, "compile", hardswish_file, "-o", tmp_path / "x.so", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert not (tmp_path / "x.so").exists()


def test_svg_without_graphviz_names_the_package(tmp_path, capsys, hardswish_file, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    code, _, err = _run(capsys, "inspect", hardswish_file, "--svg", tmp_path / "before.svg")
    assert code == 2 and "`graphviz`" in err and "apt-get install graphviz" in err


@DOT
def test_inspect_draws_the_graph_as_imported(tmp_path, capsys, hardswish_file):
    code, _, err = _run(capsys, "inspect", hardswish_file, "--svg", tmp_path / "before.svg")
    assert code == 0, err
    svg = (tmp_path / "before.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "HardSigmoid" in svg
