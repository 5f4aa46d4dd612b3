"""Random positive neuron-wise rescaling (theory.md sections 3-4): for a ReLU neuron, multiply its incoming
weights and bias by lambda > 0 and its outgoing weights by 1/lambda. The function, the path-norms, the metrics
and the path-magnitude scores do not change; plain weight magnitudes do. This is the attack that breaks
magnitude pruning. It edits the ONNX file's own initializers (per channel for convolutions) and skips every
neuron where the symmetry would not hold exactly (residual Adds, Concats, shared tensors, ...). Factors under which
floating point cannot hold the rescaled model (weights or activations that overflow, flush to 0 or lose bits as
subnormals) are refused: the weights are checked, and the model is run beside the input model
(onnxlip/rescale_check.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from .args import check_seed, real_arg
from .errors import OnnxlipError, public
from .graph_prep import initial_constants
from .loading import ModelLike, load_model, replaced_tensor
from .rescale_check import check_function
from .results import jsonable
from .writing import refuse_overwrite, write_output

# channel-wise positively homogeneous ops a rescaled activation may pass through on its way to the next layer
_PASS_THROUGH = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Dropout", "Identity"}
_DEFAULT_FACTORS = (1.0, 128.0, 4096.0)
# activations f with f(lam * z) = lam * f(z) for lam > 0 (per channel: a PRelu's slope is one per channel)
_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "Abs"}


@dataclass
class RescaleResult:
    rescaled_neurons: int
    rescaled_layers: int
    skipped_layers: int
    output: str | None
    # inputs on which the rescaled model's outputs were compared with the input model's in onnxruntime (0 where no
    # neuron was rescaled, or where onnxruntime cannot run the input model: `notes` says so, and only the rescaled
    # weights were checked)
    checked_inputs: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return jsonable(asdict(self))


class _Graph:
    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.inits = {i.name: i for i in proto.graph.initializer}
        # decoded as every import decodes them: a corrupt or truncated tensor is an OnnxlipError naming it
        self.values = {n: np.array(v) for n, v in initial_constants(proto.graph, {}).items()}
        self.producer = {o: n for n in proto.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in proto.graph.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
        self.outputs = {o.name for o in proto.graph.output}
        self.ranks = _ranks(proto)
        self.use_count: dict[str, int] = {}
        for n in proto.graph.node:
            for t in n.input:
                if t in self.inits:
                    self.use_count[t] = self.use_count.get(t, 0) + 1

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def private_init(self, name: str) -> bool:
        return name in self.values and self.use_count.get(name, 0) == 1 and self.values[name].dtype.kind == "f"


def _ranks(proto: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor onnx's shape inference can tell (none where it fails: nothing is rescaled then)."""
    from .shapes import shape_keeping_as_identity

    try:
        inferred = onnx.shape_inference.infer_shapes(shape_keeping_as_identity(proto), strict_mode=False)
    except Exception:  # noqa: BLE001 - onnx raises several types; without ranks no channel axis is known
        return {}
    ranks = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def _check_representable(name: str, v: np.ndarray, nonzero: int) -> None:
    """The rescaled tensor `v` holds what exact arithmetic gives, up to rounding: no entry overflowed to Inf, and
    none underflowed to zero (the model would no longer be functionally identical, and its sparsity would change).
    `nonzero`: the tensor's nonzero entries before."""
    if not np.all(np.isfinite(v)):
        raise OnnxlipError(f"rescaling makes entries of {name!r} overflow {v.dtype}; choose factors closer to 1")
    if np.count_nonzero(v) != nonzero:
        raise OnnxlipError(
            f"rescaling makes entries of {name!r} underflow {v.dtype} (the model would not compute the same "
            "function); choose factors closer to 1"
        )


def _check_subnormals(name: str, v: np.ndarray, old: np.ndarray, neuron_max: np.ndarray) -> None:
    """No entry of the rescaled tensor `v` (`old` before) that matters became a subnormal. A subnormal keeps fewer
    bits than the type's precision (a float16 one 10 at most: factors of 4096 put float16 weights off by 2.4%, the
    outputs by 7e-3 relative; the digits CNN's float32 biases rescaled by 1e-38 kept 15-20 of 24 bits), so an
    entry may become one only where it is negligible: below one unit of roundoff u of the largest |entry| of its
    neuron before rescaling (`neuron_max`, broadcastable to v; _neuron_max). Rounding such an entry, even to 0,
    changes the neuron's sum less than rounding its largest entry does: scikit-learn MLPs hold weights of 1e-37
    beside weights of 0.1, and dividing those by 4096 is harmless."""
    info = np.finfo(v.dtype)
    subnormal = (v != 0) & (np.abs(v) < info.tiny) & (v != old)  # (an entry left as it was lost nothing)
    if np.any(subnormal & (np.abs(old.astype(np.float64)) >= info.eps / 2 * neuron_max)):
        raise OnnxlipError(
            f"rescaling makes entries of {name!r} {v.dtype} subnormals, which lose precision (the model would not "
            "compute the same function to its rounding); choose factors closer to 1"
        )


def _attr(node, name: str, default: int):
    """An integer attribute of a node; OnnxlipError naming the node when the file gives it another kind."""
    for a in node.attribute:
        if a.name == name:
            if a.type != onnx.AttributeProto.INT:
                kind = onnx.AttributeProto.AttributeType.Name(a.type).lower()
                where = f"node {node.name or node.op_type!r} ({node.op_type})"
                raise OnnxlipError(f"{where}: its attribute {name!r} is {kind}, not an integer")
            return helper.get_attribute_value(a)
    return default


def _incoming(g: _Graph, z: str):
    """How to multiply the pre-activation z by lam per channel: (the channel count, the tensors to multiply as
    (initializer name, its channel axis) pairs, the channel axis of z); None when z is not produced by a layer
    we can rescale exactly. Convolutions and BatchNorm have their channels on axis 1, Gemm on axis 1 of its 2-D
    output, MatMul on the last axis whatever the rank (a Linear on a (B, T, F) tensor or a 4-D map)."""
    node = g.producer.get(z)
    if node is None or g.sole_consumer(z) is None or z not in g.ranks:
        return None
    out = _incoming_layer(g, node)
    if out is None:
        return None
    n, tensors, axis = out
    return n, tensors, g.ranks[z] - 1 if axis == "last" else axis


def _incoming_layer(g: _Graph, node):
    if node.op_type == "BatchNormalization" and all(g.private_init(t) for t in node.input[1:3]):
        gamma, beta = node.input[1], node.input[2]
        return len(g.values[gamma]), [(gamma, 0), (beta, 0)], 1
    if node.op_type == "Conv" and g.private_init(node.input[1]):
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and not g.private_init(bias):
            return None
        w = node.input[1]
        return g.values[w].shape[0], [(w, 0)] + ([(bias, 0)] if bias else []), 1
    if node.op_type == "Gemm" and g.private_init(node.input[1]) and not int(_attr(node, "transA", 0)):
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and (not g.private_init(bias) or g.values[bias].size not in (1, _out_dim(g, node))):
            return None
        w, axis = node.input[1], 0 if int(_attr(node, "transB", 0)) else 1
        n = g.values[w].shape[axis]
        # one bias per output: (N,) or (1, N); a (M, 1) bias of the same size broadcasts along the batch instead
        if bias is not None and g.values[bias].shape not in ((n,), (1, n)):
            return None
        return n, [(w, axis)] + ([(bias, -1)] if bias else []), 1
    if node.op_type == "Add":  # MatMul(x, W) + c, as Keras/sklearn/MATLAB export dense layers
        x, c = node.input
        if c not in g.values:
            x, c = c, x
        mm = g.producer.get(x)
        if not (
            c in g.values
            and g.private_init(c)
            and mm is not None
            and mm.op_type == "MatMul"
            and g.sole_consumer(x) is not None
            and g.private_init(mm.input[1])
        ):
            return None
        w = mm.input[1]
        n = g.values[w].shape[-1]
        if g.values[w].ndim != 2 or g.values[c].size != n or g.values[c].shape[-1:] != (n,):
            return None
        return n, [(w, 1), (c, -1)], "last"
    if node.op_type == "MatMul" and g.private_init(node.input[1]) and g.values[node.input[1]].ndim == 2:
        w = node.input[1]
        return g.values[w].shape[1], [(w, 1)], "last"
    return None


def _out_dim(g: _Graph, gemm) -> int:
    w = g.values[gemm.input[1]]
    return w.shape[0] if int(_attr(gemm, "transB", 0)) else w.shape[1]


def _outgoing(g: _Graph, r: str, channels: int, axis: int):
    """How to divide the next layer's weights by lam per input channel (channels on `axis` of r), following r
    through channel-wise homogeneous ops: (a function of lam that divides them, (the weight's name, the axis of its
    output neurons)); None when the activation reaches anything else, or a layer that reads another axis as its
    channels."""
    tensor, rank, flat = r, g.ranks.get(r), None
    if rank is None:
        return None
    while True:
        node = g.sole_consumer(tensor)
        if node is None:
            return None
        if node.op_type in _PASS_THROUGH:
            if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
                return None
            if node.op_type not in ("Dropout", "Identity") and (axis != 1 or flat):  # pools: axes 2.. of NC...
                return None
            tensor = node.output[0]
            continue
        if node.op_type == "Flatten" and int(_attr(node, "axis", 1)) == 1 and flat is None:
            # (N, d1, ..., dk) -> (N, d1 * ... * dk): channels on axis 1 own blocks of rows, on the last axis
            # they interleave; elsewhere they are neither
            if axis == 1:
                flat = "blocks"
            elif axis == rank - 1:
                flat = "interleaved"
            else:
                return None
            tensor = node.output[0]
            continue
        break
    if node.input[0] != tensor:
        return None
    if node.op_type == "Conv" and flat is None and axis == 1 and g.private_init(node.input[1]):
        w = node.input[1]
        group = int(_attr(node, "group", 1))
        per_group = g.values[w].shape[1]
        if per_group * group != channels:
            return None

        def divide(lam, w=w, group=group, per_group=per_group):
            out_per_group = g.values[w].shape[0] // group
            factors = np.repeat(lam.reshape(group, per_group), out_per_group, axis=0)  # (C_out, C_in/group)
            g.values[w] = (g.values[w] / factors.reshape(factors.shape + (1,) * (g.values[w].ndim - 2))).astype(
                g.values[w].dtype
            )

        return divide, (w, 0)
    if node.op_type in ("Gemm", "MatMul") and g.private_init(node.input[1]) and g.values[node.input[1]].ndim == 2:
        # Gemm reads axis 1 of a 2-D input, MatMul the last axis: the rescaled one, or a flattened block of it
        if flat is None and axis != rank - 1 or (node.op_type == "Gemm" and flat is None and rank != 2):
            return None
        w = node.input[1]
        trans = node.op_type == "Gemm" and int(_attr(node, "transB", 0))
        if node.op_type == "Gemm" and int(_attr(node, "transA", 0)):
            return None
        rows = g.values[w].shape[1 if trans else 0]
        if not channels or rows % channels:  # (no channels: an empty layer has no neuron to rescale)
            return None
        per_channel = rows // channels
        if per_channel != 1 and flat is None:
            return None

        def divide(lam, w=w, trans=trans, per_channel=per_channel, flat=flat):
            factors = np.tile(lam, per_channel) if flat == "interleaved" else np.repeat(lam, per_channel)
            _mul(g, w, 1.0 / factors, 1 if trans else 0)

        return divide, (w, 0 if trans else 1)
    return None


def _mul(g: _Graph, name: str, factors: np.ndarray, axis: int) -> None:
    arr = g.values[name]
    if arr.size == 1 and arr.ndim <= 1 and factors.size != 1:
        raise OnnxlipError(f"cannot rescale the scalar {name!r} per channel")
    shape = [1] * arr.ndim
    shape[axis] = -1
    g.values[name] = (arr * factors.reshape(shape)).astype(arr.dtype)


def _check_graph(proto: onnx.ModelProto) -> None:
    """What every other command's import refuses, refused here too (rescale reads the file's graph, not the IR):
    a graph with no non-constant input or no output is no network to rescale."""
    inits = {i.name for i in proto.graph.initializer}
    if not any(i.name not in inits for i in proto.graph.input):
        raise OnnxlipError("the model has no non-constant input")
    if not proto.graph.output:
        raise OnnxlipError("the model declares no outputs")


# chooses one layer's factors: (the ReLU node, f) -> lam, one positive factor per channel, where f[c] is the largest
# |entry| of channel c over every tensor the incoming step multiplies (its weight rows / channels and its bias, or
# a BatchNorm's gamma and beta), as they stand when the layer's turn comes (earlier layers' divisions applied)
Chooser = Callable[[onnx.NodeProto, np.ndarray], np.ndarray]


def _channel_max(values: dict[str, np.ndarray], tensors, channels: int) -> np.ndarray:
    """f[c] = max |entry| of channel c over the tensors the incoming step multiplies, in float64."""
    f = np.zeros(channels)
    for name, axis in tensors:
        arr = np.moveaxis(np.abs(values[name].astype(np.float64)), axis, 0).reshape(channels, -1)
        f = np.maximum(f, arr.max(axis=1, initial=0.0))
    return f


def _neuron_max(values: dict[str, np.ndarray], name: str, group) -> np.ndarray:
    """The largest |entry| of the neuron each entry of tensor `name` belongs to, over every tensor of its group
    (tensors, channels): the tensors an incoming step multiplies (a weight's rows or output channels with their
    bias, a BatchNorm's gamma and beta), or, for a weight only divided, its own output neurons."""
    tensors, channels = group
    f = _channel_max(values, tensors, channels)
    ndim = values[name].ndim
    shape = [1] * ndim
    if ndim:
        shape[dict(tensors)[name] % ndim] = channels
    return f.reshape(shape)


def rescale_layers(
    proto: onnx.ModelProto, choose: Chooser, *, check: bool = True
) -> tuple[int, int, int, dict[str, np.ndarray]]:
    """Rescale `proto` in place, ReLU layer by ReLU layer in node order, with the factors `choose` picks, at every
    neuron where the symmetry is exact. Returns (rescaled neurons, rescaled layers, skipped layers, the factors
    applied keyed by the ReLU node's output name). OnnxlipError where an entry would overflow or underflow, or a
    non-negligible one would become subnormal (_check_representable; `check=False`: not checked)."""
    _check_graph(proto)
    g = _Graph(proto)
    nonzero = {n: int(np.count_nonzero(v)) for n, v in g.values.items() if v.dtype.kind == "f"}
    original = dict(g.values)
    neurons = layers = skipped = 0
    applied: dict[str, np.ndarray] = {}
    groups: dict[str, tuple] = {}  # tensor -> its neurons (_neuron_max): the incoming step's group first
    divided: dict[str, tuple] = {}
    for node in list(proto.graph.node):
        if node.op_type not in _HOMOGENEOUS or not node.input or not node.output:
            continue
        inc = _incoming(g, node.input[0])
        out = _outgoing(g, node.output[0], inc[0], inc[2]) if inc is not None else None
        if inc is None or out is None:
            skipped += 1
            continue
        lam = np.asarray(choose(node, _channel_max(g.values, inc[1], inc[0])), dtype=np.float64)
        if lam.shape != (inc[0],) or not np.all(np.isfinite(lam) & (lam > 0)):
            raise OnnxlipError(f"rescaling factors of {node.output[0]!r} must be {inc[0]} positive finite numbers")
        divide, (w, w_axis) = out
        with np.errstate(over="ignore", under="ignore"):  # checked below
            for name, axis in inc[1]:
                _mul(g, name, lam, axis)
            divide(lam)
        groups.update(dict.fromkeys((name for name, _ in inc[1]), (inc[1], inc[0])))
        divided[w] = ([(w, w_axis)], g.values[w].shape[w_axis])
        applied[node.output[0]] = lam
        neurons += int(np.count_nonzero(lam != 1.0))
        layers += 1
    changed = [n for n in nonzero if g.values[n] is not original[n]] if check else []  # (not a Clip's -inf bound)
    for name in changed:
        _check_representable(name, g.values[name], nonzero[name])
    for name in changed:
        group = groups.get(name) or divided[name]
        _check_subnormals(name, g.values[name], original[name], _neuron_max(original, name, group))
    for name, init in g.inits.items():
        if g.values[name] is not original[name]:  # rescaled (an untouched tensor stays as stored)
            init.CopyFrom(replaced_tensor(init, g.values[name]))
    return neurons, layers, skipped, applied


@public
def rescale(
    model: ModelLike, *, seed: int = 0, factors: Sequence[float] = _DEFAULT_FACTORS, out_path: str | Path | None = None
) -> tuple[onnx.ModelProto, RescaleResult]:
    """A functionally identical model with random positive rescaling of every ReLU (LeakyReLU, PReLU) neuron where
    it is exact.
    Each neuron's factor is drawn uniformly from `factors`. Returns the model and a summary. Before anything is
    written, the rescaled model is run in onnxruntime beside the input model (rescale_check): OnnxlipError
    where its outputs are not the input model's to rounding (float overflow or subnormal activations)."""
    if isinstance(factors, np.ndarray) and factors.ndim == 1:  # (np.geomspace(1, 4096, 5) in a notebook)
        factors = factors.tolist()
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or not factors:
        raise OnnxlipError(f"rescaling factors must be a non-empty list of positive finite numbers, got {factors!r}")
    factors = np.asarray([real_arg("a rescaling factor", f) for f in factors], dtype=np.float64)
    if np.any(factors <= 0):
        raise OnnxlipError("rescaling factors must be positive finite numbers")
    check_seed(seed)
    if out_path is not None:
        refuse_overwrite(out_path, [model])
    source = load_model(model)
    proto = onnx.ModelProto()
    proto.CopyFrom(source)
    rng = np.random.default_rng(seed)
    neurons, layers, skipped, applied = rescale_layers(proto, lambda node, f: rng.choice(factors, size=len(f)))
    checked, notes = check_function(source, proto, applied) if neurons else (0, [])
    result = RescaleResult(neurons, layers, skipped, None if out_path is None else str(out_path), checked, notes)
    if out_path is not None:
        write_output(out_path, lambda path: onnx.save(proto, path))
    return proto, result
