"""Layout ops: every output entry is a copy of one input entry (or zero for Pad), so they are identity
neurons with weight-1 edges and their companion is the same op on the mantissa (exponent unchanged).
Reshape-like ops become `reshape`; Resize/Upsample (nearest), Tile, Expand, DepthToSpace, SpaceToDepth and Pad in
reflect/edge/wrap mode become `select`, a flat gather whose index map is read off the real op applied to an index
tensor."""

from __future__ import annotations

import math

import numpy as np

from ..companion import Scaled
from ..errors import ShapeError
from .axes import axes_in_range, axis_in_range
from .probe import run_onnxruntime, run_reference
from .registry import define, define_adjoint, define_lipschitz, importer

_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
_MAX_MAP = 2**27  # entries of a copy op's index map (1 GiB of int64)


def _fail(msg: str):
    from ..importer import RuleError

    raise RuleError(msg)


def _exact(node, shapes) -> int:
    return 0  # entries are copied, never rounded


def _same(op_type, *input_attrs):
    """Companion: the op applied to the mantissa, with constant inputs/attributes from node.attrs."""

    def companion(node, em, xs, with_constants):
        x = xs[0]
        extra = [em.i64(node.attrs[k]) for k in input_attrs]
        kwargs = {k: v for k, v in node.attrs.items() if k not in input_attrs and not k.startswith("_")}
        return [Scaled(em.op(op_type, [x.m, *extra], op_type.lower(), **kwargs), x.e)]

    return companion


define("reshape", _same("Reshape", "shape"), rounding_steps=_exact)
define("transpose", _same("Transpose"), rounding_steps=_exact)
define("slice", _same("Slice", "starts", "ends", "axes", "steps"), rounding_steps=_exact)
define("pad", _same("Pad", "pads"), rounding_steps=_exact)


def _gather_companion(node, em, xs, with_constants):
    x = xs[0]
    idx = em.const(np.asarray(node.attrs["indices"], dtype=np.int64), "idx")
    return [Scaled(em.op("Gather", [x.m, idx], "gather", axis=node.attrs["axis"]), x.e)]


def _select_companion(node, em, xs, with_constants):
    x = xs[0]
    flat = em.op("Reshape", [x.m, em.i64([-1])], "flat")
    picked = em.op("Gather", [flat, em.const(node.attrs["index"].ravel().astype(np.int64), "sel")], "select", axis=0)
    return [Scaled(em.op("Reshape", [picked, em.i64(node.attrs["index"].shape)], "unflat"), x.e)]


def _split_companion(node, em, xs, with_constants):
    x = xs[0]
    outs = em.op("Split", [x.m, em.i64(node.attrs["sizes"])], "split", n_out=len(node.outputs), axis=node.attrs["axis"])
    outs = outs if isinstance(outs, list) else [outs]
    return [Scaled(o, x.e) for o in outs]


define("gather", _gather_companion, rounding_steps=_exact)
define("select", _select_companion, rounding_steps=_exact)
define("split", _split_companion, rounding_steps=_exact)


@importer("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Cast", "CastLike")
def import_reshape(node, ctx):
    if node.op_type == "Cast" and int(ctx.attr("to")) not in _FLOAT_TYPES:
        _fail("Cast to a non-floating type truncates values: not piecewise linear")
    # CastLike takes its type from its second input: a constant, or an activation (all of which are floats here)
    like = ctx.const(node.input[1]) if node.op_type == "CastLike" and len(node.input) > 1 else None
    if like is not None and np.asarray(like).dtype.kind != "f":
        _fail("CastLike to a non-floating type truncates values: not piecewise linear")
    if node.op_type == "Dropout":
        if len(node.input) > 2 and node.input[2]:
            mode = ctx.const(node.input[2])
            if mode is None or bool(mode):
                _fail("Dropout in training mode is random; export the model in eval mode")
        if len(node.output) > 1 and node.output[1] and ctx.consumers_of(node.output[1]):
            _fail("Dropout with a mask output that the graph reads is not supported")
    source, target = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if node.op_type in ("Squeeze", "Unsqueeze"):  # (their shapes come from onnx's inference, which wraps old axes)
        axes = ctx.attr("axes") if ctx.opset < 13 else _ints_input(ctx, node, 1, "axes")
        if axes is not None:  # (onnxruntime squeezes an axis named twice once, and refuses such an Unsqueeze)
            squeeze = node.op_type == "Squeeze"
            axes_in_range(axes, len(source if squeeze else target), repeats="merge" if squeeze else "refuse")
    if int(np.prod(source)) != int(np.prod(target)):  # onnx's shape inference does not check the count
        raise ShapeError(  # a shape error, not an unsupported op: no --output cut helps
            f"node {node.name or node.output[0]!r} ({node.op_type}) turns {list(source)} ({int(np.prod(source))} "
            f"entries) into {list(target)} ({int(np.prod(target))}): its target shape is fixed in the model (an "
            "exporter may have written the batch size into it), so the model runs only with the input shape it was "
            "exported for (leave --input-shape out, or give that shape)"
        )
    ctx.add("reshape", [node.input[0]], [node.output[0]], attrs={"shape": list(target)})


@importer("Transpose")
def import_transpose(node, ctx):
    rank = len(ctx.shape(node.input[0]))
    perm = ctx.attr("perm")
    perm = [int(p) for p in perm] if perm is not None else list(reversed(range(rank)))
    if sorted(perm) != list(range(rank)):  # (onnx's shape inference lets a short perm through; onnxruntime fails)
        _fail(f"its perm {perm} is not a permutation of the {rank} axes of its input")
    ctx.add("transpose", [node.input[0]], attrs={"perm": [int(p) for p in perm]})


def _ints_input(ctx, node, index, what, default=None):
    if len(node.input) > index and node.input[index]:
        value = ctx.const(node.input[index])
        if value is None:
            _fail(f"its {what} are computed at run time; they must be constant")
        return [int(v) for v in np.asarray(value).ravel()]
    return default


@importer("Slice")
def import_slice(node, ctx):
    rank = len(ctx.shape(node.input[0]))
    if ctx.opset < 10:
        starts, ends = list(ctx.attr("starts")), list(ctx.attr("ends"))
        axes = list(ctx.attr("axes", list(range(len(starts)))))
        steps = [1] * len(starts)
    else:
        starts = _ints_input(ctx, node, 1, "starts")
        ends = _ints_input(ctx, node, 2, "ends")
        axes = _ints_input(ctx, node, 3, "axes", list(range(len(starts))))
        steps = _ints_input(ctx, node, 4, "steps", [1] * len(starts))
    axes = axes_in_range(axes, rank)
    ctx.add("slice", [node.input[0]], attrs={"starts": starts, "ends": ends, "axes": axes, "steps": steps})


@importer("Gather")
def import_gather(node, ctx):
    indices = ctx.const(node.input[1])
    if indices is None:
        _fail("its indices are computed at run time; they must be constant")
    shape = ctx.shape(node.input[0])
    axis = int(ctx.attr("axis", 0))
    if not -len(shape) <= axis < len(shape):
        _fail(f"its axis {axis} is out of range for an input of rank {len(shape)}")
    axis %= len(shape)
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu":
        _fail("its indices are not integers")
    size = shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        _fail(f"its indices lie outside [-{size}, {size - 1}], the size of axis {axis}")
    ctx.add("gather", [node.input[0]], attrs={"indices": indices.astype(np.int64) % max(size, 1), "axis": axis})


@importer("Split")
def import_split(node, ctx):
    rank = len(ctx.shape(node.input[0]))
    axis = axis_in_range(ctx.attr("axis", 0), rank)
    sizes = [ctx.shape(o)[axis] for o in node.output]
    ctx.add("split", [node.input[0]], list(node.output), attrs={"axis": axis, "sizes": sizes})


@importer("Pad")
def import_pad(node, ctx):
    mode = ctx.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("reflect", "edge", "wrap"):  # every output entry copies an input entry: a select
        require_constant_inputs(node, ctx)  # (negative pads crop: the index map is onnxruntime's, crop first)
        if mode == "reflect":
            _check_reflect(node, ctx)
        ctx.add("select", [node.input[0]], attrs={"index": _index_map(node, ctx)})
        return
    if mode != "constant":
        _fail(f"Pad mode {mode!r} is not supported (only constant zero, reflect, edge and wrap)")
    rank = len(ctx.shape(node.input[0]))
    if ctx.opset < 11:
        pads, value = list(ctx.attr("pads")), float(ctx.attr("value", 0.0))
    else:
        pads = _ints_input(ctx, node, 1, "pads")
        value = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
        if value is None:
            _fail("its padding value is computed at run time")
        value = float(np.asarray(value).ravel()[0]) if np.size(value) else 0.0
        axes = _ints_input(ctx, node, 3, "axes")
        if axes is not None:
            full = [0] * (2 * rank)
            n = len(axes)
            for i, a in enumerate(axes_in_range(axes, rank)):
                full[a], full[rank + a] = pads[i], pads[n + i]
            pads = full
    if value != 0.0:
        _fail(f"Pad with a non-zero constant ({value}) adds fixed neurons; only zero padding is supported")
    x, out, shape = node.input[0], node.output[0], ctx.shape(node.input[0])
    crops, pads = [max(-int(p), 0) for p in pads], [max(int(p), 0) for p in pads]
    if any(crops):  # negative pads crop (a slice), then the positive ones pad
        if any(crops[i] + crops[rank + i] >= shape[i] for i in range(rank)):
            _fail("its negative pads crop an axis away entirely")
        axes = [i for i in range(rank) if crops[i] or crops[rank + i]]
        ends = [shape[i] - crops[rank + i] for i in axes]
        cropped = f"{out}::crop" if any(pads) else out
        ctx.shapes[cropped] = tuple(d - crops[i] - crops[rank + i] for i, d in enumerate(shape))
        ctx.add(
            "slice",
            [x],
            [cropped],
            {"starts": [crops[i] for i in axes], "ends": ends, "axes": axes, "steps": [1] * len(axes)},
        )
        if not any(pads):
            return
        x = cropped
    ctx.add("pad", [x], [out], attrs={"pads": pads, "mode": "constant"})


@importer("Resize", "Upsample", "Tile", "Expand", "DepthToSpace", "SpaceToDepth")
def import_select(node, ctx):
    if node.op_type in ("Resize", "Upsample"):
        mode = ctx.attr("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode in ("linear", "bilinear", "cubic"):  # a fixed linear map: onnxlip/ops/interpolate.py
            from .interpolate import import_interpolation

            import_interpolation(node, ctx, mode)
            return
        if mode != "nearest":
            _fail(f"{node.op_type} in {mode!r} mode is not supported (nearest, linear and cubic are)")
    require_constant_inputs(node, ctx)
    if node.op_type in ("DepthToSpace", "SpaceToDepth"):
        _check_blocks(node, ctx)
    if node.op_type == "DepthToSpace":
        mode = ctx.attr("mode", b"DCR")
        mode = mode.decode(errors="replace") if isinstance(mode, bytes) else mode
        if mode not in ("DCR", "CRD"):
            _fail(f"its mode {mode!r} is neither DCR nor CRD")
    consts = None
    if node.op_type == "Resize" and ctx.attr("axes") is not None:  # (the reference evaluator fails on axes < 0)
        from .interpolate import without_axes

        consts = {n: np.asarray(ctx.const(n)) for n in node.input[1:] if n}
        node, consts = without_axes(node, consts, tuple(ctx.shape(node.input[0])), list(ctx.attr("axes")))
    ctx.add("select", [node.input[0]], attrs={"index": _index_map(node, ctx, consts)})


def _check_blocks(node, ctx) -> None:
    """DepthToSpace needs channels divisible by blocksize**2, SpaceToDepth height and width by blocksize."""
    shape, b = ctx.shape(node.input[0]), int(ctx.attr("blocksize", 0))
    if len(shape) != 4 or b < 1:
        _fail(f"it needs a 4-D input and a positive blocksize (input {tuple(shape)}, blocksize {b})")
    if node.op_type == "DepthToSpace" and shape[1] % (b * b):
        _fail(f"its input's {shape[1]} channels are not divisible by blocksize**2 = {b * b}")
    if node.op_type == "SpaceToDepth" and (shape[2] % b or shape[3] % b):
        _fail(f"its input's height and width {tuple(shape[2:])} are not divisible by its blocksize {b}")


def _check_reflect(node, ctx) -> None:
    """Reflect pads at most the axis length - 1 on each side, as onnxruntime requires (numpy reflects again)."""
    shape = ctx.shape(node.input[0])
    rank = len(shape)
    pads = list(ctx.attr("pads")) if ctx.opset < 11 else _ints_input(ctx, node, 1, "pads")
    axes = list(range(rank)) if ctx.opset < 18 else _ints_input(ctx, node, 3, "axes", list(range(rank)))
    if pads is None or len(pads) != 2 * len(axes):
        return  # (shape inference has already refused it)
    for i, a in enumerate(axes_in_range(axes, rank)):
        if max(pads[i], pads[len(axes) + i]) > shape[a] - 1:
            _fail(f"its reflect pads {pads} exceed its input's axis {a} of size {shape[a]} (at most {shape[a] - 1})")


def require_constant_inputs(node, ctx) -> None:
    """Every input but the data (pads, scales, sizes, ...) must be a constant of the model."""
    for name in node.input[1:]:
        if name and not ctx.is_const(name):
            _fail(f"its input {name!r} is computed at run time; it must be constant")


def _index_map(node, ctx, consts: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Apply the real op (with its constant inputs, or `consts` in their place) to a tensor holding each entry's
    flat index: the output says where it copies from. onnxruntime runs it on int32 indices where it can: the
    ONNX reference evaluator disagrees with onnxruntime (and torch) on some Resize coordinate modes (align_corners
    and pytorch_half_pixel at non-integer output lengths); otherwise the reference evaluator, in float64."""
    shape = ctx.shape(node.input[0])
    consts = consts if consts is not None else {n: np.asarray(ctx.const(n)) for n in node.input[1:] if n}
    size, out_size = math.prod(shape), math.prod(ctx.shape(node.output[0]))
    if max(size, out_size) > _MAX_MAP:  # the probe holds several arrays of this many entries (an Expand to
        _fail(  # 40000 x 40000 took 24 GB before it was killed)
            f"its {'output' if out_size >= size else 'input'} has {max(size, out_size):,} entries, more than onnxlip "
            f"maps ({_MAX_MAP:,})"
        )

    def probe(offset: int) -> np.ndarray:
        index = None
        if size + offset < 2**31:
            index = run_onnxruntime(
                node, ctx.opset, np.arange(offset, size + offset, dtype=np.int32).reshape(shape), consts
            )
        if index is None:
            x = np.arange(offset, size + offset, dtype=np.float64).reshape(shape)
            index = run_reference(node, ctx.opset, x, consts)
        if index.shape != tuple(ctx.shape(node.output[0])) or not np.all(index == np.round(index)):
            _fail("could not derive its index map")
        return index.astype(np.int64)

    index = probe(0)
    # every output entry must copy an input entry: a constant filled in (Resize's extrapolation_value in
    # tf_crop_and_resize mode) reads as an index, and does not move with the input
    if np.any(index < 0) or np.any(index >= size) or not np.array_equal(probe(size), index + size):
        _fail("some of its outputs are not copies of input entries (a constant is filled in); not supported")
    return index


# ---- adjoint rules: the transpose of a copy map scatters back (theory.md section 4) -------------------------
def _in_shape(node, em):
    return tuple(em.shapes[node.inputs[0]])


def _reshape_adjoint(node, em, a, b):
    return [Scaled(em.op("Reshape", [b[0].m, em.i64(_in_shape(node, em))], "unreshape"), b[0].e)]


def _transpose_adjoint(node, em, a, b):
    inverse = list(np.argsort(node.attrs["perm"]))
    return [Scaled(em.op("Transpose", [b[0].m], "untranspose", perm=[int(i) for i in inverse]), b[0].e)]


def _pad_adjoint(node, em, a, b):
    shape = _in_shape(node, em)
    n = len(shape)
    starts = node.attrs["pads"][:n]
    ends = [starts[i] + shape[i] for i in range(n)]
    return [Scaled(em.op("Slice", [b[0].m, em.i64(starts), em.i64(ends), em.i64(range(n))], "unpad"), b[0].e)]


def _split_adjoint(node, em, a, b):
    top, mults = em.align([x.e for x in b])
    parts = [em.mul(x.m, c) for x, c in zip(b, mults)]
    return [Scaled(em.op("Concat", parts, "unsplit", axis=node.attrs["axis"]), top)]


def _copy_map(node, em) -> np.ndarray:
    """For each output entry, the flat index of the input entry it copies (slice, gather, select)."""
    shape = _in_shape(node, em)
    iota = np.arange(int(np.prod(shape))).reshape(shape)
    if node.op == "select":
        return node.attrs["index"]
    if node.op == "gather":
        return np.take(iota, node.attrs["indices"], axis=node.attrs["axis"])
    return sliced(iota, node.attrs)


def sliced(m: np.ndarray, attrs: dict) -> np.ndarray:
    """m[...] as the IR's slice (attrs starts, ends, axes, steps) reads it, negative steps included."""
    index = [np.arange(n) for n in m.shape]
    for start, end, axis, step in zip(attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"]):
        # an index list, not a slice: slice.indices gives stop = -1 for a reversal to the front (torch's flip),
        # which as a slice again would read from the back
        index[axis] = np.arange(*slice(start, end, step).indices(m.shape[axis]))
    return m[np.ix_(*index)]


def _scatter_adjoint(node, em, a, b):
    from ..adjoint import scatter_add

    return [Scaled(scatter_add(em, b[0].m, _copy_map(node, em), _in_shape(node, em)), b[0].e)]


define_adjoint("reshape", _reshape_adjoint)
define_adjoint("transpose", _transpose_adjoint)
define_adjoint("pad", _pad_adjoint)
define_adjoint("split", _split_adjoint)
define_adjoint("slice", _scatter_adjoint)
define_adjoint("gather", _scatter_adjoint)
define_adjoint("select", _scatter_adjoint)


# ---- AutoLip rules: a copy map's l2 norm is sqrt(the largest number of copies of one entry) -------------------
def _copy_lipschitz(node, shapes, l_in, norm):
    return [l_in[0]] * len(node.outputs)


def _duplicating_lipschitz(node, shapes, l_in, norm):
    index = node.attrs["index"] if node.op == "select" else np.asarray(node.attrs["indices"])
    copies = int(np.bincount(index.ravel() % max(1, int(np.prod(shapes[node.inputs[0]])))).max()) if index.size else 1
    if node.op == "gather":  # copies along one axis of the gathered rows
        copies = int(np.bincount(index.ravel() % shapes[node.inputs[0]][node.attrs["axis"]]).max())
    return [float(np.sqrt(copies)) * l_in[0]]


for _op in ("reshape", "transpose", "slice", "pad", "split"):
    define_lipschitz(_op, _copy_lipschitz)
define_lipschitz("gather", _duplicating_lipschitz)
define_lipschitz("select", _duplicating_lipschitz)
