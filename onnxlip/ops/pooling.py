"""Pooling and reductions. MaxPool / GlobalMaxPool / ReduceMax are max neurons (weights 1): their companion
is a sum over each window (theory.md section 2), emitted as a depthwise Conv with a ones kernel.
AveragePool has fixed edge weights 1/divisor (the divisor read off the real op, so count_include_pad and
ceil_mode behave exactly as in onnxruntime): companion = sum-pool times divisor**-q. ReduceMean/ReduceSum and
GlobalAveragePool are sums with fixed weights 1/K or 1."""

from __future__ import annotations

import numpy as np

from ..companion import Scaled
from .axes import axes_in_range
from .padding import resolve_pads
from .registry import define, define_adjoint, define_lipschitz, importer


def _fail(msg: str):
    from ..importer import RuleError

    raise RuleError(msg)


def _window_attrs(ctx, node):
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    n = len(kernel)
    strides = [int(s) for s in ctx.attr("strides", [1] * n)]
    dilations = [int(d) for d in ctx.attr("dilations", [1] * n)]
    spatial_in = ctx.shape(node.input[0])[2:]
    spatial_out = ctx.shape(node.output[0])[2:]
    if len(spatial_in) != n:
        _fail(f"kernel has {n} dimensions but the input has {len(spatial_in)} spatial dimensions")
    pads = resolve_pads(ctx, spatial_in, spatial_out, kernel, strides, dilations)
    if any(pads[i] >= kernel[i] or pads[n + i] >= kernel[i] for i in range(n)):  # (onnxruntime refuses it)
        _fail(f"its pads {pads} are not all smaller than its kernel {kernel}")
    if any(d != 1 for d in dilations) and pads != resolve_pads(ctx, spatial_in, spatial_out, kernel, strides, [1] * n):
        # onnxruntime's pools compute SAME pads without the dilation, the ONNX spec (and onnxlip) with it
        _fail(
            "auto_pad SAME with dilations: onnxruntime pads such a pool differently from the ONNX spec, so the "
            "network has no single meaning; re-export with explicit pads"
        )
    if int(ctx.attr("ceil_mode", 0)):
        for i in range(n):
            span = (kernel[i] - 1) * dilations[i] + 1
            out = -(-(spatial_in[i] + pads[i] + pads[n + i] - span) // strides[i]) + 1
            if (out - 1) * strides[i] >= spatial_in[i] + pads[i]:
                out -= 1  # onnxruntime (like PyTorch) drops a last window that starts in the right padding
            if out != spatial_out[i]:
                _fail(
                    f"ceil_mode: onnx shape inference gives {spatial_out[i]} outputs on axis {i + 2}, onnxruntime "
                    f"computes {out}; re-export without ceil_mode or with explicit pads"
                )
    # ceil_mode: extend the end pads so a zero-padded window sum has exactly the inferred output size
    for i in range(n):
        need = (spatial_out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial_in[i] - pads[i]
        pads[n + i] = max(pads[n + i], need)
    return dict(kernel=kernel, strides=strides, dilations=dilations, pads=pads)


def sum_pool(em, x_m: str, channels: int, attrs: dict) -> str:
    """Window sums of a (1, C, *spatial) mantissa by a depthwise ones-kernel Conv."""
    ones = em.const(np.ones((channels, 1, *attrs["kernel"]), np.float32), "ones_k")
    return em.op(
        "Conv",
        [x_m, ones],
        "sumpool",
        group=channels,
        strides=attrs["strides"],
        pads=attrs["pads"],
        dilations=attrs["dilations"],
    )


def _pool_companion(node, em, xs, with_constants):
    x = xs[0]
    summed = sum_pool(em, x.m, node.attrs["channels"], node.attrs)
    weights = node.attrs.get("weights")
    if weights is None:  # max pool: window sums
        return [em.renorm(summed, x.e)]
    w = np.asarray(weights, dtype=np.float64) ** em.q
    if np.all(w == w.flat[0]):
        scaled = em.scale_by(Scaled(summed, x.e), float(w.flat[0]))
        return [em.renorm(scaled.m, scaled.e)]
    wc = em.constant(w, q=1.0, hint="poolw")
    return [em.renorm(em.mul(summed, wc.m), em.add_exp(x.e, wc.e))]


define("pool", _pool_companion, rounding_steps=lambda node, shapes: int(np.prod(node.attrs["kernel"])) + 3)


@importer("MaxPool")
def import_maxpool(node, ctx):
    if len(node.output) > 1 and node.output[1]:
        _fail("MaxPool with an Indices output is not supported")
    attrs = _window_attrs(ctx, node)
    attrs["channels"] = ctx.shape(node.input[0])[1]
    ctx.add("pool", [node.input[0]], [node.output[0]], attrs=attrs)


@importer("AveragePool")
def import_avgpool(node, ctx):
    attrs = _window_attrs(ctx, node)
    attrs["channels"] = ctx.shape(node.input[0])[1]
    attrs["weights"] = _avgpool_weights(node, ctx, attrs)
    ctx.add("pool", [node.input[0]], [node.output[0]], attrs=attrs)


def _avgpool_weights(node, ctx, attrs) -> np.ndarray:
    """Per-output-position edge weight 1/divisor, read off onnxruntime's own AveragePool on ones."""
    import onnx
    from onnx import helper

    from ..runtime import run_model

    spatial = list(ctx.shape(node.input[0])[2:])
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, *spatial])
    avg = helper.make_node(
        "AveragePool", ["x"], ["avg"], **{a.name: helper.get_attribute_value(a) for a in node.attribute}
    )
    w = helper.make_tensor(
        "w", onnx.TensorProto.FLOAT, [1, 1, *attrs["kernel"]], np.ones(int(np.prod(attrs["kernel"])))
    )
    cnt = helper.make_node(
        "Conv", ["x", "w"], ["cnt"], strides=attrs["strides"], pads=attrs["pads"], dilations=attrs["dilations"]
    )
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("avg", "cnt")]
    g = helper.make_graph([avg, cnt], "avgw", [x], outs, [w])
    opset = max(ctx.opset, 11)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    avg_v, cnt_v = run_model(model, {"x": np.ones([1, 1, *spatial], np.float32)})
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(cnt_v > 0, avg_v.astype(np.float64) / np.maximum(cnt_v, 1), 0.0)
    # snap to the exact 1/integer the op uses (float32 division above rounds)
    divisor = np.where(weights > 0, np.round(1.0 / np.where(weights > 0, weights, 1.0)), 0)
    exact = np.where(divisor > 0, 1.0 / np.where(divisor > 0, divisor, 1), 0.0)
    return exact.reshape((1, 1, *exact.shape[2:]))


# ---- global pools and reductions ------------------------------------------------------------------------
def _reduce_companion(node, em, xs, with_constants):
    x = xs[0]
    axes = em.i64(node.attrs["axes"])
    summed = em.op("ReduceSum", [x.m, axes], "rsum", keepdims=node.attrs["keepdims"])
    scaled = em.scale_by(Scaled(summed, x.e), node.attrs["weight"] ** em.q)
    return [em.renorm(scaled.m, scaled.e)]


def _reduce_steps(node, shapes) -> int:
    in_shape = shapes[node.inputs[0]]
    return int(np.prod([in_shape[a] for a in node.attrs["axes"]])) + 3


define("reduce", _reduce_companion, rounding_steps=_reduce_steps)


def _reduce_axes(node, ctx) -> list[int]:
    rank = len(ctx.shape(node.input[0]))
    if node.op_type in ("GlobalMaxPool", "GlobalAveragePool"):
        return list(range(2, rank))
    axes = ctx.attr("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.const(node.input[1])
        if value is None:
            _fail("its axes are computed at run time; they must be constant")
        axes = value.tolist()
    if not axes:
        if int(ctx.attr("noop_with_empty_axes", 0)):
            return []
        return list(range(rank))
    return axes_in_range(axes, rank, repeats="merge")


@importer("GlobalMaxPool", "GlobalAveragePool", "ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum")
def import_reduce(node, ctx):
    axes = _reduce_axes(node, ctx)
    in_shape = ctx.shape(node.input[0])
    keepdims = 1 if node.op_type.startswith("Global") else int(ctx.attr("keepdims", 1))
    count = int(np.prod([in_shape[a] for a in axes])) if axes else 1
    weight = 1.0 / count if node.op_type in ("GlobalAveragePool", "ReduceMean") else 1.0
    if not axes:
        ctx.add("reshape", [node.input[0]], attrs={"shape": list(ctx.shape(node.output[0]))})
        return
    # max and min neurons (min = -max(-x): weights 1 in the companion) are 1-Lipschitz; sums are not
    kind = {"GlobalMaxPool": "max", "ReduceMax": "max", "ReduceMin": "min"}.get(node.op_type, "sum")
    ctx.add("reduce", [node.input[0]], attrs={"axes": axes, "keepdims": keepdims, "weight": weight, "kind": kind})


# ---- adjoint rules (theory.md section 4) -------------------------------------------------------------------
def _pool_adjoint(node, em, a, b):
    x_shape, y_shape = em.shapes[node.inputs[0]], em.shapes[node.output]
    attrs = node.attrs
    n = len(attrs["kernel"])
    bm, be = b[0].m, b[0].e
    weights = attrs.get("weights")
    if weights is not None:  # average pool: the fixed edge weights (1/divisor)**q
        wc = em.constant(np.asarray(weights, dtype=np.float64) ** em.q, q=1.0, hint="poolw")
        bm, be = em.mul(bm, wc.m), em.add_exp(be, wc.e)
    ones = em.const(np.ones((attrs["channels"], 1, *attrs["kernel"]), np.float32), "ones_k")
    s, p, d = attrs["strides"], attrs["pads"], attrs["dilations"]
    out_pad = [
        x_shape[2 + i] - ((y_shape[2 + i] - 1) * s[i] - p[i] - p[n + i] + (attrs["kernel"][i] - 1) * d[i] + 1)
        for i in range(n)
    ]
    spread = em.op(
        "ConvTranspose",
        [bm, ones],
        "unpool",
        group=attrs["channels"],
        strides=s,
        pads=p,
        dilations=d,
        output_padding=out_pad,
    )
    return [em.renorm(spread, be)]


def _reduce_adjoint(node, em, a, b):
    x_shape = em.shapes[node.inputs[0]]
    bm = b[0].m
    if not node.attrs["keepdims"]:
        bm = em.op("Unsqueeze", [bm, em.i64(node.attrs["axes"])], "unsq")
    spread = em.op("Expand", [bm, em.i64(x_shape)], "expand")
    return [em.scale_by(Scaled(spread, b[0].e), node.attrs["weight"] ** em.q)]


define_adjoint("pool", _pool_adjoint)
define_adjoint("reduce", _reduce_adjoint)


# ---- AutoLip rules ------------------------------------------------------------------------------------------
def _windows_per_input(node, shapes) -> int:
    """The largest number of windows that contain one input entry (a product over the spatial axes)."""
    a = node.attrs
    n = len(a["kernel"])
    out = shapes[node.output][2:]
    total = 1
    for i in range(n):
        size = shapes[node.inputs[0]][2 + i]
        counts = np.zeros(size + a["pads"][i] + a["pads"][n + i] + a["kernel"][i] * a["dilations"][i], dtype=np.int64)
        for o in range(out[i]):
            start = o * a["strides"][i]
            counts[start : start + a["kernel"][i] * a["dilations"][i] : a["dilations"][i]] += 1
        total *= int(counts[a["pads"][i] : a["pads"][i] + size].max())
    return total


def _pool_lipschitz(node, shapes, l_in, norm):
    overlap = _windows_per_input(node, shapes)
    weights = node.attrs.get("weights")
    if weights is None:  # max pool: each output is 1-Lipschitz in its window; overlapping windows count
        return [float(np.sqrt(overlap)) * l_in[0]]
    w = np.asarray(weights, dtype=np.float64)
    rows = float((w * np.prod(node.attrs["kernel"])).max())  # a row sums at most K weights of that position
    return [float(np.sqrt(rows * w.max() * overlap)) * l_in[0]]  # Schur: sqrt(||A||_1 ||A||_inf)


def _reduce_lipschitz(node, shapes, l_in, norm):
    if node.attrs.get("kind") in ("max", "min"):
        return [l_in[0]]
    count = int(np.prod([shapes[node.inputs[0]][a] for a in node.attrs["axes"]]))
    return [node.attrs["weight"] * float(np.sqrt(count)) * l_in[0]]


define_lipschitz("pool", _pool_lipschitz)
define_lipschitz("reduce", _reduce_lipschitz)
