"""Axis arguments of ONNX ops, checked as onnxruntime checks them: each in [-rank, rank - 1], and no axis twice
where the op forbids it. Wrapping them silently (axis 7 of a rank-4 tensor read as 3) analysed a model onnxruntime
refuses to run, and a repeated ReduceMean axis divided by its size twice."""

from __future__ import annotations

from typing import Iterable


def _fail(msg: str):
    from ..importer import RuleError

    raise RuleError(msg)


def axis_in_range(axis: int, rank: int, what: str = "axis") -> int:
    """axis as a non-negative int; a RuleError naming it when it lies outside [-rank, rank - 1]."""
    axis = int(axis)
    if not -rank <= axis < rank:
        _fail(f"its {what} {axis} is out of range for a tensor of rank {rank} ([{-rank}, {rank - 1}])")
    return axis % rank


def axes_in_range(axes: Iterable[int], rank: int, what: str = "axes", repeats: str = "refuse") -> list[int]:
    """Each axis as a non-negative int, in the given order. `repeats`: "refuse" (a RuleError, as onnxruntime
    refuses Slice, Pad and Unsqueeze axes given twice) or "merge" (each once, sorted: a reduction or a Squeeze over
    an axis named twice reduces or squeezes it once, as onnxruntime does)."""
    given = [int(a) for a in axes]
    bad = [a for a in given if not -rank <= a < rank]
    if bad:
        _fail(f"its {what} {bad} are out of range for a tensor of rank {rank} ([{-rank}, {rank - 1}])")
    out = [a % rank for a in given]
    if repeats == "merge":
        return sorted(set(out))
    if len(set(out)) != len(out):
        _fail(f"its {what} {given} name an axis more than once")
    return out
