"""Ops that only the `lipschitz` command accepts (theory.md section 5, seeds 003-004): monotone or 1-Lipschitz
activations that are not ReLU-network pieces, so the path-metric, scores and pruning keep refusing them.

- `unary_lipschitz`: an entrywise function with a known Lipschitz constant: Tanh 1, Sigmoid 1/4 (max of
  s(1 - s)), Softsign 1, Elu (alpha <= 1) 1. Entrywise c-Lipschitz maps are c-Lipschitz in every lp norm.
- `group_sort`: a sort within groups (GroupSort; MaxMin for groups of 2): a permutation of each group, so
  1-Lipschitz (indeed norm-preserving) in every lp norm. Imported from TopK/Sort within groups, and recognised by
  a pass from the Split -> Max, Min -> Concat and ReduceMax, ReduceMin -> Concat patterns (passes.py)."""

from __future__ import annotations

from .axes import axis_in_range
from .registry import define, define_lipschitz, lipschitz_importer

_CONSTANTS = {"Tanh": 1.0, "Sigmoid": 0.25, "Softsign": 1.0}


def _no_companion(node, em, xs, with_constants):
    from ..errors import OnnxlipError

    raise OnnxlipError(f"node {node.name!r} ({node.onnx_op}) has no path-norm: it is accepted by `lipschitz` only")


def _times_constant(node, shapes, l_in, norm):
    return [node.attrs["constant"] * l_in[0]]


def _group_sort_lipschitz(node, shapes, l_in, norm):
    return [l_in[0]]


define("unary_lipschitz", _no_companion)
define("group_sort", _no_companion)
define_lipschitz("unary_lipschitz", _times_constant)
define_lipschitz("group_sort", _group_sort_lipschitz)


@lipschitz_importer("Tanh", "Sigmoid", "Softsign", "Elu")
def import_unary(node, ctx):
    from ..importer import RuleError

    if node.op_type == "Elu":
        alpha = float(ctx.attr("alpha", 1.0))
        if not 0 <= alpha <= 1:
            raise RuleError(f"Elu with alpha={alpha} has Lipschitz constant {alpha}; only 0 <= alpha <= 1 is supported")
        constant = 1.0
    else:
        constant = _CONSTANTS[node.op_type]
    ctx.add("unary_lipschitz", [node.input[0]], attrs={"constant": constant, "fn": node.op_type})


@lipschitz_importer("TopK", "Sort")
def import_sort(node, ctx):
    """TopK with k equal to the axis length (all values, sorted) is a permutation along that axis; its indices
    output must be unused."""
    from ..importer import RuleError

    shape = ctx.shape(node.input[0])
    axis = axis_in_range(ctx.attr("axis", -1), len(shape))
    if node.op_type == "TopK":
        k = ctx.const(node.input[1]) if len(node.input) > 1 else ctx.attr("k")
        if k is None or int(k.ravel()[0] if hasattr(k, "ravel") else k) != shape[axis]:
            raise RuleError("TopK keeping fewer values than the axis holds is not a permutation (GroupSort needs all)")
    if len(node.output) > 1 and node.output[1]:
        for other in ctx.consumers_of(node.output[1]):
            raise RuleError(f"its indices output feeds {other}; only the sorted values may be used")
    ctx.add("group_sort", [node.input[0]], [node.output[0]], attrs={"axis": axis})
