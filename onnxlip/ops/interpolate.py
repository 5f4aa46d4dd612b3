"""Resize/Upsample in linear (bilinear, trilinear) or cubic mode: a fixed linear map, separable over the resized
axes, so each output entry is a fixed combination of input entries (identity neurons with fixed edge weights,
theory.md section 1). The IR op `interpolate` holds one coefficient matrix per resized axis, read off the real
op (the ONNX reference evaluator applied to one-hot inputs, axis by axis) and checked against the whole op on a
random input. Companion: the same map with |coefficient|**q, as MatMuls with constant matrices; adjoint: their
transposes; l2 Lipschitz constant: the product of sqrt(||A||_1 ||A||_inf) over the axes (certified)."""

from __future__ import annotations

import math

import numpy as np

from .registry import define, define_adjoint, define_lipschitz


def _fail(msg: str):
    from ..importer import RuleError

    raise RuleError(msg)


def _run(node, opset: int, x: np.ndarray, consts: dict[str, np.ndarray], scales_attr=None) -> np.ndarray:
    """The real op (ONNX reference evaluator, float64) on x, with the given constant inputs (and, for Upsample-7,
    the given scales attribute)."""
    import onnx
    from onnx import helper

    from .probe import run_reference

    probe = onnx.NodeProto()
    probe.CopyFrom(node)
    if scales_attr is not None:
        for a in probe.attribute:
            if a.name == "scales":
                a.CopyFrom(helper.make_attribute("scales", [float(v) for v in scales_attr]))
    probe, consts = _integer_lengths(probe, x.shape, consts)
    return run_reference(probe, opset, x, consts).astype(np.float64)


def _integer_lengths(node, shape: tuple[int, ...], consts: dict[str, np.ndarray]):
    """A Resize by scales in align_corners mode (which reads the output length, not the scale) as the same Resize
    by sizes: onnxruntime and torch use the integer length floor(n * scale), the ONNX reference evaluator
    n * scale itself (3 * 1.5 gave coefficients off by up to 0.47)."""
    import onnx

    scales = node.input[2] if node.op_type == "Resize" and len(node.input) > 2 else ""
    if _transform(node) != "align_corners" or not scales or consts[scales].size == 0:
        return node, consts
    sizes = np.floor(np.asarray(shape, np.float64) * consts[scales].astype(np.float32)).astype(np.int64)
    by_sizes = onnx.NodeProto()
    by_sizes.CopyFrom(node)
    del by_sizes.input[2:]
    by_sizes.input.extend(["", "onnxlip::sizes"])
    return by_sizes, {**consts, "onnxlip::sizes": sizes}


def import_interpolation(node, ctx, mode: str) -> None:
    """The `interpolate` IR op for a Resize/Upsample in linear or cubic mode."""
    from .layout import require_constant_inputs

    policy = ctx.attr("keep_aspect_ratio_policy", b"stretch")
    if (policy.decode() if isinstance(policy, bytes) else policy) != "stretch":
        _fail("keep_aspect_ratio_policy other than 'stretch' is not supported")
    transform = ctx.attr("coordinate_transformation_mode", b"half_pixel")
    if (transform.decode() if isinstance(transform, bytes) else transform) == "tf_crop_and_resize":
        _fail("tf_crop_and_resize fills outside values with a constant (fixed neurons); not supported")
    require_constant_inputs(node, ctx)
    shape, out_shape = tuple(ctx.shape(node.input[0])), tuple(ctx.shape(node.output[0]))
    consts = {n: np.asarray(ctx.const(n)) for n in node.input[1:] if n}
    if ctx.attr("axes") is not None:
        node, consts = without_axes(node, consts, shape, list(ctx.attr("axes")))
    original, opset = node, ctx.opset
    if node.op_type == "Resize" and opset < 11:  # Resize-10 (X, scales) probed as its Resize-11 equivalent
        node, opset = _as_resize11(node), 11
    # which input holds per-axis scales or sizes (Upsample-7 keeps scales in an attribute)
    scales_name = node.input[2] if node.op_type == "Resize" and len(node.input) > 2 and node.input[2] else None
    sizes_name = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 and node.input[3] else None
    if node.op_type == "Upsample" and len(node.input) > 1:
        scales_name = node.input[1]
    if scales_name is not None and consts[scales_name].size == 0:
        scales_name = None
    scales = consts[scales_name].astype(np.float64) if scales_name else None
    in_attr = scales is None and sizes_name is None  # Upsample-7: the scales are an attribute
    if in_attr:
        scales = np.asarray(ctx.attr("scales") or [], dtype=np.float64)
        if scales.size != len(shape):
            _fail("could not read its scales")
    axes = [k for k in range(len(shape)) if shape[k] != out_shape[k] or (scales is not None and scales[k] != 1.0)]
    if 0 in axes or not axes:
        _fail("it resizes the batch axis (or nothing)")
    if any(k < len(shape) - 2 for k in axes):
        _fail("only the last two (spatial) axes may be resized")
    mats = {}
    for k in axes:  # the map along axis k: one-hot inputs along the batch, every other axis of size 1
        probe_shape = [1] * len(shape)
        probe_shape[0], probe_shape[k] = shape[k], shape[k]
        basis = np.zeros(probe_shape)
        for i in range(shape[k]):
            basis[(i,) + (0,) * (k - 1) + (i,) + (0,) * (len(shape) - k - 1)] = 1.0
        probe_consts = dict(consts)
        if scales is not None:
            one_axis = np.ones(len(shape))
            one_axis[k] = scales[k]
            if scales_name:
                probe_consts[scales_name] = one_axis.astype(consts[scales_name].dtype)
        if sizes_name:
            sizes = list(probe_shape)
            sizes[k] = out_shape[k]
            probe_consts[sizes_name] = np.asarray(sizes, dtype=np.int64)
        if out_shape[k] == 1 and node.op_type == "Resize" and _transform(node) == "pytorch_half_pixel":
            # the spec (and onnxruntime) read the single output at x_original = 0: input entry 0, in linear and
            # cubic mode alike (the reference evaluator tests n * scale > 1 instead of the output length)
            mats[k] = np.eye(1, shape[k])
            continue
        out = _run(node, opset, basis, probe_consts, one_axis if in_attr else None)
        if out.shape[k] != out_shape[k]:
            _fail("could not derive its coefficients")
        mats[k] = out.reshape(shape[k], out_shape[k]).T  # (out, in)
    _check_separable(original, ctx, shape, consts, mats)  # against onnxruntime's own op, as written
    ctx.add("interpolate", [node.input[0]], attrs={"mats": mats, "mode": mode, "rank": len(shape)})


def without_axes(node, consts: dict[str, np.ndarray], shape: tuple[int, ...], axes: list[int]):
    """The same Resize (opset 18+) without its `axes` attribute: scales and sizes given for every axis, 1 and the
    input's extent on the axes it does not name (the operator's definition), so the probes below need no case."""
    import onnx

    rank = len(shape)
    if any(not -rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        _fail(f"its axes {axes} are out of range or repeated for a rank-{rank} input")
    axes = [a % rank for a in axes]
    full = onnx.NodeProto()
    full.CopyFrom(node)
    del full.attribute[:]
    full.attribute.extend(a for a in node.attribute if a.name != "axes")
    consts = dict(consts)
    for i, fill in ((2, np.ones(rank)), (3, np.asarray(shape, dtype=np.float64))):  # scales, sizes
        name = node.input[i] if len(node.input) > i else ""
        if not name or consts[name].size == 0:
            continue
        if consts[name].size != len(axes):
            _fail(f"its {'scales' if i == 2 else 'sizes'} do not match its axes {axes}")
        values = fill.copy()
        values[axes] = consts[name].reshape(-1)
        consts[name] = values.astype(consts[name].dtype)
    return full, consts


def _as_resize11(node):
    """Resize-10 (X, scales; source coordinates x_out / scale) as Resize-11 (X, roi, scales) in asymmetric mode."""
    import onnx
    from onnx import helper

    out = onnx.NodeProto()
    out.CopyFrom(node)
    del out.input[1:]
    out.input.extend(["", node.input[1]])
    out.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
    return out


def _transform(node) -> str:
    return next((a.s.decode() for a in node.attribute if a.name == "coordinate_transformation_mode"), "half_pixel")


def _check_separable(node, ctx, shape, consts, mats) -> None:
    """The whole op on a random input (one batch entry and channel) equals the product of the axis maps."""
    from .probe import run_onnxruntime

    small = list(shape)
    small[0] = 1
    if len(small) > 2 and 1 not in mats:
        small[1] = 1
    x = np.random.default_rng(0).uniform(-1.0, 1.0, size=small)
    got = apply_maps(x, mats)
    # onnxruntime's op (float32: equal to its rounding), the runtime the model is run with; where it has no
    # kernel, the reference evaluator's (float64)
    want = run_onnxruntime(node, ctx.opset, x.astype(np.float32), _with_batch(consts, small, shape))
    tol = float(np.abs(x).max()) * math.prod(float(np.abs(a).sum(axis=1).max()) for a in mats.values()) * 1e-5
    if want is None:  # (an Upsample-7 keeps its attribute)
        want, tol = _run(node, ctx.opset, x, _with_batch(consts, small, shape)), 1e-12
    if want.shape != got.shape or np.abs(want - got).max() > tol:
        _fail("its interpolation is not separable over the resized axes as expected")


def _with_batch(consts, small, shape) -> dict[str, np.ndarray]:
    """Sizes inputs adjusted to a smaller batch/channel count (scales need nothing)."""
    out = {}
    for n, v in consts.items():
        if v.dtype.kind in "iu" and v.size == len(shape):
            v = v.copy()
            v[:2] = small[:2]
        out[n] = v
    return out


def apply_maps(x: np.ndarray, mats: dict[int, np.ndarray]) -> np.ndarray:
    """x with each axis k mapped by mats[k] (out, in): the separable interpolation, in float64."""
    for k, a in mats.items():
        x = np.moveaxis(np.tensordot(a, x, axes=([1], [k])), 0, k)
    return x


def _along(em, m: str, a: np.ndarray, k: int, rank: int, hint: str) -> tuple[str, str]:
    """Mantissa m mapped along axis k by the non-negative matrix a (out, in): (mantissa, exponent of a)."""
    c = em.constant(a if k == rank - 2 else a.T, q=1.0, hint=hint)
    args = [c.m, m] if k == rank - 2 else [m, c.m]  # (out, in) @ (..., in, W) or (..., H, in) @ (in, out)
    return em.op("MatMul", args, hint), c.e


def _interpolate_companion(node, em, xs, with_constants):
    x, rank = xs[0], node.attrs["rank"]
    m, e = x.m, x.e
    for k, a in node.attrs["mats"].items():
        m, ek = _along(em, m, np.abs(a) ** em.q, k, rank, "interp")
        e = em.add_exp(e, ek)
    return [em.renorm(m, e)]


def _interpolate_adjoint(node, em, a, b):
    y, rank = b[0], node.attrs["rank"]
    m, e = y.m, y.e
    for k, mat in reversed(list(node.attrs["mats"].items())):
        m, ek = _along(em, m, (np.abs(mat) ** em.q).T, k, rank, "uninterp")
        e = em.add_exp(e, ek)
    return [em.renorm(m, e)]


def _rounding_steps(node, shapes) -> int:
    # per axis: the rounded coefficients, then each output entry's products and additions; the renorm is exact
    return sum(1 + 2 * int(np.count_nonzero(a, axis=1).max()) for a in node.attrs["mats"].values())


def _interpolate_lipschitz(node, shapes, l_in, norm):
    from ..lipschitz import rounded_up

    bound = 1.0
    for a in node.attrs["mats"].values():  # ||A||_2 <= sqrt(||A||_1 ||A||_inf)
        col = max(math.fsum(abs(v) for v in a[:, j]) for j in range(a.shape[1]))
        row = max(math.fsum(abs(v) for v in a[i, :]) for i in range(a.shape[0]))
        bound *= math.sqrt(col * row)
    # roundings: per axis two sums, a product, a square root and the running product; then the product with l_in
    return [rounded_up(bound * l_in[0], 5 * len(node.attrs["mats"]) + 1)]


define("interpolate", _interpolate_companion, rounding_steps=_rounding_steps)
define_adjoint("interpolate", _interpolate_adjoint)
define_lipschitz("interpolate", _interpolate_lipschitz)
