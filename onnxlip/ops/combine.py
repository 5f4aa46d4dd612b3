"""Ops that combine tensors: Add/Sub/Sum/Mean/Neg of run-time tensors (identity neurons with fixed weights +-1) and
Concat. Their companions are sums and concatenations of scaled tensors with aligned exponents."""

from __future__ import annotations

from .axes import axis_in_range
from .registry import define, define_adjoint, define_lipschitz, importer


def _add_companion(node, em, xs, with_constants):
    terms = [em.scale_by(x, abs(c) ** em.q) for x, c in zip(xs, node.attrs["coefs"])]
    return [em.scaled_sum(terms)]


define("add", _add_companion, rounding_steps=lambda node, shapes: 2 * len(node.inputs) + 1)


@importer("Sum", "Mean")
def import_sum(node, ctx):
    inputs = [t for t in node.input if t]
    if any(ctx.is_const(t) for t in inputs):
        from ..importer import RuleError

        raise RuleError(f"{node.op_type} with a constant operand is not supported; use Add")
    coef = 1.0 if node.op_type == "Sum" else 1.0 / len(inputs)  # Mean: the sum times 1/n (fixed edge weights)
    ctx.add("add", inputs, attrs={"coefs": [coef] * len(inputs)})


@importer("Neg")
def import_neg(node, ctx):
    ctx.add("add", [node.input[0]], attrs={"coefs": [-1.0]})  # an identity neuron with edge weight -1


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
    axis = axis_in_range(ctx.attr("axis", 1), rank)
    ctx.add("concat", inputs, attrs={"axis": axis})


def _add_adjoint(node, em, a, b):
    from ..adjoint import reduce_to
    from ..companion import Scaled

    y_shape = em.shapes[node.output]
    out = []
    for t, c in zip(node.inputs, node.attrs["coefs"]):
        reduced = Scaled(reduce_to(em, b[0].m, y_shape, em.shapes[t]), b[0].e)
        out.append(em.scale_by(reduced, abs(c) ** em.q))
    return out


def _concat_adjoint(node, em, a, b):
    from ..companion import Scaled

    sizes = [em.shapes[t][node.attrs["axis"]] for t in node.inputs]
    if len(sizes) == 1:
        return [b[0]]
    parts = em.op("Split", [b[0].m, em.i64(sizes)], "unconcat", n_out=len(sizes), axis=node.attrs["axis"])
    return [Scaled(p, b[0].e) for p in parts]


define_adjoint("add", _add_adjoint)
define_adjoint("concat", _concat_adjoint)


def _add_lipschitz(node, shapes, l_in, norm):
    import math

    out = math.prod(shapes[node.output])
    return [
        sum(
            abs(c) * math.sqrt(out / math.prod(shapes[t])) * v
            for t, c, v in zip(node.inputs, node.attrs["coefs"], l_in)
        )
    ]


def _concat_lipschitz(node, shapes, l_in, norm):
    return [sum(v * v for v in l_in) ** 0.5]


define_lipschitz("add", _add_lipschitz)
define_lipschitz("concat", _concat_lipschitz)
