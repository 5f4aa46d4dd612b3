"""Ops that combine tensors: Add/Sub/Sum of run-time tensors (identity neurons with fixed weights +-1) and
Concat. Their companions are sums and concatenations of scaled tensors with aligned exponents."""

from __future__ import annotations

from .registry import define, importer


def _add_companion(node, em, xs, with_constants):
    terms = [em.scale_by(x, abs(c) ** em.q) for x, c in zip(xs, node.attrs["coefs"])]
    return [em.scaled_sum(terms)]


define("add", _add_companion, rounding_steps=lambda node, shapes: 2 * len(node.inputs) + 1)


@importer("Sum")
def import_sum(node, ctx):
    inputs = [t for t in node.input if t]
    if any(ctx.is_const(t) for t in inputs):
        from ..importer import RuleError

        raise RuleError("Sum with a constant operand is not supported; use Add")
    ctx.add("add", inputs, attrs={"coefs": [1.0] * len(inputs)})


def _concat_companion(node, em, xs, with_constants):
    if len(xs) == 1:
        return [xs[0]]
    top, mults = em.align([x.e for x in xs])
    parts = [em.mul(x.m, c) for x, c in zip(xs, mults)]
    from ..companion import Scaled

    return [Scaled(em.op("Concat", parts, "concat", axis=node.attrs["axis"]), top)]


define("concat", _concat_companion, rounding_steps=lambda node, shapes: 0)  # power-of-two multipliers: exact


@importer("Concat")
def import_concat(node, ctx):
    from ..importer import RuleError

    inputs = [t for t in node.input if t]
    if any(ctx.is_const(t) for t in inputs):
        raise RuleError("Concat with a constant operand (fixed neurons) is not supported")
    rank = len(ctx.shape(node.output[0]))
    axis = int(ctx.attr("axis", 1))
    ctx.add("concat", inputs, attrs={"axis": axis % rank})
