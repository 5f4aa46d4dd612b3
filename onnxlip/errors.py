"""Errors onnxlip raises for unusable input. The CLI maps every one of them to exit code 2."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


class OnnxlipError(Exception):
    """Base class: the input cannot be analysed. The message says why, for a human."""


def public(fn):
    """For the API's entry points: an OnnxlipError leaves without the frames it was raised through, or the
    exceptions chained to it. Their locals held the memory-mapped model files (one descriptor and the file's pages
    each) for as long as the caller kept the exception: 80 failed futures of a thread pool kept 160 descriptors.
    ONNXLIP_DEBUG=1 keeps them, for a traceback."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxlipError as exc:
            if os.environ.get("ONNXLIP_DEBUG"):
                raise
            exc.__traceback__ = exc.__context__ = exc.__cause__ = None
            raise exc from None

    return call


@dataclass(frozen=True)
class ModelIssue:
    """One problem with one node of a model."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.reason}"


def grouped_issues(issues: list[ModelIssue], spell: int = 3) -> list[str]:
    """One line per issue, except that more than `spell` nodes with one op and one reason (a transformer's hundred
    Softmax or Gelu nodes) share one line naming the first few: every problem is reported, readably."""
    groups: dict[tuple[str, str], list[ModelIssue]] = {}
    for issue in issues:
        groups.setdefault((issue.op, issue.reason), []).append(issue)
    lines = []
    for (op, reason), group in groups.items():
        if len(group) <= spell:
            lines += [str(issue) for issue in group]
        else:
            names = ", ".join(repr(i.node) for i in group[:spell])
            lines.append(f"{len(group)} {op} nodes ({names}, ... {group[-1].node!r}): {reason}")
    return lines


class UnsupportedModelError(OnnxlipError):
    """The model has nodes onnxlip cannot treat. Carries every problem found, not just the first."""

    def __init__(self, issues: list[ModelIssue], hint: str | None = None):
        self.issues = list(issues)
        self.hint = hint
        lines = [f"the model has {len(self.issues)} unsupported node(s):"]
        lines += [f"  - {line}" for line in grouped_issues(self.issues)]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ModelLoadError(OnnxlipError):
    """The file is missing, unreadable, corrupt, truncated or has unsafe external data."""


class ShapeError(OnnxlipError):
    """A tensor shape is unknown or inconsistent (e.g. a dynamic dimension with no --input-shape)."""


class MismatchError(OnnxlipError):
    """Two models that should share one architecture do not."""


class RuntimeFailure(OnnxlipError):
    """onnxruntime refused to build or run a graph (an op or attribute combination it has no kernel for, or a model
    whose shapes it rejects only at run time)."""


class UnderflowError(OnnxlipError):
    """float32 cannot hold the model's companion values closely enough to certify the result (range_guard.py)."""
