"""Convolutions as onnxruntime operators: power-iteration estimates (NOT certificates) and explicit matrices."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .dense import PowerEstimate
from .geometry import ConvLayer, _Geo, _geometry


def _attrs(geo: _Geo) -> dict:
    return {
        "strides": list(geo.s),
        "pads": list(geo.pb) + list(geo.pe),
        "dilations": list(geo.dil),
        "group": geo.group,
        "kernel_shape": list(geo.k),
    }


def _node_io(geo: _Geo) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """(node input spatial, node output spatial, node input channels, node output channels) of the ONNX node."""
    cout_conv, cin_conv = geo.w.shape[0], geo.w.shape[1] * geo.group
    if geo.transpose:
        return geo.out, geo.n, cout_conv, cin_conv
    return geo.n, geo.out, cin_conv, cout_conv


def _adjoint_output_padding(geo: _Geo) -> list[int]:
    """output_padding of the ConvTranspose that maps the Conv's output back to exactly its input size."""
    op = []
    for i in range(len(geo.n)):
        made = geo.s[i] * (geo.out[i] - 1) + (geo.k[i] - 1) * geo.dil[i] + 1 - geo.pb[i] - geo.pe[i]
        op.append(geo.n[i] - made)
    return op


def _add_pair(nodes, inits, inputs, outputs, geo: _Geo, tag: str, with_adjoint: bool) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = np.ascontiguousarray(geo.w, dtype=np.float32)
    inits.append(numpy_helper.from_array(w, f"W{tag}"))
    n_in, n_out, c_in, c_out = _node_io(geo)
    conv_op = _adjoint_output_padding(geo)
    if geo.transpose and any(o >= s for o, s in zip(geo.op, geo.s)):
        raise ValueError("output_padding >= stride is not supported by the onnxruntime operators")
    x, y, z = f"x{tag}", f"y{tag}", f"z{tag}"
    inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", c_in, *n_in]))
    outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["B", c_out, *n_out]))
    a = _attrs(geo)
    if geo.transpose:
        nodes.append(helper.make_node("ConvTranspose", [x, f"W{tag}"], [y], output_padding=list(geo.op), **a))
        if with_adjoint:
            nodes.append(helper.make_node("Conv", [y, f"W{tag}"], [z], **a))
    else:
        nodes.append(helper.make_node("Conv", [x, f"W{tag}"], [y], **a))
        if with_adjoint:
            nodes.append(helper.make_node("ConvTranspose", [y, f"W{tag}"], [z], output_padding=conv_op, **a))
    if with_adjoint:
        outputs.append(helper.make_tensor_value_info(z, TensorProto.FLOAT, ["B", c_in, *n_in]))


def _session(nodes, inputs, outputs, inits, threads: int = 0):
    import onnxruntime as ort
    from onnx import helper

    from .. import runtime  # noqa: F401  (sets onnxlip's quiet global logger severity)

    graph = helper.make_graph(nodes, "opnorm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting on a shared machine
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _as_geo(layer) -> _Geo:
    if isinstance(layer, _Geo):
        return layer
    return _geometry(
        layer.weight,
        layer.spatial,
        layer.strides,
        layer.pads,
        layer.dilations,
        layer.group,
        layer.transpose,
        layer.output_padding,
    )


def conv_norms_estimate_power(
    layers: Sequence[ConvLayer],
    max_iters: int = 100,
    tol: float | None = 1e-6,
    seed: int = 0,
    threads: int = 0,
) -> list[PowerEstimate]:
    """Power-iteration ESTIMATES (lower, not certified) of the norms of several Conv/ConvTranspose layers at once.

    One onnxruntime graph holds every layer side by side as the exact operator followed by its adjoint (Conv then
    the ConvTranspose with the same pads/strides/dilations/group and the output_padding that restores the input
    size, or ConvTranspose then Conv), in float32; each step is one session.run for all layers. For each layer the
    estimate is sigma = ||A x|| / ||x|| of the last iterate (the square root of the Rayleigh quotient of A^T A,
    <= sigma_max up to float32 rounding). A layer stops changing once its relative change is <= tol (tol=None:
    exactly max_iters steps); the run stops when all layers have converged or after max_iters steps.
    Start vectors: standard normal from numpy's default_rng(seed), one stream for all layers in order.
    """
    geos = [_as_geo(L) for L in layers]
    if not geos:
        return []
    nodes, inits, inputs, outputs = [], [], [], []
    for i, geo in enumerate(geos):
        _add_pair(nodes, inits, inputs, outputs, geo, str(i), with_adjoint=True)
    sess = _session(nodes, inputs, outputs, inits, threads)
    rng = np.random.default_rng(seed)
    xs = []
    for geo in geos:
        n_in, _, c_in, _ = _node_io(geo)
        x = rng.standard_normal((1, c_in, *n_in))
        xs.append((x / np.linalg.norm(x)).astype(np.float32))
    sigma = [0.0] * len(geos)
    done: list[PowerEstimate | None] = [None] * len(geos)
    names = [o.name for o in outputs]
    for it in range(1, max_iters + 1):
        res = dict(zip(names, sess.run(names, {f"x{i}": xs[i] for i in range(len(geos))})))
        for i in range(len(geos)):
            if done[i] is not None:
                continue
            x64 = xs[i].astype(np.float64)
            new = float(np.linalg.norm(res[f"y{i}"].astype(np.float64)) / np.linalg.norm(x64))
            z = res[f"z{i}"].astype(np.float64)
            nz = float(np.linalg.norm(z))
            if nz == 0.0 or not np.isfinite(nz):
                done[i] = PowerEstimate(new, it, True)
                continue
            xs[i] = (z / nz).astype(np.float32)
            if tol is not None and abs(new - sigma[i]) <= tol * new:
                done[i] = PowerEstimate(new, it, True)
            sigma[i] = new
        if all(r is not None for r in done):
            break
    return [r if r is not None else PowerEstimate(sigma[i], max_iters, False) for i, r in enumerate(done)]


def conv_norm_estimate_power(
    weight,
    spatial,
    strides=None,
    pads=None,
    dilations=None,
    group: int = 1,
    transpose: bool = False,
    output_padding=None,
    *,
    max_iters: int = 100,
    tol: float | None = 1e-6,
    seed: int = 0,
) -> PowerEstimate:
    """Power-iteration ESTIMATE of one Conv/ConvTranspose norm (see conv_norms_estimate_power)."""
    layer = ConvLayer(weight, spatial, strides, pads, dilations, group, transpose, output_padding)
    return conv_norms_estimate_power([layer], max_iters=max_iters, tol=tol, seed=seed)[0]


def explicit_matrix(
    weight,
    spatial,
    strides=None,
    pads=None,
    dilations=None,
    group: int = 1,
    transpose: bool = False,
    output_padding=None,
) -> np.ndarray:
    """The dense matrix A (out_size, in_size) of a small Conv/ConvTranspose, vec(y) = A @ vec(x) (C-order over
    (C, spatial...)), by running the ONNX node in onnxruntime on all basis vectors at once (batch = in_size).
    Every entry is a single weight times 1, so for float32 weights the matrix is exact. For tests; in_size and
    out_size should stay in the thousands."""
    geo = _geometry(weight, spatial, strides, pads, dilations, group, transpose, output_padding)
    nodes, inits, inputs, outputs = [], [], [], []
    _add_pair(nodes, inits, inputs, outputs, geo, "0", with_adjoint=False)
    sess = _session(nodes, inputs, outputs, inits, threads=1)
    n_in, _, c_in, _ = _node_io(geo)
    size = c_in * int(np.prod(n_in))
    basis = np.eye(size, dtype=np.float32).reshape(size, c_in, *n_in)
    y = sess.run(["y0"], {"x0": basis})[0]
    return y.reshape(size, -1).T.astype(np.float64)
