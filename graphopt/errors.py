"""Exceptions a user can act on. The CLI prints each as one ``error: ...`` line, exit 2."""

from __future__ import annotations

__all__ = [
    "GraphoptError",
    "ModelLoadError",
    "UnsupportedOpsError",
    "TargetError",
    "InputError",
    "VerificationError",
    "ArtifactError",
    "CompileError",
    "first_line",
]


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of ``exc``'s message, so an error stays one line; ``default`` (the
    exception's type name when None) if the message is empty."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0].strip()
    return type(exc).__name__ if default is None else default


class GraphoptError(Exception):
    """Base class: a problem with what the user asked for, not a graphopt bug."""


class ModelLoadError(GraphoptError):
    """The model file is missing, unreadable, not ONNX, or fails ``onnx.checker``."""


class UnsupportedOpsError(GraphoptError):
    """The graph has ops (or attribute values) graphopt cannot compile.

    ``nodes`` lists ``(op_type, node_name, reason)`` for every offending node.
    """

    def __init__(self, nodes: list[tuple[str, str, str]]) -> None:
        self.nodes = nodes
        shown = "; ".join(
            f"{op} (node {name!r}{': ' + why if why else ''})" for op, name, why in nodes[:10]
        )
        more = f"; and {len(nodes) - 10} more" if len(nodes) > 10 else ""
        super().__init__(f"cannot compile {len(nodes)} node(s): {shown}{more}")


class TargetError(GraphoptError):
    """An unknown target name, a malformed target dict, or a bad target option."""


class InputError(GraphoptError):
    """Bad user inputs: a malformed --input-shape, or an inputs file that does not fit."""


class VerificationError(GraphoptError):
    """The compiled artifact disagrees with the reference (onnxruntime or torch)."""


class ArtifactError(GraphoptError):
    """An artifact file that is missing, not a graphopt artifact, or not runnable here."""


class CompileError(GraphoptError):
    """TVM failed to lower or build a model graphopt accepted (a limitation to report).

    The model passed every check graphopt makes up front, so this names the stage and
    TVM's first line; ``--debug`` shows the whole traceback for a bug report.
    """
