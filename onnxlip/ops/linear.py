"""Parametric linear ops: conv, conv_transpose, dense (Gemm/MatMul); the diagonal `affine` op is in affine.py.
Each is a layer of identity neurons with learned
edge weights and biases (theory.md section 1). Companion: the same op on |W|**q plus |b|**q (section 2);
metric: L_{hi-lo}(a) + L_lo(d) + delta_b (section 3)."""

from __future__ import annotations

import numpy as np

from ..companion import Scaled, linear_metric
from .conv_grad import correlate
from .padding import AUTO_PADS, resolve_pads
from .registry import define, define_adjoint, define_lipschitz, importer


def _fail(msg: str):
    from ..importer import RuleError

    raise RuleError(msg)


# ---- shared companion / metric glue -----------------------------------------------------------------------
def linear_rules(name, apply_factory, terms, weight_role: str = "weight", bias_role: str = "bias", bias_shape=None):
    """Register companion and metric rules for a linear op whose mantissa application is
    apply_factory(node, em) -> apply(x_m, w_scaled) -> tensor name."""

    def companion(node, em, xs, with_constants):
        params = node.params
        w = em.weight(params[weight_role]) if weight_role in params else None
        bias = params.get(bias_role)
        b = em.weight(bias) if bias is not None and with_constants else None
        apply = apply_factory(node, em)
        if w is None:  # bias-only affine: y = x + b
            return [em.scaled_sum([xs[0], b]) if b is not None else xs[0]]
        return [em.linear([(xs[0], w)], apply, b, bias_shape(node) if bias_shape else None)]

    def metric(node, em, a, d):
        apply = apply_factory(node, em)
        if weight_role not in node.params:  # bias-only: d_out = d_in + delta_b
            terms = [t for t in (d[0], em.weight(node.params[bias_role], "delta")) if t is not None]
            return [em.scaled_sum(terms)]
        shape = bias_shape(node) if bias_shape else None
        return [linear_metric(node, em, a[0], d[0], apply, weight_role, bias_role, shape)]

    # each output sums `terms` products and a bias; mantissa, multiplier and renormalisation roundings on top
    define(name, companion, metric, rounding_steps=lambda node, shapes: terms(node, shapes) + 4)


def _conv_apply(node, em):
    attrs = {k: node.attrs[k] for k in ("strides", "pads", "dilations", "group")}
    return lambda x, w: em.op("Conv", [x, w.m], "conv", **attrs)


def _conv_transpose_apply(node, em):
    attrs = {k: node.attrs[k] for k in ("strides", "pads", "dilations", "group", "output_padding")}
    return lambda x, w: em.op("ConvTranspose", [x, w.m], "convT", **attrs)


def _dense_apply(node, em):
    if node.attrs.get("side", "right") == "left":
        return lambda x, w: em.op("MatMul", [w.m, x], "matmul")
    return lambda x, w: em.op("MatMul", [x, w.m], "matmul")


def _channel_bias_shape(node):
    return (-1,) + (1,) * len(node.attrs["kernel_shape"])


def _kernel_terms(node, shapes):  # products per output entry: C_in/group * prod(kernel)
    w = node.params["weight"].shape
    per_group_in = w[1] if node.op == "conv" else w[0] // node.attrs["group"]
    return int(per_group_in * np.prod(w[2:]))


def _dense_terms(node, shapes):
    return int(node.params["weight"].shape[0 if node.attrs.get("side", "right") == "right" else 1])


linear_rules("conv", _conv_apply, _kernel_terms, bias_shape=_channel_bias_shape)
linear_rules("conv_transpose", _conv_transpose_apply, _kernel_terms, bias_shape=_channel_bias_shape)
linear_rules("dense", _dense_apply, _dense_terms)


def const_or_fail(ctx, name: str, what: str) -> np.ndarray:
    value = ctx.const(name)
    if value is None:
        _fail(f"its {what} ({name!r}) is computed at run time; onnxlip needs it to be a constant")
    return value


def _optional_bias(ctx, node, index: int):
    if len(node.input) > index and node.input[index]:
        const_or_fail(ctx, node.input[index], "bias")
        return ctx.param(node.input[index])
    return None


# ---- import rules -----------------------------------------------------------------------------------------
@importer("Conv")
def import_conv(node, ctx):
    x = node.input[0]
    weight = const_or_fail(ctx, node.input[1], "weight")
    kernel = _kernel(ctx, weight)
    n = len(kernel)
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    pads = resolve_pads(ctx, ctx.shape(x)[2:], ctx.shape(node.output[0])[2:], kernel, strides, dilations)
    group = int(ctx.attr("group", 1))
    _check_conv(ctx.shape(x), weight.shape, group, strides, dilations, pads, transposed=False)
    # a stride beyond the padded extent leaves one window, as the extent itself does (a damaged or odd file's
    # 2**40 would size the Lipschitz rule's frequency grid)
    spatial = ctx.shape(x)[2:]
    strides = [int(min(s, max(1, spatial[i] + pads[i] + pads[n + i]))) for i, s in enumerate(strides)]
    params = {"weight": ctx.param(node.input[1])}
    bias = _optional_bias(ctx, node, 2)
    if bias is not None:
        params["bias"] = bias
    attrs = dict(strides=strides, pads=pads, dilations=dilations, group=group, kernel_shape=kernel)
    ctx.add("conv", [x], attrs=attrs, params=params)


def _kernel(ctx, weight: np.ndarray) -> list[int]:
    """The kernel's spatial shape, read off the weight; a kernel_shape attribute must agree (onnxruntime checks)."""
    kernel = list(weight.shape[2:])
    given = ctx.attr("kernel_shape")
    if given is not None and [int(k) for k in given] != kernel:
        _fail(f"its kernel_shape {list(given)} does not match its weight's shape {tuple(weight.shape)}")
    return kernel


def _check_conv(x_shape, w_shape, group: int, strides, dilations, pads, transposed: bool) -> None:
    """The consistency onnxruntime would check at run time, as an import error that names the node."""
    n = len(w_shape) - 2
    if n < 1 or len(x_shape) != n + 2:
        _fail(f"its weight has shape {tuple(w_shape)} for an input of shape {tuple(x_shape)}")
    if group < 1:
        _fail(f"its group is {group}; it must be at least 1")
    if len(strides) != n or len(dilations) != n or len(pads) != 2 * n:
        _fail("its strides, dilations or pads do not match the kernel's rank")
    if min(strides) < 1 or min(dilations) < 1 or min(pads) < 0:
        _fail("its strides and dilations must be positive and its pads non-negative")
    channels_in = w_shape[0] if transposed else w_shape[1] * group
    channels_out = w_shape[1] * group if transposed else w_shape[0]
    if x_shape[1] != channels_in or channels_out % group or channels_in % group:
        _fail(
            f"its input has {x_shape[1]} channels, its weight {tuple(w_shape)} with group {group} expects {channels_in}"
        )


@importer("ConvTranspose")
def import_conv_transpose(node, ctx):
    x = node.input[0]
    weight = const_or_fail(ctx, node.input[1], "weight")
    kernel = _kernel(ctx, weight)
    n = len(kernel)
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    out_pad = list(ctx.attr("output_padding", [0] * n))
    if len(out_pad) != n or any(not 0 <= p < max(s, d) for p, s, d in zip(out_pad, strides, dilations)):
        _fail(f"its output_padding {out_pad} must have {n} entries, each below max(stride, dilation)")
    spatial_in, spatial_out = ctx.shape(x)[2:], ctx.shape(node.output[0])[2:]
    if len(spatial_in) != n or len(spatial_out) != n:  # (onnx infers an output_shape too short as the shape itself)
        _fail(f"its output shape {tuple(ctx.shape(node.output[0]))} does not fit its weight {tuple(weight.shape)}")
    auto_pad = ctx.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("", *AUTO_PADS):  # (onnxruntime refuses the model)
        _fail(f"its auto_pad {auto_pad!r} is none of {', '.join(AUTO_PADS)}")
    output_shape = ctx.attr("output_shape")  # (one not of n sizes: onnx's inference refuses it, the importer says so)
    if output_shape is None and auto_pad in ("NOTSET", ""):
        pads = [int(p) for p in ctx.attr("pads", [0] * (2 * n))]
    else:  # pads are implied by the output shape (ONNX ConvTranspose spec)
        pads_b, pads_e = [], []
        for i in range(n):
            total = strides[i] * (spatial_in[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial_out[i]
            if total < 0 and output_shape is not None:  # (onnxruntime refuses it: "inconsistent with input")
                _fail(f"its output_shape {list(output_shape)} is larger than its full output on axis {i + 2}")
            total = max(total, 0)
            if auto_pad == "SAME_UPPER":
                pads_b.append(total // 2)
                pads_e.append(total - total // 2)
            else:
                pads_b.append(total - total // 2)
                pads_e.append(total // 2)
        pads = pads_b + pads_e
    # output_padding as ONNX defines it is extra size at the end; recompute it so the shape matches exactly
    out_pad = [
        spatial_out[i] - (strides[i] * (spatial_in[i] - 1) + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[i + n])
        for i in range(n)
    ]
    if any(p < 0 for p in out_pad):
        _fail("its pads and output shape are inconsistent")
    group = int(ctx.attr("group", 1))
    _check_conv(ctx.shape(x), weight.shape, group, strides, dilations, pads, transposed=True)
    params = {"weight": ctx.param(node.input[1])}
    bias = _optional_bias(ctx, node, 2)
    if bias is not None:
        params["bias"] = bias
    attrs = dict(
        strides=strides,
        pads=pads,
        dilations=dilations,
        group=group,
        output_padding=out_pad,
        kernel_shape=kernel,
    )
    ctx.add("conv_transpose", [x], attrs=attrs, params=params)


def _add_dense(ctx, node, x: str, weight_name: str, weight: np.ndarray, side: str, bias_term, transposed=False):
    """dense node; bias_term is None, ("const", name, value) or ("tensor", name)."""
    params = {"weight": ctx.param(weight_name, weight, transposed=transposed)}
    out = node.output[0]
    if bias_term is not None and bias_term[0] == "const":
        params["bias"] = ctx.param(bias_term[1], bias_term[2])
    if bias_term is not None and bias_term[0] == "tensor":
        mid = f"{out}::dense"
        ctx.shapes[mid] = ctx.shape(out)
        ctx.add("dense", [x], [mid], {"side": side}, params)
        ctx.add("add", [mid, bias_term[1]], [out], {"coefs": [1.0, 1.0]})
    else:
        ctx.add("dense", [x], [out], {"side": side}, params)


def _scaled(alpha: float, w: np.ndarray) -> np.ndarray:
    return w if alpha == 1.0 else alpha * w.astype(np.float64)


def _transposed(ctx, x: str) -> str:
    t = f"{x}::T"
    if t not in ctx.shapes:
        ctx.shapes[t] = tuple(reversed(ctx.shape(x)))
        ctx.add("transpose", [x], [t], {"perm": [1, 0]})
    return t


@importer("Gemm")
def import_gemm(node, ctx):
    a, b = node.input[0], node.input[1]
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    bias_term = None
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        if ctx.is_const(c):
            # beta == 1: the initializer itself, which a variant file may change alone (ir.Param.origin)
            bias_term = ("const", c, ctx.const(c) if beta == 1.0 else beta * ctx.const(c).astype(np.float64))
        elif beta == 1.0:
            bias_term = ("tensor", c)
        else:
            _fail("its C input is a run-time tensor scaled by beta != 1")
    if ctx.is_const(b) and not ctx.is_const(a):
        w = ctx.const(b)
        w = _scaled(alpha, w.T if trans_b else w)
        x = _transposed(ctx, a) if trans_a else a
        _add_dense(ctx, node, x, b, w, "right", bias_term, transposed=bool(trans_b))
    elif ctx.is_const(a) and not ctx.is_const(b):
        w = ctx.const(a)
        w = _scaled(alpha, w.T if trans_a else w)
        x = _transposed(ctx, b) if trans_b else b
        _add_dense(ctx, node, x, a, w, "left", bias_term, transposed=bool(trans_a))
    else:
        _fail("Gemm multiplies two run-time tensors: not piecewise linear (one operand must be a weight)")


@importer("MatMul")
def import_matmul(node, ctx):
    a, b = node.input
    if ctx.is_const(b) and not ctx.is_const(a):
        w, side, x, wname = ctx.const(b), "right", a, b
    elif ctx.is_const(a) and not ctx.is_const(b):
        w, side, x, wname = ctx.const(a), "left", b, a
    else:
        _fail("MatMul multiplies two run-time tensors: not piecewise linear (one operand must be a weight)")
    if w.ndim != 2 or len(ctx.shape(x)) < (1 if side == "right" else 2):  # a vector, a batched constant
        from .einsum import import_matmul_nd

        import_matmul_nd(ctx, x, wname, side == "right")
        return
    _add_dense(ctx, node, x, wname, w, side, None)


# ---- adjoint and score rules (theory.md section 4) --------------------------------------------------------
def bias_scores(node, em, b_out, bias_shape):
    """|bias| * (sum of the adjoint over the positions the bias is broadcast to)."""
    from ..adjoint import reduce_to

    bias = node.params.get("bias")
    if bias is None:
        return {}
    bw = em.weight(bias)
    y_shape = em.shapes[node.output]
    if node.op in ("conv", "conv_transpose"):
        axes = [0, *range(2, len(y_shape))]
        summed = em.op("ReduceSum", [b_out.m, em.i64(axes)], "bsum", keepdims=0)
    else:
        summed = reduce_to(em, b_out.m, y_shape, bias.value.shape)
    return {"bias": Scaled(em.mul(bw.m, summed), em.add_exp(bw.e, b_out.e))}


def _conv_geometry(node, em):
    x_shape, y_shape = em.shapes[node.inputs[0]], em.shapes[node.output]
    a = node.attrs
    return x_shape, y_shape, a["kernel_shape"], a["strides"], a["pads"], a["dilations"], a["group"]


def _conv_adjoint(node, em, a, b):
    x_shape, y_shape, k, s, p, d, g = _conv_geometry(node, em)
    n = len(k)
    out_pad = [
        x_shape[2 + i] - ((y_shape[2 + i] - 1) * s[i] - p[i] - p[n + i] + (k[i] - 1) * d[i] + 1) for i in range(n)
    ]
    w = em.weight(node.params["weight"])

    def apply(bm, wt):
        return em.op(
            "ConvTranspose", [bm, wt.m], "convT", strides=s, pads=p, dilations=d, group=g, output_padding=out_pad
        )

    return [em.linear([(b[0], w)], apply, None)]


def _conv_scores(node, em, a, b):
    x_shape, y_shape, k, s, p, d, g = _conv_geometry(node, em)
    grad = correlate(em, a[0].m, b[0].m, x_shape, y_shape, p[: len(k)], g, s, d, k)
    w = em.weight(node.params["weight"])
    out = {"weight": Scaled(em.mul(w.m, grad), em.add_exp(w.e, a[0].e, b[0].e))}
    out.update(bias_scores(node, em, b[0], None))
    return out


def _conv_transpose_adjoint(node, em, a, b):
    _, _, k, s, p, d, g = _conv_geometry(node, em)
    w = em.weight(node.params["weight"])

    def apply(bm, wt):
        return em.op("Conv", [bm, wt.m], "conv", strides=s, pads=p, dilations=d, group=g)

    return [em.linear([(b[0], w)], apply, None)]


def _conv_transpose_scores(node, em, a, b):
    x_shape, y_shape, k, s, p, d, g = _conv_geometry(node, em)
    # y[o, s*i + k*d - p] += x[c, i] W[c, o', k]: correlate the padded output adjoint with the input
    grad = correlate(em, b[0].m, a[0].m, y_shape, x_shape, p[: len(k)], g, s, d, k)  # (C_in, C_out/g, *k)
    w = em.weight(node.params["weight"])
    out = {"weight": Scaled(em.mul(w.m, grad), em.add_exp(w.e, a[0].e, b[0].e))}
    out.update(bias_scores(node, em, b[0], None))
    return out


def _dense_adjoint(node, em, a, b):
    w = em.weight(node.params["weight"])
    left = node.attrs.get("side", "right") == "left"

    def apply(bm, wt):
        wt_t = em.op("Transpose", [wt.m], "wT")
        return em.op("MatMul", [wt_t, bm] if left else [bm, wt_t], "matmulT")

    return [em.linear([(b[0], w)], apply, None)]


def _dense_scores(node, em, a, b):
    w = em.weight(node.params["weight"])
    rows, cols = node.params["weight"].shape
    if node.attrs.get("side", "right") == "right":  # grad = sum over leading axes of a^T b: (K, N)
        a2 = em.op("Reshape", [a[0].m, em.i64([-1, rows])], "a2")
        b2 = em.op("Reshape", [b[0].m, em.i64([-1, cols])], "b2")
        grad = em.op("MatMul", [em.op("Transpose", [a2], "a2T"), b2], "wgrad")
    else:  # y = W x: grad = sum over leading axes of b x^T: (M, K)
        x_shape = em.shapes[node.inputs[0]]
        a3 = em.op("Reshape", [a[0].m, em.i64([-1, cols, x_shape[-1]])], "a3")
        b3 = em.op("Reshape", [b[0].m, em.i64([-1, rows, x_shape[-1]])], "b3")
        prod = em.op("MatMul", [b3, em.op("Transpose", [a3], "a3T", perm=[0, 2, 1])], "bxT")
        grad = em.op("ReduceSum", [prod, em.i64([0])], "wgrad", keepdims=0)
    out = {"weight": Scaled(em.mul(w.m, grad), em.add_exp(w.e, a[0].e, b[0].e))}
    out.update(bias_scores(node, em, b[0], None))
    return out


define_adjoint("conv", _conv_adjoint, _conv_scores)
define_adjoint("conv_transpose", _conv_transpose_adjoint, _conv_transpose_scores)
define_adjoint("dense", _dense_adjoint, _dense_scores)


# ---- AutoLip rules (theory.md section 5): ||L x||_2 <= ||L|| ||x||_2 ------------------------------------------
def _normed(node, shapes, l_in, norm):
    return [norm * l_in[0]]


for _op in ("conv", "conv_transpose", "dense"):
    define_lipschitz(_op, _normed)
