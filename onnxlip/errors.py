"""Errors onnxlip raises for unusable input. The CLI maps every one of them to exit code 2."""

from __future__ import annotations

from dataclasses import dataclass


class OnnxlipError(Exception):
    """Base class: the input cannot be analysed. The message says why, for a human."""


@dataclass(frozen=True)
class ModelIssue:
    """One problem with one node of a model."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.reason}"


class UnsupportedModelError(OnnxlipError):
    """The model has nodes onnxlip cannot treat. Carries every problem found, not just the first."""

    def __init__(self, issues: list[ModelIssue], hint: str | None = None):
        self.issues = list(issues)
        self.hint = hint
        lines = [f"the model has {len(self.issues)} unsupported node(s):"]
        lines += [f"  - {issue}" for issue in self.issues]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ModelLoadError(OnnxlipError):
    """The file is missing, unreadable, corrupt, truncated or has unsafe external data."""


class ShapeError(OnnxlipError):
    """A tensor shape is unknown or inconsistent (e.g. a dynamic dimension with no --input-shape)."""


class MismatchError(OnnxlipError):
    """Two models that should share one architecture do not."""


class UnderflowError(OnnxlipError):
    """float32 cannot hold the model's companion values closely enough to certify the result (range_guard.py)."""
