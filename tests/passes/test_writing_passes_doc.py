"""docs/writing-passes.md runs exactly as written: every ```python block, in order."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "writing-passes.md"


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.M | re.S)


def test_every_python_block_runs_in_order(tmp_path, monkeypatch):
    blocks = _blocks(DOC.read_text())
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "writing_passes_doc"}
    for k, code in enumerate(blocks, start=1):
        exec(compile(code, f"{DOC.name} block {k}", "exec"), namespace)  # noqa: S102
    assert namespace["FuseHardSwish"].name == "fuse-hardswish"


def test_the_example_plugin_is_the_rule_the_doc_walks_through():
    doc = DOC.read_text()
    plugin = (ROOT / "examples" / "my_passes.py").read_text()
    for snippet in (
        "def hard_sigmoid_mul(op, x):\n    return op.Mul(x, op.HardSigmoid(x))",
        "def hard_swish(op, x):\n    return op.HardSwish(x)",
        'alpha, beta = hs.attrs.get("alpha", 0.2), hs.attrs.get("beta", 0.5)',
        'name = "count-ops"\n    op: str = "Conv"',
    ):
        assert snippet in doc and snippet in plugin, snippet
