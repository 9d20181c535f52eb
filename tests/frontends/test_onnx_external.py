"""External data is read from the model's folder and nowhere else.

A model file names its external data by relative location; graphopt must never resolve
one against the current directory, follow ``..``/absolute paths/symlinks out of the
model's folder, or read past a file's end. Every refusal is a ``ModelLoadError`` (one
``error:`` line, exit 2 in the CLI), before anything compiles.
"""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

import graphopt
from graphopt.cli import main
from graphopt.errors import ModelLoadError
from graphopt.frontends.onnx import load_onnx, onnx_to_graph
from tests.conftest import make_model

SECRET = b"TOP-SECRET-KEY-0123456789abcdef!"  # 32 bytes: 8 float32 values


def external(name: str, array: np.ndarray, location: str, offset=None, length=None):
    """A TensorProto of ``array``'s dtype and shape whose data lives at ``location``."""
    tensor = numpy_helper.from_array(np.asarray(array), name)
    set_external_data(tensor, location, offset, length)
    tensor.ClearField("raw_data")
    return tensor


def constant_model(tensor: TensorProto) -> onnx.ModelProto:
    """y = x + c, with ``c`` a Constant node holding ``tensor`` (8 float32 values)."""
    return make_model(
        [
            helper.make_node("Constant", [], ["c"], name="const", value=tensor),
            helper.make_node("Add", ["x", "c"], ["y"], name="add"),
        ],
        {"x": (8,)},
        {"y": (8,)},
    )


def initializer_model(tensor: TensorProto) -> onnx.ModelProto:
    model = make_model([helper.make_node("Add", ["x", "c"], ["y"])], {"x": (8,)}, {"y": (8,)})
    model.graph.initializer.append(tensor)
    return model


def save(model: onnx.ModelProto, path) -> str:
    """Write the proto as it is (``onnx.save`` would rewrite external tensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return str(path)


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """``tmp/model/`` (the model's folder) next to ``tmp/outside/secret.bin``; the current
    directory holds the secret too, at ``.hidden/key`` and ``secret.bin``."""
    model_dir, outside, cwd = tmp_path / "model", tmp_path / "outside", tmp_path / "cwd"
    for d in (model_dir, outside, cwd / ".hidden"):
        d.mkdir(parents=True)
    (outside / "secret.bin").write_bytes(SECRET)
    (tmp_path / "secret.bin").write_bytes(SECRET)
    (cwd / ".hidden" / "key").write_bytes(SECRET)
    (cwd / "secret.bin").write_bytes(SECRET)
    (model_dir / "link").symlink_to(outside / "secret.bin")
    (model_dir / "linkdir").symlink_to(outside, target_is_directory=True)
    monkeypatch.chdir(cwd)
    return tmp_path


HOSTILE = {
    "cwd-relative": (".hidden/key", "not a file in the model's folder"),
    "cwd-relative-2": ("secret.bin", "not a file in the model's folder"),
    "dotdot": ("../secret.bin", "outside the model's folder"),
    "dotdot-deep": ("sub/../../outside/secret.bin", "outside the model's folder"),
    "absolute": ("ABS", "absolute path"),
    "symlink-file": ("link", "outside the model's folder"),
    "symlink-dir": ("linkdir/secret.bin", "outside the model's folder"),
    "empty": ("", "not a file name"),
    "directory": (".", "not a file in the model's folder"),
}


@pytest.mark.parametrize("build", [constant_model, initializer_model], ids=["Constant", "init"])
@pytest.mark.parametrize("case", HOSTILE)
def test_locations_outside_the_folder_are_refused(layout, build, case):
    location, why = HOSTILE[case]
    if location == "ABS":
        location = str(layout / "outside" / "secret.bin")
    path = save(
        build(external("c", np.zeros(8, np.float32), location)), layout / "model" / "m.onnx"
    )
    with pytest.raises(ModelLoadError, match=why) as info:
        load_onnx(path)
    assert "tensor 'c' in " in str(info.value) and repr(location) in str(info.value)


def test_constant_does_not_read_the_current_directory(layout, capsys):
    """The issue: a Constant's ``.hidden/key`` used to be read from the cwd into the
    artifact. Now the compile is refused and no secret byte is written anywhere."""
    path = save(
        constant_model(external("c", np.zeros(8, np.float32), ".hidden/key")),
        layout / "model" / "m.onnx",
    )
    out = layout / "out" / "m.so"
    assert main(["compile", path, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and ".hidden/key" in err[0], err
    assert not out.exists()
    with pytest.raises(ModelLoadError, match="not a file in the model's folder"):
        graphopt.compile(path, "x86", out)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink-file"])
def test_cli_refuses_with_one_line(layout, capsys, case):
    location, _ = HOSTILE[case]
    if location == "ABS":
        location = str(layout / "outside" / "secret.bin")
    path = save(
        initializer_model(external("c", np.zeros(8, np.float32), location)),
        layout / "model" / "m.onnx",
    )
    out = layout / "out.so"
    assert main(["compile", path, "-o", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "Traceback" not in captured.out + captured.err
    assert not out.exists()


def _if_model(branch_tensor: TensorProto) -> onnx.ModelProto:
    """y = If(cond) then (x + c) else x, ``c`` an initializer of the then-branch."""
    then = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [8])],
        [branch_tensor],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [8])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _function_model(tensor: TensorProto) -> onnx.ModelProto:
    """y = AddC(x), a local function whose body holds a Constant ``tensor``."""
    body = [
        helper.make_node("Constant", [], ["c"], value=tensor),
        helper.make_node("Add", ["fx", "c"], ["fy"]),
    ]
    fn = helper.make_function("local", "AddC", ["fx"], ["fy"], body, [helper.make_opsetid("", 17)])
    model = make_model(
        [helper.make_node("AddC", ["x"], ["y"], domain="local")], {"x": (8,)}, {"y": (8,)}
    )
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(fn)
    return model


def _sparse_model(tensor: TensorProto) -> onnx.ModelProto:
    indices = numpy_helper.from_array(np.array([0], np.int64), "idx")
    sparse = helper.make_sparse_tensor(tensor, indices, [8])
    model = make_model([helper.make_node("Add", ["x", "c"], ["y"])], {"x": (8,)}, {"y": (8,)})
    model.graph.sparse_initializer.append(sparse)
    return model


def _sparse_attribute_model(tensor: TensorProto) -> onnx.ModelProto:
    indices = numpy_helper.from_array(np.array([0], np.int64), "idx")
    sparse = helper.make_sparse_tensor(tensor, indices, [8])
    return make_model(
        [
            helper.make_node("Constant", [], ["c"], sparse_value=sparse),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        {"x": (8,)},
        {"y": (8,)},
    )


def _training_model(tensor: TensorProto) -> onnx.ModelProto:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": (8,)}, {"y": (8,)})
    info = model.training_info.add()
    info.initialization.name = "init"
    info.initialization.initializer.append(tensor)
    return model


NESTED = {
    "if-branch": _if_model,
    "function-body": _function_model,
    "sparse-initializer": _sparse_model,
    "sparse-attribute": _sparse_attribute_model,
    "training-graph": _training_model,
}


@pytest.mark.parametrize("where", NESTED)
def test_nested_tensors_are_confined_too(layout, where):
    """Subgraphs, function bodies, sparse tensors: every TensorProto is checked."""
    values = np.zeros(1 if "sparse" in where else 8, np.float32)
    model = NESTED[where](external("c", values, "../secret.bin", 0, values.nbytes))
    path = save(model, layout / "model" / "m.onnx")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_onnx(path)


def test_nested_tensors_load_from_the_folder(tmp_path):
    """The same places load when the data is in the model's folder."""
    data = np.arange(8, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(data.tobytes())
    path = save(_if_model(external("c", data, "w.bin")), tmp_path / "m.onnx")
    proto = load_onnx(path)
    then = next(a.g for a in proto.graph.node[0].attribute if a.name == "then_branch")
    tensor = then.initializer[0]
    assert tensor.data_location == TensorProto.DEFAULT and not tensor.external_data
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), data)


@pytest.mark.parametrize(
    ("offset", "length", "why"),
    [
        (40, None, "do not fit"),  # past the end of the 32-byte file
        (0, 64, "do not fit"),
        (16, 32, "do not fit"),
        (-4, None, "do not fit"),
        (0, -1, "do not fit"),
        ("1e3", None, "non-integer"),
    ],
)
def test_offset_and_length_must_fit_the_file(tmp_path, offset, length, why):
    (tmp_path / "w.bin").write_bytes(SECRET)
    tensor = external("c", np.zeros(8, np.float32), "w.bin")
    for key, value in (("offset", offset), ("length", length)):
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
    path = save(initializer_model(tensor), tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError, match=why):
        load_onnx(path)


def test_wrong_length_for_the_shape_is_a_load_error(tmp_path):
    """In the folder and in the file, but 4 bytes for 8 floats: refused, not a crash."""
    (tmp_path / "w.bin").write_bytes(SECRET)
    path = save(
        initializer_model(external("c", np.zeros(8, np.float32), "w.bin", 0, 4)),
        tmp_path / "m.onnx",
    )
    with pytest.raises(ModelLoadError):
        onnx_to_graph(path)


def test_model_proto_in_memory_with_external_data_is_refused():
    model = initializer_model(external("c", np.zeros(8, np.float32), "w.bin"))
    with pytest.raises(ModelLoadError, match="no folder"):
        load_onnx(model)


def test_external_data_model_compiles_and_verifies(tmp_path, monkeypatch):
    """A legitimate model: Conv weights and a Constant in one data file in a subfolder,
    compiled from another directory. The numbers come from the model's folder."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal((1, 3, 1, 1)).astype(np.float32)
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "weights.bin").write_bytes(w.tobytes() + b.tobytes())
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node(
                "Constant", [], ["b"], value=external("b", b, "data/weights.bin", w.nbytes)
            ),
            helper.make_node("Add", ["c", "b"], ["y"]),
        ],
        {"x": (1, 2, 4, 4)},
        {"y": (1, 3, 4, 4)},
    )
    model.graph.initializer.append(external("w", w, "data/weights.bin", 0, w.nbytes))
    path = save(model, folder / "m.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "m.so"
    artifact = graphopt.compile(os.path.relpath(path), "x86", out)
    assert artifact.manifest["verification"]["ok"]
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    reference = graphopt.compile(
        make_model(
            [
                helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                helper.make_node("Add", ["c", "b"], ["y"]),
            ],
            {"x": (1, 2, 4, 4)},
            {"y": (1, 3, 4, 4)},
            {"w": w, "b": b},
        ),
        "x86",
        verify=False,
    )
    np.testing.assert_allclose(artifact(x=x)["y"], reference(x=x)["y"], rtol=1e-5, atol=1e-5)
