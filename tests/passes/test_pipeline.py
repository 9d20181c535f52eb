"""Pipelines as text, ordering constraints, and user passes from files and entry points."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from graphopt.passes import (
    DEFAULT_PIPELINE,
    PASSES,
    Pass,
    PassResult,
    PipelineError,
    PluginError,
    build_pipeline,
    load_plugin,
    parse_pipeline,
    pass_options,
    pipeline_text,
    registry,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_passes.py"


def test_parse_pipeline_text():
    assert parse_pipeline("a, b{k=1 m=x},c{k='a b', z=2.5}") == [
        ("a", {}),
        ("b", {"k": "1", "m": "x"}),
        ("c", {"k": "a b", "z": "2.5"}),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected a pass name"),
        ("a,,b", "expected a pass name at column 3"),
        ("a{k}", "expected key=value"),
        ("a{k=1", "missing '}'"),
        ("a b", "expected ',' after 'a'"),
        ("a{k=1 k=2}", "given twice"),
    ],
)
def test_malformed_pipeline_text(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_options_are_typed():
    (p,) = build_pipeline("fold-constants{max-elements=64}")
    assert p.max_elements == 64
    assert pipeline_text([p]) == "fold-constants{max-elements=64}"
    with pytest.raises(PipelineError, match="pass 'fold-constants': option 'max-elements' expects"):
        build_pipeline("fold-constants{max-elements=lots}")
    with pytest.raises(PipelineError, match="has no option 'nope'"):
        build_pipeline("cse{nope=1}")
    with pytest.raises(PipelineError, match="unknown pass 'fold-everything'"):
        build_pipeline("fold-everything")


def test_default_pipeline_satisfies_every_declared_constraint():
    passes = build_pipeline()
    assert tuple(p.name for p in passes) == DEFAULT_PIPELINE
    position = {p.name: i for i, p in enumerate(passes)}
    for cls in PASSES.values():
        for other in cls.after:
            assert position[other] < position[cls.name], (cls.name, other)
    assert set(PASSES) == set(DEFAULT_PIPELINE)


def test_constraints_reorder_stably_and_disable_drops():
    names = [p.name for p in build_pipeline("fold-batchnorm,dead-code,fold-constants")]
    assert names == ["fold-constants", "fold-batchnorm", "dead-code"]
    names = [p.name for p in build_pipeline(None, disable=["cse", "fuse-silu"])]
    assert "cse" not in names and "fuse-silu" not in names
    assert len(names) == len(DEFAULT_PIPELINE) - 2
    with pytest.raises(PipelineError, match="--disable-pass: unknown pass 'nope'"):
        build_pipeline(None, disable=["nope"])


def test_contradicting_constraints_are_an_error():
    @dataclass(frozen=True)
    class A(Pass):
        name = "a"
        after = ("b",)

    @dataclass(frozen=True)
    class B(Pass):
        name = "b"
        after = ("a",)

    with pytest.raises(PipelineError, match="contradicting"):
        build_pipeline("a,b", {"a": A, "b": B})


def test_pass_options_lists_name_type_default():
    assert pass_options(PASSES["fold-constants"]) == [("max_elements", "int", 1 << 24)]
    assert pass_options(PASSES["dead-code"]) == []


def test_example_plugin_loads():
    classes = load_plugin(EXAMPLE)
    assert [c.name for c in classes] == ["fuse-hardswish", "count-ops"]
    table = registry([EXAMPLE])
    (p,) = build_pipeline("count-ops{op=Relu}", table)
    assert p.op == "Relu"


def test_plugin_with_a_function(tmp_path):
    f = tmp_path / "fn_passes.py"
    f.write_text(
        "from dataclasses import dataclass\n"
        "from graphopt.passes import Pass, PassResult\n\n"
        "@dataclass(frozen=True)\n"
        "class Nothing(Pass):\n"
        '    """Does nothing."""\n'
        '    name = "nothing"\n'
        "    flag: bool = False\n\n"
        "    def run(self, graph):\n"
        "        return PassResult(graph, False)\n\n"
        "def graphopt_passes():\n"
        "    return [Nothing]\n"
    )
    (p,) = build_pipeline("nothing{flag=true}", registry([f]))
    assert p.flag is True


@pytest.mark.parametrize(
    "source, message",
    [
        ("import no_such_module_xyz\n", "failed to import: ModuleNotFoundError"),
        ("x = 1\n", "defines neither PASSES nor graphopt_passes"),
        ("PASSES = []\n", "defines no passes"),
        ("PASSES = [int]\n", "is not a subclass of graphopt.passes.Pass"),
        (
            "from graphopt.passes import Pass\nclass P(Pass):\n    name = 'p'\nPASSES = [P]\n",
            "is not a dataclass",
        ),
        (
            "from dataclasses import dataclass\nfrom graphopt.passes import Pass\n"
            "@dataclass(frozen=True)\nclass P(Pass):\n    name = 'cse'\nPASSES = [P]\n",
            "clashes with the pass of that name from graphopt",
        ),
    ],
    ids=["import-error", "nothing", "empty", "not-a-pass", "not-dataclass", "clash"],
)
def test_bad_plugins_are_one_clear_error(tmp_path, source, message):
    f = tmp_path / "bad_passes.py"
    f.write_text(source)
    with pytest.raises(PluginError, match=message):
        registry([f])


def test_missing_plugin_file(tmp_path):
    with pytest.raises(PluginError, match="no such file"):
        load_plugin(tmp_path / "nope.py")


def test_entry_point_passes(tmp_path, monkeypatch):
    pkg = tmp_path / "ep_passes_pkg.py"
    pkg.write_text(
        "from dataclasses import dataclass\n"
        "from graphopt.passes import Pass, PassResult\n\n"
        "@dataclass(frozen=True)\n"
        "class FromEntryPoint(Pass):\n"
        '    """Installed through an entry point."""\n'
        '    name = "from-entry-point"\n\n'
        "    def run(self, graph):\n"
        "        return PassResult(graph, False)\n\n"
        "PASSES = [FromEntryPoint]\n"
    )
    dist = tmp_path / "ep_passes_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-passes-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\nmine = ep_passes_pkg:PASSES\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = registry()
    assert "from-entry-point" in table
    assert build_pipeline("from-entry-point", table)[0].name == "from-entry-point"


def test_a_raising_pass_names_the_passes_before_it():
    from graphopt.frontends.onnx import onnx_to_graph
    from graphopt.passes import PassError, run_passes
    from tests.conftest import make_model

    @dataclass(frozen=True)
    class Boom(Pass):
        name = "boom"

        def run(self, graph):
            raise RuntimeError("kaput")

    g = onnx_to_graph(make_model([], {"x": (1,)}, {"x": (1,)}))
    with pytest.raises(PassError, match=r"'boom' failed: RuntimeError: kaput.*before it: cse"):
        run_passes(g, [PASSES["cse"](), Boom()])
    _ = PassResult
