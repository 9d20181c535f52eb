"""Read and write ``unsupported.txt``: the node cases graphopt does not pass, one a line,
``test_name  reason`` (the reason: the refusal's or failure's first line)."""

from __future__ import annotations

from pathlib import Path

LIST = Path(__file__).with_name("unsupported.txt")
# reasons the suite skips rather than xfails: running the case would crash or hang pytest
NOT_RUN_IN_PROCESS = ("crash:", "timeout:")

HEADER = """\
# ONNX backend node cases graphopt does not pass (x86), one a line: `case  reason`.
# Each is a strict xfail in tests/onnx_backend/test_node_cases.py: a case that starts
# passing fails the suite until its line is deleted; `crash:`/`timeout:` ones are skipped
# (they would take pytest down). Regenerate the whole list with
#   python -m tests.onnx_backend.regenerate          (see --help; --slice: CNN/RNN only)
"""


def read_unsupported(path: Path = LIST) -> dict[str, str]:
    cases = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        cases[name] = reason.strip() or "unsupported"
    return cases


def write_unsupported(cases: dict[str, str], path: Path = LIST) -> None:
    width = max((len(n) for n in cases), default=0) + 2
    lines = [f"{name:{width}}{' '.join(reason.split())}" for name, reason in sorted(cases.items())]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(HEADER + "\n".join(lines) + ("\n" if lines else ""))
    tmp.replace(path)
