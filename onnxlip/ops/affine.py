"""The diagonal affine op `affine` (y = scale * x + bias, broadcasting): BatchNormalization at inference,
Add/Sub/Mul/Div with a constant operand, scikit-learn's Scaler. A layer of identity neurons with learned edge
weights and biases (theory.md section 1); its companion, metric, adjoint, score and Lipschitz rules, beside its
import rules."""

from __future__ import annotations

import numpy as np

from ..companion import Scaled
from .linear import bias_scores, const_or_fail, linear_rules
from .registry import define_adjoint, define_lipschitz, importer


def _fail(msg: str):
    from ..importer import RuleError

    raise RuleError(msg)


def _affine_apply(node, em):
    return lambda x, w: em.op("Mul", [x, w.m], "scale")


linear_rules("affine", _affine_apply, lambda node, shapes: 1, weight_role="scale")


@importer("BatchNormalization")
def import_batchnorm(node, ctx):
    if int(ctx.attr("training_mode", 0)):
        _fail("BatchNormalization in training mode (batch statistics) is not a fixed affine map; export in eval mode")
    if len(node.output) > 1 and any(node.output[1:]):
        _fail("BatchNormalization with running-statistics outputs is in training mode; export in eval mode")
    x, scale, bias, mean, var = node.input[:5]
    values = [
        const_or_fail(ctx, t, what)
        for t, what in ((scale, "scale"), (bias, "bias"), (mean, "running mean"), (var, "running variance"))
    ]
    gamma, beta, mu, sigma2 = (v.astype(np.float64) for v in values)
    eps = float(ctx.attr("epsilon", 1e-5))
    if np.any(sigma2 + eps <= 0):
        _fail("running variance + epsilon is not positive")
    a = gamma / np.sqrt(sigma2 + eps)
    c = beta - a * mu
    rank = len(ctx.shape(x))
    if a.ndim == 1:  # per channel (axis 1)
        a = a.reshape((-1,) + (1,) * max(rank - 2, 0))
        c = c.reshape((-1,) + (1,) * max(rank - 2, 0))
    params = {
        "scale": ctx.param(scale, a, ctx.origins.get(scale, (scale,)) + ctx.origins.get(var, (var,))),
        "bias": ctx.param(bias, c, sum((ctx.origins.get(t, (t,)) for t in (bias, mean, scale, var)), ())),
    }
    ctx.add("affine", [x], attrs={"from": "BatchNormalization"}, params=params)


@importer("Add", "Sub", "Mul", "Div")
def import_arith(node, ctx):
    a, b = node.input
    op = node.op_type
    if not ctx.is_const(a) and not ctx.is_const(b):
        if op in ("Add", "Sub"):
            ctx.add("add", [a, b], attrs={"coefs": [1.0, 1.0 if op == "Add" else -1.0]})
            return
        _fail(f"{op} of two run-time tensors is not piecewise linear")
    const_first = ctx.is_const(a)
    x, cname = (b, a) if const_first else (a, b)
    c = ctx.const(cname).astype(np.float64)
    if op == "Add":
        params = {"bias": ctx.param(cname, c)}
    elif op == "Sub" and not const_first:
        params = {"bias": ctx.param(cname, -c)}
    elif op == "Sub":  # c - x
        params = {"scale": ctx.param(f"{cname}::neg1", -np.ones((1,)), ()), "bias": ctx.param(cname, c)}
    elif op == "Mul":
        params = {"scale": ctx.param(cname, c)}
    elif const_first:
        _fail("Div of a constant by a run-time tensor is not piecewise linear")
    else:
        if np.any(c == 0):
            _fail("Div by a constant with zero entries")
        params = {"scale": ctx.param(cname, 1.0 / c)}
    ctx.add("affine", [x], params=params)


@importer("ai.onnx.ml:Scaler")
def import_scaler(node, ctx):
    """scikit-learn's StandardScaler / MinMaxScaler as skl2onnx writes them: y = (x - offset) * scale per feature
    (last axis), a diagonal affine op whose parameters are attributes."""
    x = node.input[0]
    features = ctx.shape(x)[-1]
    scale, offset = (np.asarray(ctx.attr(a, [d]), dtype=np.float64) for a, d in (("scale", 1.0), ("offset", 0.0)))
    for name, v in (("scale", scale), ("offset", offset)):
        if v.size not in (1, features):
            _fail(f"its {name} has {v.size} entries for {features} features")
    key = node.output[0]
    params = {
        "scale": ctx.param(f"{key}::scale", np.broadcast_to(scale, (features,)).copy(), ()),
        # the bias -offset * scale is derived from both attributes (as a BatchNorm's c from beta, mean, gamma, var)
        "bias": ctx.param(
            f"{key}::offset", np.broadcast_to(-offset * scale, (features,)).copy(), (f"{key}::offset", f"{key}::scale")
        ),
    }
    ctx.add("affine", [x], params=params)


# ---- adjoint and score rules (theory.md section 4) --------------------------------------------------------
def _affine_adjoint(node, em, a, b):
    from ..adjoint import reduce_to

    x_shape, y_shape = em.shapes[node.inputs[0]], em.shapes[node.output]
    if "scale" not in node.params:
        return [Scaled(reduce_to(em, b[0].m, y_shape, x_shape), b[0].e)]
    s = em.weight(node.params["scale"])

    def apply(bm, wt):
        return reduce_to(em, em.op("Mul", [bm, wt.m], "bs"), y_shape, x_shape)

    return [em.linear([(b[0], s)], apply, None)]


def _affine_scores(node, em, a, b):
    from ..adjoint import reduce_to

    out = {}
    y_shape = em.shapes[node.output]
    if "scale" in node.params:
        p = node.params["scale"]
        s = em.weight(p)
        ab = em.op("Mul", [a[0].m, b[0].m], "ab")
        out["scale"] = Scaled(em.mul(s.m, reduce_to(em, ab, y_shape, p.shape)), em.add_exp(s.e, a[0].e, b[0].e))
    out.update(bias_scores(node, em, b[0], None))
    return out


define_adjoint("affine", _affine_adjoint, _affine_scores)


# ---- AutoLip rule (theory.md section 5) ------------------------------------------------------------------------
def _affine_lipschitz(node, shapes, l_in, norm):
    p = node.params.get("scale")
    top = float(np.abs(p.value).max()) if p is not None else 1.0
    # broadcasting to a larger shape copies entries: sqrt(copies) more in l2
    copies = np.prod(shapes[node.output]) / np.prod(shapes[node.inputs[0]])
    return [top * float(np.sqrt(max(copies, 1.0))) * l_in[0]]


define_lipschitz("affine", _affine_lipschitz)
