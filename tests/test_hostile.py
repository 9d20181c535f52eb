"""The hostile and broken input corpus: every case ends in exit 2 with one ``error:`` line,
no traceback, and no file changed, created or left behind.

Each case is built by code here (no binary blobs): a builder takes the test's folder and
returns the command line. The folder (and the working directory, the same folder) is
snapshotted before and after: names, sizes and SHA-256 of every file.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.artifact import MAGIC, read_manifest
from graphopt.cli import main
from tests.conftest import make_model


@pytest.fixture(scope="module")
def built(tmp_path_factory):  # noqa: ANN201
    """Two artifacts of different models (for splicing), compiled once."""
    folder = tmp_path_factory.mktemp("built")
    rng = np.random.default_rng(0)
    paths = []
    for i, channels in enumerate((3, 4)):
        w = rng.standard_normal((channels, 2, 3, 3)).astype(np.float32)
        model = make_model(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
            {"x": (1, 2, 4, 4)},
            {"y": (1, channels, 4, 4)},
            {"w": w},
        )
        paths.append(graphopt.compile(model, "x86", folder / f"m{i}.so").path)
    return paths


def _relu(shape: list) -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": shape}, {"y": shape})


def _save(folder: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = folder / name
    onnx.save(model, path)
    return path


def _copy_art(built: list[Path], folder: Path, edit) -> Path:  # noqa: ANN001
    data = bytearray(built[0].read_bytes())
    out = folder / "damaged.so"
    out.write_bytes(bytes(edit(data, built)))
    return out


def _cut_middle(data: bytearray, _built) -> bytearray:  # noqa: ANN001
    """Drop 4 KiB from the middle of the library, keep the manifest trailer intact."""
    mid = len(data) // 3
    return data[:mid] + data[mid + 4096 :]


def _zero_64k(data: bytearray, built) -> bytearray:  # noqa: ANN001
    """Zero up to 64 KiB of the library (these test artifacts are smaller than that)."""
    end = read_manifest(built[0])["library"]["bytes"]
    start = end // 4
    stop = min(start + 65536, end - 16)
    data[start:stop] = bytes(stop - start)
    return data


def _cut_half(data: bytearray, _built) -> bytearray:  # noqa: ANN001
    return data[: len(data) // 2]


def _splice(_data: bytearray, built: list[Path]) -> bytearray:  # noqa: ANN001
    """Library of the second artifact, manifest (and trailer) of the first."""
    second, first = built[1].read_bytes(), built[0].read_bytes()
    cut_second = read_manifest(built[1])["library"]["bytes"]
    cut_first = read_manifest(built[0])["library"]["bytes"]
    return bytearray(second[:cut_second] + first[cut_first:])


def _artifact_case(edit, command: str = "run"):  # noqa: ANN001, ANN202
    def build(folder: Path, built: list[Path]) -> list[str]:
        return [command, str(_copy_art(built, folder, edit))]

    return build


def _model_case(model_fn, *extra: str):  # noqa: ANN001, ANN202
    def build(folder: Path, _built) -> list[str]:  # noqa: ANN001
        return ["compile", str(_save(folder, model_fn())), "-o", str(folder / "out.so"), *extra]

    return build


def _output_is_model(folder: Path, _built) -> list[str]:  # noqa: ANN001
    model = _save(folder, _relu([1, 4]))
    return ["compile", str(model), "-o", str(model)]


def _output_under_a_file(folder: Path, _built) -> list[str]:  # noqa: ANN001
    (folder / "notes.txt").write_text("a file, not a folder\n")
    return ["compile", str(_save(folder, _relu([1, 4]))), "-o", str(folder / "notes.txt/out.so")]


def _output_is_a_folder(folder: Path, _built) -> list[str]:  # noqa: ANN001
    (folder / "already").mkdir()
    return ["compile", str(_save(folder, _relu([1, 4]))), "-o", str(folder / "already")]


def _output_in_sys(folder: Path, _built) -> list[str]:  # noqa: ANN001
    return ["compile", str(_save(folder, _relu([1, 4]))), "-o", "/sys/graphopt-out.so"]


def _output_in_proc(folder: Path, _built) -> list[str]:  # noqa: ANN001
    return ["compile", str(_save(folder, _relu([1, 4]))), "-o", "/proc/graphopt/x/out.so"]


def _negative_dim() -> onnx.ModelProto:
    model = _relu([1, 4])
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -12
    return model


def _pt2_case(command: str):  # noqa: ANN202
    """A ``.pt2`` whose pickled weight would create ``pwned`` in the folder if unpickled."""

    def build(folder: Path, _built) -> list[str]:  # noqa: ANN001
        pytest.importorskip("torch")
        from tests.frontends.test_pt2_safety import _saved, _weight_bomb

        (folder / "src").mkdir()
        evil = _weight_bomb(_saved(folder / "src"), folder, folder / "pwned")
        out = ["-o", str(folder / "out.so")] if command == "compile" else []
        return [command, str(evil), *out]

    return build


def _external_case(location: str, plant):  # noqa: ANN001, ANN202
    """A model whose Constant reads external data at ``location``; ``plant(folder)`` puts
    a secret where a careless loader would find it (the test's cwd is the folder)."""

    def build(folder: Path, _built) -> list[str]:  # noqa: ANN001
        from tests.frontends.test_onnx_external import SECRET, constant_model, external, save

        plant(folder, SECRET)
        tensor = external("c", np.zeros(8, np.float32), location)
        model = save(constant_model(tensor), folder / "models" / "m.onnx")
        return ["compile", model, "-o", str(folder / "out.so")]

    return build


def _hidden_in_cwd(folder: Path, secret: bytes) -> None:
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "key").write_bytes(secret)


def _beside_the_models_folder(folder: Path, secret: bytes) -> None:
    (folder / "secret.bin").write_bytes(secret)


def _symlink_out(folder: Path, secret: bytes) -> None:
    (folder / "secret.bin").write_bytes(secret)
    (folder / "models").mkdir()
    (folder / "models" / "link.bin").symlink_to(folder / "secret.bin")


CASES = {
    # reading outside the model's folder
    "external data resolved against the cwd": (
        _external_case(".hidden/key", _hidden_in_cwd),
        "external data",
    ),
    "external data at ../": (_external_case("../secret.bin", _beside_the_models_folder), r"\.\."),
    "external data through a symlink": (
        _external_case("link.bin", _symlink_out),
        "outside",
    ),
    # code in the model file
    "pt2 with a pickled weight (compile)": (_pt2_case("compile"), "--trust-pickle"),
    "pt2 with a pickled weight (inspect)": (_pt2_case("inspect"), "--trust-pickle"),
    # artifact integrity
    "artifact with its middle cut out": (_artifact_case(_cut_middle), "damaged"),
    "artifact with 64 KiB zeroed": (_artifact_case(_zero_64k), "damaged"),
    "artifact cut in half": (_artifact_case(_cut_half), "not a graphopt artifact"),
    "manifest of another build": (_artifact_case(_splice), "damaged"),
    "inspect a damaged artifact": (_artifact_case(_zero_64k, "inspect"), "damaged"),
    # shapes no kernel can run
    "input dim 0": (_model_case(lambda: _relu([1, 0, 4])), "every dim must be at least 1"),
    "negative input dim": (_model_case(_negative_dim), r"-12"),
    "input too large for memory": (
        _model_case(lambda: _relu([1, 3, 100000, 100000])),
        r"needs \d+\.\d GiB",
    ),
    "--input-shape with 0": (
        _model_case(lambda: _relu(["n", 4]), "--input-shape", "x=0,4"),
        "malformed --input-shape",
    ),
    # outputs that cannot or must not be written
    "-o is the model itself": (_output_is_model, "that is the model being compiled"),
    "-o under a file": (_output_under_a_file, "notes.txt is a file, not a folder"),
    "-o is a folder": (_output_is_a_folder, "it is a folder"),
    "-o in /sys": (_output_in_sys, "cannot write the artifact"),
    "-o in /proc": (_output_in_proc, "cannot write the artifact"),
}


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            state[os.path.relpath(Path(root, name), folder) + "/"] = (0, "")
        for name in files:
            p = Path(root, name)
            state[os.path.relpath(p, folder)] = (
                p.stat().st_size,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return state


@pytest.mark.parametrize("case", list(CASES))
def test_corpus_case_is_one_error_line_and_touches_nothing(
    case, tmp_path, capsys, monkeypatch, built
):
    build, pattern = CASES[case]
    argv = build(tmp_path, built)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err
    assert re.search(pattern, lines[0]), lines[0]
    assert _snapshot(tmp_path) == before


def test_artifact_records_and_checks_its_library_hash(built, tmp_path):
    m = read_manifest(built[0])
    lib = m["library"]
    data = built[0].read_bytes()
    assert lib["bytes"] + len(MAGIC) < len(data)
    assert hashlib.sha256(data[: lib["bytes"]]).hexdigest() == lib["sha256"]
    # the check is what stops a damaged file, not luck: zeroed bytes also fail in Python
    damaged = _copy_art(built, tmp_path, _zero_64k)
    with pytest.raises(graphopt.errors.ArtifactError, match="damaged"):
        graphopt.load(damaged).run(graphopt.load(damaged).random_inputs())


# --- faults: a killed compile, the umask, NaN outputs, a broken installed plugin ---------
def test_temp_file_of_a_killed_compile_is_removed_by_the_next(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    model = _save(tmp_path, _relu([1, 4]))
    out = tmp_path / "out.so"
    code = f"from graphopt.cli import main; main(['compile', {str(model)!r}, '-o', {str(out)!r}])"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.so.*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".out.so.*"))
    assert left, "the compile was killed before it made its temporary file"
    assert main(["compile", str(model), "-o", str(out)]) == 0
    assert out.is_file() and not list(tmp_path.glob(".out.so.*"))


def test_a_live_compiles_temp_file_is_kept(tmp_path):
    model = _save(tmp_path, _relu([1, 4]))
    mine = tmp_path / f".out.so.{os.getppid()}.abcd.so"  # a live process's
    mine.write_bytes(b"in progress")
    assert main(["compile", str(model), "-o", str(tmp_path / "out.so")]) == 0
    assert mine.exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_artifact_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        art = graphopt.compile(_relu([1, 4]), "x86", tmp_path / "m.so")
        copy = art.save(tmp_path / "copy.so")
    finally:
        os.umask(old)
    assert art.path.stat().st_mode & 0o777 == mode
    assert copy.path.stat().st_mode & 0o777 == mode


def test_nan_on_both_sides_is_counted_not_hidden(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = _save(tmp_path, model)
    assert main(["compile", str(path), "-o", str(tmp_path / "sqrt.so")]) == 0
    out = capsys.readouterr().out
    report = read_manifest(tmp_path / "sqrt.so")["verification"]
    x = np.random.default_rng(0).standard_normal((2, 8))  # the seeded verification inputs
    assert report["ok"] and report["outputs"][0]["nonfinite_matched"] == int((x < 0).sum()) > 0
    assert f"{report['outputs'][0]['nonfinite_matched']} NaN/inf value(s)" in out


def test_nan_on_one_side_only_is_counted_as_such():
    from graphopt.verify import compare

    expected = np.array([1.0, np.nan, np.inf, 2.0], np.float32)
    actual = np.array([1.0, np.nan, 5.0, np.nan], np.float32)
    out = compare({"y": actual}, {"y": expected}, rtol=1e-3, atol=1e-4)["outputs"][0]
    assert not out["ok"] and out["max_abs_diff"] == 0.0
    assert (out["nonfinite_matched"], out["mismatched"], out["nonfinite_mismatched"]) == (1, 2, 2)


def _broken_plugin(folder: Path, monkeypatch) -> None:  # noqa: ANN001
    (folder / "broken_passes_pkg.py").write_text("raise ImportError('half-installed')\n")
    dist = folder / "broken_passes_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-passes\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\nbad = broken_passes_pkg:PASSES\n")
    monkeypatch.syspath_prepend(str(folder))


def test_a_broken_installed_plugin_can_be_switched_off(tmp_path, capsys, monkeypatch):
    plugins = tmp_path / "site"
    plugins.mkdir()
    _broken_plugin(plugins, monkeypatch)
    model = _save(tmp_path, _relu([1, 4]))
    argv = ["compile", str(model), "-o", str(tmp_path / "m.so")]
    assert main(argv) == 2
    assert "entry point 'bad'" in capsys.readouterr().err
    assert main([*argv, "--no-entry-points"]) == 0
    monkeypatch.setenv("GRAPHOPT_NO_ENTRY_POINTS", "1")
    assert main(argv) == 0
    assert main(["passes"]) == 0


def test_an_artifact_named_without_so_compiles_and_runs(tmp_path, capsys):
    model = _save(tmp_path, _relu([1, 4]))
    assert main(["compile", str(model), "-o", str(tmp_path / "model.art")]) == 0
    assert main(["run", str(tmp_path / "model.art"), "--repeat", "2"]) == 0
    assert "median" in capsys.readouterr().out
