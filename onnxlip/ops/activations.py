"""Piecewise-linear activations written as ReLU-DAG fragments (theory.md section 1):
Relu; LeakyRelu(alpha) = (1 - c) ReLU(x) + (c - alpha) ReLU(-x) + c x with c = alpha clipped to [0, 1] (two edges
for every alpha; the ReLU(-x) edge only when alpha < 0 or alpha > 1); Abs = ReLU(x) + ReLU(-x);
Clip(lo, hi) = lo + ReLU(x - lo) - ReLU(x - hi) (with the missing side dropped); Max/Min against a constant are
Clips; HardSigmoid = alpha ReLU(x - t1) - alpha ReLU(x - t2). Each becomes the op `relu_combo`: y = k * x + const
in the companion, with k and const fixed by the fragment. PRelu with per-channel slopes is the op `prelu`, the
same fragment with one alpha per entry.

The fragment is a choice: a path-norm belongs to a parameterisation, not to the function. The one taken has the
fewest, smallest edges: for q = 1 its gain |1 - c| + |c - alpha| + |c| = max(1, |alpha|) for alpha >= 0 and
1 + |alpha| for alpha < 0 is the least over all c. Both models of a pair are read the same way."""

from __future__ import annotations

import math

import numpy as np

from ..companion import Scaled
from .registry import define, define_adjoint, define_lipschitz, importer, reject


def _fail(msg: str):
    from ..importer import RuleError

    raise RuleError(msg)


def leaky_parts(alpha):
    """(ReLU(x), ReLU(-x), x) coefficients of the LeakyRelu fragment; alpha may be an array (PRelu slopes)."""
    c = np.clip(alpha, 0.0, 1.0)
    return 1.0 - c, c - alpha, c


def power_root(values, q: float):
    """r with r**q = sum_i |values_i|**q (entrywise, broadcasting), formed without overflow or underflow: a fixed
    edge's |c|**q left float64 at large q (HardSigmoid's 0.2**600 read as 0, a slope of 1e6 at q = 60 as inf).
    For q = 1 it is the plain sum, as before."""
    vs = [np.abs(np.asarray(v, dtype=np.float64)) for v in values]
    if q == 1.0:
        return sum(vs[1:], vs[0])
    top = np.maximum.reduce(np.broadcast_arrays(*vs)) if len(vs) > 1 else vs[0]
    safe = np.where(top > 0, top, 1.0)
    return np.where(top > 0, top * sum((v / safe) ** q for v in vs) ** (1.0 / q), 0.0)


def combo_gain(node, q: float) -> float:
    """The companion gain of a `relu_combo` as its q-th root (power_root): one |edge|**q per path through the
    fragment."""
    coefs = list(node.attrs["relu_coefs"]) + [node.attrs.get("mirror", 0.0), node.attrs["skip"]]
    return float(power_root([c for c in coefs if c != 0.0] or [0.0], q))


def _combo_companion(node, em, xs, with_constants):
    """Companion of y = sum_i c_i * ReLU(x - t_i) + m * ReLU(-x) + skip * x + bias: every path into x is counted
    once per edge (|c_i|**q + |m|**q + |skip|**q), every bias (-c_i t_i via the ReLU neurons, plus the output
    bias) once."""
    q = em.q
    terms = [c * np.asarray(t, dtype=np.float64) for c, t in zip(node.attrs["relu_coefs"], node.attrs["thresholds"])]
    const = power_root(terms + [node.attrs["bias"]], q) if with_constants else None  # const**q: bias path mass
    summed = const is not None and np.any(const)  # (the sum renormalises)
    y = em.scale_by_power(xs[0], combo_gain(node, q), q, renorm=not summed)
    if not summed:
        return [y]
    return [em.scaled_sum([y, em.constant(const, q=q, hint="clipc")])]


define("relu_combo", _combo_companion, rounding_steps=lambda node, shapes: 4)  # gain, constant, sum, renorm


def _combo(ctx, x, relu_coefs, thresholds, skip=0.0, bias=0.0, kind="relu", mirror=0.0):
    ctx.add(
        "relu_combo",
        [x],
        attrs={
            "relu_coefs": [float(c) for c in relu_coefs],
            "thresholds": [np.asarray(t, dtype=np.float64) for t in thresholds],
            "mirror": float(mirror),
            "skip": float(skip),
            "bias": np.asarray(bias, dtype=np.float64),
            "kind": kind,
        },
    )


@importer("Relu")
def import_relu(node, ctx):
    _combo(ctx, node.input[0], [1.0], [0.0])


@importer("LeakyRelu")
def import_leaky_relu(node, ctx):
    _leaky(ctx, node.input[0], float(ctx.attr("alpha", 0.01)))


def _leaky(ctx, x, alpha: float):
    if not math.isfinite(alpha):
        _fail(f"its slope {alpha} is not finite")
    relu, mirror, skip = leaky_parts(alpha)
    _combo(ctx, x, [float(relu)], [0.0], skip=float(skip), mirror=float(mirror), kind="leaky_relu")


@importer("HardSigmoid")
def import_hard_sigmoid(node, ctx):
    """max(0, min(1, alpha x + beta)) = alpha ReLU(x - t1) - alpha ReLU(x - t2), t1 = -beta/alpha and
    t2 = (1 - beta)/alpha: a Clip of alpha x + beta with the scale moved through the ReLUs (alpha > 0)."""
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        _fail(f"its alpha {alpha} or beta {beta} is not finite")
    if alpha <= 0.0:
        _fail(f"HardSigmoid with alpha={alpha} <= 0 is not read (a constant or a decreasing clip); alpha > 0 is")
    _combo(
        ctx,
        x=node.input[0],
        relu_coefs=[alpha, -alpha],
        thresholds=[-beta / alpha, (1.0 - beta) / alpha],
        kind="hard_sigmoid",
    )


@importer("Abs")
def import_abs(node, ctx):
    """|x| = ReLU(x) + ReLU(-x): two ReLU neurons of one edge each, so a companion gain of 2 for every q."""
    _combo(ctx, node.input[0], [1.0], [0.0], mirror=1.0, kind="abs")


@importer("PRelu")
def import_prelu(node, ctx):
    """PRelu(x) = LeakyRelu's fragment per entry, with the slopes a read as fixed edge weights (like LeakyRelu's
    alpha): models whose slopes differ are not paired (structure.align_params compares them)."""
    slope = ctx.const(node.input[1])
    if slope is None:
        _fail("its slope is computed at run time; it must be a constant")
    slope = np.asarray(slope, dtype=np.float64)
    if not np.all(np.isfinite(slope)):
        _fail("its slopes are not all finite")
    shape = tuple(ctx.shape(node.input[0]))
    fits = slope.ndim <= len(shape) and all(
        d in (1, n) for d, n in zip(slope.shape[::-1], shape[::-1])
    )  # (ONNX: the slope broadcasts to the input's shape, one way)
    if not fits:
        _fail(f"its slope of shape {list(slope.shape)} does not broadcast to its input's shape {list(shape)}")
    if np.all(slope == slope.flat[0]):  # one slope: a LeakyRelu
        _leaky(ctx, node.input[0], float(slope.flat[0]))
        return
    ctx.add("prelu", [node.input[0]], attrs={"slope": slope.reshape((1,) * (len(shape) - slope.ndim) + slope.shape)})


def _prelu_gain(node, q: float) -> np.ndarray:
    """Per entry, the q-th root of its fragment's gain (power_root of its edges)."""
    return power_root(leaky_parts(node.attrs["slope"]), q)


def _prelu_companion(node, em, xs, with_constants):
    gain = _prelu_gain(node, em.q)
    if np.all(gain == 1.0):
        return [xs[0]]
    g = em.constant(gain, hint="prelu")  # gain**q
    return [em.renorm(em.op("Mul", [xs[0].m, g.m], "prelu"), em.add_exp(xs[0].e, g.e))]


define("prelu", _prelu_companion, rounding_steps=lambda node, shapes: 2)  # the rounded gain, the product


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _clip(ctx, x, lo, hi):
    # a bound at or beyond float32's largest finite value never clips a float32 value: the same as none (Clip-6
    # to 10 default to -FLT_MAX / FLT_MAX, and onnx's version converter writes them out; taken literally they
    # made a bias path of 3.4e38)
    lo = None if lo is None or np.all(np.asarray(lo, np.float64) <= -_FLOAT32_MAX) else np.asarray(lo, np.float64)
    hi = None if hi is None or np.all(np.asarray(hi, np.float64) >= _FLOAT32_MAX) else np.asarray(hi, np.float64)
    what = "its constant operand holds" if ctx.node.op_type in ("Max", "Min") else "its bounds hold"
    for v in (lo, hi):
        if v is not None and np.any(np.isnan(v)):
            _fail(f"{what} NaN")
        if v is not None and not np.all(np.isfinite(v)):
            _fail(f"{what} both finite and infinite values")
    if lo is not None and hi is not None and np.any(lo > hi):
        # (the ONNX output is then the constant upper bound there: a fixed neuron, not read here)
        _fail("its lower bound exceeds its upper bound (where it does, the output is the constant upper bound)")
    if lo is None and hi is None:
        ctx.add("reshape", [x], attrs={"shape": list(ctx.shape(ctx.node.output[0]))})
    elif hi is None:  # lo + ReLU(x - lo)
        _combo(ctx, x, [1.0], [lo], bias=lo, kind="clip")
    elif lo is None:  # x - ReLU(x - hi)
        _combo(ctx, x, [-1.0], [hi], skip=1.0, kind="clip")
    else:  # lo + ReLU(x - lo) - ReLU(x - hi)
        _combo(ctx, x, [1.0, -1.0], [lo, hi], bias=lo, kind="clip")


@importer("Clip")
def import_clip(node, ctx):
    if ctx.opset < 11:
        lo, hi = ctx.attr("min", -math.inf), ctx.attr("max", math.inf)
    else:
        lo = hi = None
        for i, name in ((1, "min"), (2, "max")):
            if len(node.input) > i and node.input[i]:
                value = ctx.const(node.input[i])
                if value is None:
                    _fail(f"its {name} bound is computed at run time; it must be a constant")
                if i == 1:
                    lo = value
                else:
                    hi = value
    _clip(ctx, node.input[0], lo, hi)


@importer("Max", "Min")
def import_max_min(node, ctx):
    runtime = [t for t in node.input if t and not ctx.is_const(t)]
    consts = [ctx.const(t) for t in node.input if t and ctx.is_const(t)]
    if len(runtime) >= 2 and not consts:
        ctx.add("max", runtime, attrs={"negate": node.op_type == "Min"})
        return
    if len(runtime) == 1 and len(consts) == 1:
        out_shape = ctx.shape(node.output[0])
        if tuple(np.broadcast_shapes(ctx.shape(runtime[0]), consts[0].shape)) != tuple(out_shape) or tuple(
            ctx.shape(runtime[0])
        ) != tuple(out_shape):
            _fail("its constant operand broadcasts the tensor to a larger shape")
        value = consts[0].astype(np.float64)
        if node.op_type == "Max":
            _clip(ctx, runtime[0], value, None)
        else:
            _clip(ctx, runtime[0], None, value)
        return
    _fail(f"{node.op_type} needs run-time tensors only, or one run-time tensor and one constant")


def _max_companion(node, em, xs, with_constants):
    # a max neuron becomes a SUM of its inputs (theory.md section 2); Min(a,b) = -Max(-a,-b): same
    return [em.scaled_sum(list(xs))]


define("max", _max_companion, rounding_steps=lambda node, shapes: len(node.inputs) + 1)

reject(
    "is not piecewise linear; the bound needs a ReLU network",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "LogSoftmax",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Pow",
    "Erf",
    "Gelu",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "HardSwish",
    "Mish",
    "Sin",
    "Cos",
    "LRN",
    "LpNormalization",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "MeanVarianceNormalization",
    "Hardmax",
)
reject(
    "outputs indices or labels, not values; analyse the logits before it with --output",
    "ArgMax",
    "ArgMin",
    "TopK",
    "Sort",
    "ZipMap",
    "ArrayFeatureExtractor",
    "LabelEncoder",
)
reject(
    "dequantizes a run-time tensor (a quantized activation, which is not piecewise linear); weight-only "
    "quantization, a DequantizeLinear of constant weights, is supported",
    "DequantizeLinear",
)
reject("is a recurrent layer with sigmoid/tanh gates: not piecewise linear", "LSTM", "GRU", "RNN")
reject(
    "rounds values (quantized activations are not piecewise linear); keep activations in float",
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "Round",
    "Floor",
    "Ceil",
    "QLinearConv",
    "QLinearMatMul",
)


def _combo_adjoint(node, em, a, b):
    return [em.scale_by_power(b[0], combo_gain(node, em.q), em.q, renorm=True)]


def _max_adjoint(node, em, a, b):
    from ..adjoint import reduce_to

    y_shape = em.shapes[node.output]
    return [Scaled(reduce_to(em, b[0].m, y_shape, em.shapes[t]), b[0].e) for t in node.inputs]


define_adjoint("relu_combo", _combo_adjoint)
define_adjoint("prelu", lambda node, em, a, b: _prelu_companion(node, em, b, False))  # a diagonal map
define_adjoint("max", _max_adjoint)


def _combo_lipschitz(node, shapes, l_in, norm):
    # Clip (lo <= hi) has slopes 0 and 1, HardSigmoid 0 and alpha. The other fragments have one ReLU at 0 and the
    # mirror ReLU(-x): slope c0 + skip above 0 and skip - mirror below. An entrywise c-Lipschitz map is
    # c-Lipschitz in every lp norm.
    if node.attrs["kind"] == "clip":
        return [l_in[0]]
    if node.attrs["kind"] == "hard_sigmoid":
        return [node.attrs["relu_coefs"][0] * l_in[0]]
    (c0,), m, s = node.attrs["relu_coefs"], node.attrs.get("mirror", 0.0), node.attrs["skip"]
    return [max(abs(c0 + s), abs(s - m)) * l_in[0]]


def _prelu_lipschitz(node, shapes, l_in, norm):
    return [max(1.0, float(np.max(np.abs(node.attrs["slope"])))) * l_in[0]]  # slopes 1 and a per entry


def _max_lipschitz(node, shapes, l_in, norm):
    # |max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|): entrywise, so sqrt(sum of squares) over the branches;
    # an input broadcast to the output's shape has each entry copied out/in times: sqrt(out/in) more in l2
    out = float(np.prod(shapes[node.output]))
    return [float(np.sqrt(sum(v * v * out / float(np.prod(shapes[t])) for t, v in zip(node.inputs, l_in))))]


define_lipschitz("relu_combo", _combo_lipschitz)
define_lipschitz("prelu", _prelu_lipschitz)
define_lipschitz("max", _max_lipschitz)
