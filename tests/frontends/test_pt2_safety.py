"""Loading a ``.pt2`` file runs no code from it unless the caller trusts the file.

Each hostile archive is a real ``torch.export.save`` file with one part rewritten so that
reading it the way ``torch.export.load`` does creates a marker file. Every test checks
both sides: by default the marker stays absent (and the refusal is one line naming the
opt-in); with ``trust_pickle=True`` it appears, which proves the archive was hostile.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import pathlib
import pickle
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
sympy = pytest.importorskip("sympy")

import graphopt  # noqa: E402
from graphopt.cli import main  # noqa: E402
from graphopt.errors import ModelLoadError  # noqa: E402
from graphopt.frontends.torch import TorchImportError, load_pt2  # noqa: E402
from graphopt.frontends.torch._quiet import TORCH_LOCK  # noqa: E402
from graphopt.frontends.torch._safe_load import Guard, Refused, plain_sym_expr  # noqa: E402

OPT_IN = "--trust-pickle"


class Net(nn.Module):
    """A parameter, a buffer and a lifted tensor constant: one payload of each kind."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 2.0))
        self.offset = torch.ones(3)

    def forward(self, x):
        return self.fc(x) * self.scale + self.offset


class Touch:
    """Unpickling this creates ``path``: it stands for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _saved(directory: Path, dynamic: bool = False) -> Path:
    torch.manual_seed(0)
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    program = torch.export.export(Net().eval(), (torch.randn(2, 4),), dynamic_shapes=shapes)
    path = directory / ("dynamic.pt2" if dynamic else "net.pt2")
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory.mktemp("pt2"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


def _rewrite(src: Path, dst: Path, edit: Callable[[dict[str, bytes], str], None]) -> Path:
    """Copy the archive ``src`` to ``dst``; ``edit(entries, root)`` changes its entries."""
    with zipfile.ZipFile(src) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    edit(entries, next(iter(entries)).partition("/")[0] + "/")
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return dst


def _replace(record: str, data: bytes) -> Callable[[dict[str, bytes], str], None]:
    def edit(entries: dict[str, bytes], root: str) -> None:
        entries[root + record] = data

    return edit


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _hostile(tensor: torch.Tensor, marker: Path) -> torch.Tensor:
    """``tensor`` with a hostile attribute: a trusted load gets the tensor back."""
    tensor = tensor.clone()
    tensor.payload = Touch(marker)
    return tensor


def _edit_json(entries: dict[str, bytes], name: str, edit: Callable[[dict], None]) -> None:
    content = json.loads(entries[name])
    edit(content)
    entries[name] = json.dumps(content).encode()


def _refused(path: Path, match: str) -> str:
    """The default load's error: one line naming what was refused and the opt-in."""
    with pytest.raises(TorchImportError, match=match) as info:
        load_pt2(path)
    message = str(info.value)
    assert "\n" not in message and OPT_IN in message and "trust_pickle=True" in message
    return message


def _trusted(path: Path) -> None:
    """Load with trust; a crafted archive may well be unusable once its code has run."""
    with contextlib.suppress(Exception):
        load_pt2(path, trust_pickle=True)


# --- a normal file ---------------------------------------------------------------------------
def test_normal_file_loads_and_compiles_by_default(saved, tmp_path):
    source = load_pt2(saved)
    assert source.graph.inputs == ["x"] and source.example_inputs["x"].shape == (2, 4)
    artifact = graphopt.compile(saved, "x86", tmp_path / "net.so")
    assert artifact.manifest["verification"]["ok"]
    assert artifact.manifest["verification"]["inputs"] == "example"


# --- pickles ---------------------------------------------------------------------------------
def test_pickled_sample_inputs_are_skipped_for_a_static_program(saved, tmp_path, marker):
    inputs = _torch_saved(((_hostile(torch.randn(2, 4), marker),), {}))
    path = _rewrite(saved, tmp_path / "inputs.pt2", _replace("data/sample_inputs/model.pt", inputs))
    with pytest.warns(UserWarning, match="sample inputs not loaded") as warned:
        source = load_pt2(path)
    assert OPT_IN in str(warned[0].message) and "\n" not in str(warned[0].message)
    assert source.example_inputs["x"].shape == (2, 4)  # seeded random ones
    with pytest.warns(UserWarning, match="sample inputs"):
        artifact = graphopt.compile(path, "x86", tmp_path / "inputs.so")
    assert artifact.manifest["verification"]["ok"] and not marker.exists()
    load_pt2(path, trust_pickle=True)
    assert marker.exists()


def test_pickled_sample_inputs_of_a_dynamic_program_need_input_shapes(tmp_path, marker):
    inputs = _torch_saved(((_hostile(torch.randn(2, 4), marker),), {}))
    path = _rewrite(
        _saved(tmp_path, dynamic=True),
        tmp_path / "inputs.pt2",
        _replace("data/sample_inputs/model.pt", inputs),
    )
    message = _refused(path, "dynamic input shapes and its sample inputs were not loaded")
    assert "input shapes" in message
    with pytest.warns(UserWarning, match="sample inputs not loaded"):
        source = load_pt2(path, {"x": (5, 4)})
    assert source.example_inputs["x"].shape == (5, 4) and not marker.exists()
    load_pt2(path, trust_pickle=True)
    assert marker.exists()


def test_pickled_weight_is_refused(saved, tmp_path, marker):
    def edit(entries: dict[str, bytes], root: str) -> None:
        def use_pickle(config: dict) -> None:
            meta = config["config"]["fc.weight"]
            meta["use_pickle"] = True
            meta["path_name"] = "weight_9"

        _edit_json(entries, root + "data/weights/model_weights_config.json", use_pickle)
        weight = nn.Parameter(torch.randn(3, 4))
        weight.payload = Touch(marker)
        entries[root + "data/weights/weight_9"] = _torch_saved(weight)

    path = _rewrite(saved, tmp_path / "weight.pt2", edit)
    assert "pickled data needing getattr" in _refused(path, "refused pickled data")
    assert not marker.exists()
    load_pt2(path, trust_pickle=True)
    assert marker.exists()


def test_pickled_tensor_constant_is_refused(saved, tmp_path, marker):
    def edit(entries: dict[str, bytes], root: str) -> None:
        def use_pickle(config: dict) -> None:
            config["config"]["offset"]["use_pickle"] = True

        _edit_json(entries, root + "data/constants/model_constants_config.json", use_pickle)
        entries[root + "data/constants/tensor_0"] = _torch_saved(_hostile(torch.ones(3), marker))

    path = _rewrite(saved, tmp_path / "constant.pt2", edit)
    _refused(path, "refused pickled data")
    assert not marker.exists()
    load_pt2(path, trust_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize(
    ("prefix", "what"),
    [("opaque_obj_", "a pickled Python object"), ("custom_obj_", "a pickled TorchScript object")],
)
def test_pickled_object_constant_is_refused(saved, tmp_path, marker, prefix, what):
    def edit(entries: dict[str, bytes], root: str) -> None:
        def add(config: dict) -> None:
            config["config"]["hook"] = {
                "path_name": f"{prefix}0",
                "is_param": False,
                "use_pickle": True,
                "tensor_meta": None,
            }

        _edit_json(entries, root + "data/constants/model_constants_config.json", add)
        entries[root + f"data/constants/{prefix}0"] = pickle.dumps(Touch(marker))

    path = _rewrite(saved, tmp_path / "object.pt2", edit)
    _refused(path, f"refused {what}")
    assert not marker.exists()
    if prefix == "opaque_obj_":  # torch unpickles it with pickle.loads
        _trusted(path)
        assert marker.exists()


# --- other ways torch.export.load runs code --------------------------------------------------
def test_aotinductor_library_is_refused(saved, tmp_path, marker, monkeypatch):
    from torch.export.pt2_archive import _package

    def load_library(*args, **kwargs):  # stands in for loading the shared library
        marker.touch()
        return object()

    monkeypatch.setattr(_package, "_load_aoti", load_library)
    library = _replace("data/aotinductor/model/model.so", b"\x7fELF")
    path = _rewrite(saved, tmp_path / "aoti.pt2", library)
    _refused(path, "refused AOTInductor compiled code")
    assert not marker.exists()
    load_pt2(path, trust_pickle=True)
    assert marker.exists()


def test_legacy_format_is_refused(saved, tmp_path, marker):
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize

    artifact = serialize(torch.export.load(saved))
    path = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(path, "w") as archive:  # the layout torch <= 2.7 wrote
        archive.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        archive.writestr("serialized_exported_program.json", artifact.exported_program)
        archive.writestr("serialized_state_dict.pt", artifact.state_dict)
        archive.writestr("serialized_constants.pt", artifact.constants)
        inputs = _torch_saved(((_hostile(torch.randn(2, 4), marker),), {}))
        archive.writestr("serialized_example_inputs.pt", inputs)
    _refused(path, "refused the legacy torch.export format")
    assert not marker.exists()
    _trusted(path)
    assert marker.exists()


def test_shape_expression_sympy_would_evaluate_is_refused(saved, tmp_path, marker):
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() or 2"

    def edit(entries: dict[str, bytes], root: str) -> None:
        def inject(program: dict) -> None:
            sizes = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
            sizes[0] = {"as_expr": {"expr_str": code, "hint": {"as_int": 2}}}

        _edit_json(entries, root + "models/model.json", inject)

    path = _rewrite(saved, tmp_path / "sympy.pt2", edit)
    _refused(path, "refused a shape expression sympy would run as Python")
    assert not marker.exists()
    _trusted(path)
    assert marker.exists()


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s0', integer=True, positive=True).__class__",  # attributes
        "Symbol('s0').__init__.__globals__",
        "Integer(1) + Abs('s0')",  # a string sympy would parse as Python again
        "Function('f')(Integer(1))",
        "Symbol('a b')",
        "__import__('os')",  # names that are not sympy's
        "eval(Integer(1))",
        "sympify(Integer(1))",
        "(lambda: 1)()",
        "[Integer(1)][0]",
        "Integer(1)\nInteger(2)",
    ],
)
def test_only_plain_shape_expressions_reach_sympy(text):
    assert not plain_sym_expr(text, {})


def test_shape_expressions_torch_writes_reach_sympy():
    from torch._export.serde.serialize import _print_sympy
    from torch.utils._sympy.functions import CeilToInt, FloorDiv, ToFloat

    s0 = sympy.Symbol("s0", integer=True, positive=True)
    names = {"FloorDiv": FloorDiv, "CeilToInt": CeilToInt, "ToFloat": ToFloat, "s0": s0}
    for expr in [
        *(2 * s0 + 1, FloorDiv(s0, 2), sympy.Max(s0, 3), sympy.Rational(1, 3) * s0),
        *(sympy.Float(0.5) * s0, -sympy.oo, sympy.true, CeilToInt(ToFloat(s0) / 2)),
        sympy.And(sympy.Eq(s0, 2), sympy.Ne(s0, 3), s0 >= 2, sympy.Not(s0 < 5)),
    ]:
        assert plain_sym_expr(_print_sympy(expr), names), _print_sympy(expr)


def _gadget(directory: Path, marker: Path, monkeypatch) -> str:
    """An importable module that creates ``marker`` on import and from ``Gadget.apply``."""
    (directory / "pt2_gadget.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "class Gadget:\n"
        "    @staticmethod\n"
        "    def apply(x):\n"
        "        return x\n"
    )
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.delitem(sys.modules, "pt2_gadget", raising=False)
    return "pt2_gadget"


def test_graph_calling_a_python_function_is_refused(saved, tmp_path, marker, monkeypatch):
    module = _gadget(tmp_path, marker, monkeypatch)

    def edit(entries: dict[str, bytes], root: str) -> None:
        def call_gadget(program: dict) -> None:
            graph = program["graph_module"]["graph"]
            graph["nodes"].append(
                {
                    "target": "torch.export.custom_ops."
                    "_call_custom_autograd_function_in_pre_dispatch",
                    "inputs": [
                        {"name": "cls", "arg": {"as_string": f"{module}.Gadget"}, "kind": 1},
                        {"name": "x", "arg": {"as_tensor": graph["outputs"][0]["as_tensor"]}},
                    ],
                    "outputs": [{"as_tensor": {"name": "gadget"}}],
                    "name": "gadget",
                    "metadata": {},
                }
            )
            values = graph["tensor_values"]
            values["gadget"] = values[graph["outputs"][0]["as_tensor"]["name"]]
            graph["outputs"][0]["as_tensor"] = {"name": "gadget"}
            spec = program["graph_module"]["signature"]["output_specs"][0]
            spec["user_output"]["arg"]["as_tensor"] = {"name": "gadget"}

        _edit_json(entries, root + "models/model.json", call_gadget)

    path = _rewrite(saved, tmp_path / "call.pt2", edit)
    message = _refused(path, "refused node 'gadget', which calls")
    assert "_call_custom_autograd_function_in_pre_dispatch" in message
    assert not marker.exists()
    _trusted(path)
    assert marker.exists()


def test_import_by_name_is_refused(saved, tmp_path, marker, monkeypatch):
    module = _gadget(tmp_path, marker, monkeypatch)

    def edit(entries: dict[str, bytes], root: str) -> None:
        def import_gadget(program: dict) -> None:
            signature = program["graph_module"]["module_call_graph"][0]["signature"]
            spec = json.loads(signature["in_spec"])
            spec[1]["children_spec"][1] = {  # kwargs: a defaultdict whose factory is imported
                "type": "collections.defaultdict",
                "context": {
                    "default_factory_module": module,
                    "default_factory_name": "Gadget",
                    "dict_context": [],
                },
                "children_spec": [],
            }
            signature["in_spec"] = json.dumps(spec)

        _edit_json(entries, root + "models/model.json", import_gadget)

    path = _rewrite(saved, tmp_path / "import.pt2", edit)
    _refused(path, f"refused an import of module '{module}'")
    assert not marker.exists()
    _trusted(path)
    assert marker.exists()


def test_guard_code_in_the_file_is_never_run(saved, tmp_path, marker):
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() or True"

    def edit(entries: dict[str, bytes], root: str) -> None:
        _edit_json(entries, root + "models/model.json", lambda p: p.update(guards_code=[code]))

    path = _rewrite(saved, tmp_path / "guards.pt2", edit)
    load_pt2(path)
    load_pt2(path, trust_pickle=True)
    assert not marker.exists()
    torch.export.load(path).module()(torch.randn(2, 4))  # what graphopt no longer does
    assert marker.exists()


# --- the CLI, threads, clean-up ----------------------------------------------------------------
def _weight_bomb(saved: Path, tmp_path: Path, marker: Path) -> Path:
    def edit(entries: dict[str, bytes], root: str) -> None:
        def use_pickle(config: dict) -> None:
            config["config"]["scale"]["use_pickle"] = True
            config["config"]["scale"]["path_name"] = "weight_9"

        _edit_json(entries, root + "data/weights/model_weights_config.json", use_pickle)
        entries[root + "data/weights/weight_9"] = _torch_saved(_hostile(torch.ones(3), marker))

    return _rewrite(saved, tmp_path / "evil.pt2", edit)


def test_cli_refuses_with_one_error_line(saved, tmp_path, marker, capsys):
    evil = _weight_bomb(saved, tmp_path, marker)
    assert main(["inspect", str(evil)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and OPT_IN in err[0]
    assert main(["compile", str(evil), "-o", str(tmp_path / "evil.so")]) == 2
    assert not marker.exists() and not (tmp_path / "evil.so").exists()
    assert main(["inspect", OPT_IN, str(evil)]) == 0
    assert marker.exists()


def test_concurrent_loads_each_get_their_own_answer(saved, tmp_path, marker):
    evil = _weight_bomb(saved, tmp_path, marker)
    results: dict[int, object] = {}

    def load(i: int) -> None:
        try:
            results[i] = load_pt2(evil if i % 2 else saved).graph.inputs
        except TorchImportError as exc:
            results[i] = exc

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] == ["x"] for i in range(4)] == [True, False, True, False]
    assert all(isinstance(results[i], TorchImportError) for i in (1, 3))
    assert not marker.exists()


def _patched_by_the_guard() -> list:
    from torch._export.serde.serialize import GraphModuleDeserializer
    from torch.export.pt2_archive import _package

    return [
        *(torch.load, pickle.loads, pickle.load, torch._C._pickle_load_obj, _package._load_aoti),
        *(_package.PT2ArchiveReader.read_bytes, GraphModuleDeserializer._parse_sym_expr),
        importlib.import_module,
    ]


def test_guard_is_per_thread_and_undone(saved, tmp_path, marker):
    originals = _patched_by_the_guard()
    data = pickle.dumps([1, 2])
    other: list[object] = []
    with TORCH_LOCK, Guard(set()):
        assert _patched_by_the_guard() != originals
        with pytest.raises(Refused):
            pickle.loads(data)
        thread = threading.Thread(target=lambda: other.append(pickle.loads(data)))
        thread.start()
        thread.join()
    assert other == [[1, 2]]  # another thread's pickle.loads is its own business
    assert _patched_by_the_guard() == originals
    _refused(_weight_bomb(saved, tmp_path, marker), "refused")
    assert _patched_by_the_guard() == originals


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_pt2(tmp_path / "absent.pt2")
    (tmp_path / "broken.pt2").write_bytes(b"not a zip")
    with pytest.raises(TorchImportError, match="broken.pt2 is not a readable torch.export"):
        load_pt2(tmp_path / "broken.pt2")
