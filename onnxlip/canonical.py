"""Canonical neuron scaling, and the path-metric between two models compared in it.

The path-lifting Phi(theta), and with it the path-norm and the path-metric, is invariant under neuron-wise
rescaling (theory.md section 3: multiply a ReLU neuron's incoming weights and bias by lam > 0 and divide its
outgoing weights by lam), but the hi/lo upper bound ||Phi(hi)||_1 - ||Phi(lo)||_1 used for pairs where neither
model dominates the other is not: a model and a rescaled copy of it, whose true metric is 0, got a bound of 1e8.
`canonical` therefore brings every neuron that onnxlip/rescale.py can rescale exactly to one scale: layer by layer
in node order, lam_c = 2**-round(log2 f_c), where f_c is the largest |entry| of channel c over every tensor the
incoming step multiplies (its weight rows or channels and its bias, or a BatchNorm's gamma and beta), read after the
earlier layers' outgoing divisions (a channel with f_c = 0 keeps lam = 1).

Powers of two make the rescaling exact in floating point (checked entry by entry: a subnormal result that lost
bits refuses the canonical route), so Phi(canonical(a)) = Phi(a) exactly, as do the importer's float64 foldings
(a BatchNorm's folded bias beta - a * mean scales by the same power of two), and the metric between the canonical
models IS the metric between the originals: nothing is added for rounding. An earlier version used lam = 1/f_c
with a rounding allowance, which missed the cancellation in folded biases (a MatMul + Add bias of 33000 against a
BatchNorm beta of -33000 made the bound 13x too small). A model and a copy rescaled by powers of two (`rescale`'s
defaults) get identical canonical forms; a copy rescaled by other factors keeps per-neuron mismatches within
2**+-0.5, so its bound shrinks a lot but not to 0. Tensors the analysis reads (`output=` an inner tensor) are
kept: no neuron whose values reach them is rescaled."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import OnnxlipError
from .loading import ModelLike, load_model
from .rescale import rescale_layers

# canonical factors of two models that differ by no more than this anywhere: not rescaled relative to each other
FACTOR_TOLERANCE = 2.0
# the canonical models' log10 path-norms must equal the originals' within this (a guard against rescaling errors)
LOG10_NORM_TOLERANCE = 1e-9


def _canonical_factors(node: onnx.NodeProto, f: np.ndarray) -> np.ndarray:
    lam = np.ones_like(f, dtype=np.float64)
    positive = f > 0
    lam[positive] = np.exp2(-np.round(np.log2(f[positive])))
    return lam


def canonical(model: ModelLike, keep: Sequence[str] = ()) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of `model` in canonical neuron scaling: at every ReLU (LeakyReLU, PReLU) neuron onnxlip.rescale can
    rescale exactly, lam_c = 2**-round(log2 f_c) (f_c: channel c's largest incoming |entry|, see the module
    docstring; 1 where f_c = 0), none of whose values reach the tensors `keep` names. Returns the model and the
    factors applied, keyed by the output name of each rescaled layer's ReLU node. OnnxlipError where the model
    cannot be rescaled, or not exactly (an entry would overflow, underflow, or lose bits as a subnormal)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(load_model(model))
    declared = len(proto.graph.output)
    extra = [t for t in keep if t not in {o.name for o in proto.graph.output}]
    proto.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in extra)  # rescale keeps outputs
    before = _floats(proto)
    _, _, _, factors = rescale_layers(proto, _canonical_factors)
    del proto.graph.output[declared:]
    after = _floats(proto)
    for name, old in before.items():
        new = after[name]
        if new is old or np.array_equal(new, old):
            continue
        o, n = old.astype(np.float64), new.astype(np.float64)
        live = o != 0
        mant, _ = np.frexp(n[live] / o[live])
        if np.any(n[~live] != 0) or np.any(np.abs(mant) != 0.5):  # each entry times an exact power of two
            raise OnnxlipError(f"the canonical scaling of {name!r} is not exact (a subnormal entry lost bits)")
    return proto, factors


def _rescaled_relative_to_each_other(fa: dict[str, np.ndarray], fb: dict[str, np.ndarray]) -> bool:
    """Compared layer by layer in node order, not by name: two exporters name one model's tensors differently."""
    la, lb = list(fa.values()), list(fb.values())
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        return False
    for x, y in zip(la, lb):
        ratio = x / y
        if np.any((ratio > FACTOR_TOLERANCE) | (ratio < 1.0 / FACTOR_TOLERANCE)):
            return True
    return False


def _floats(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: a for i in proto.graph.initializer if (a := numpy_helper.to_array(i)).dtype.kind == "f"}


def canonical_metric(
    a: ModelLike,
    b: ModelLike,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
):
    """The l1 path-metric between a and b (or its certified upper bound) computed in canonical neuron scaling, or
    None where canonicalization cannot help: the models' canonical factors differ by no more than a factor 2 at
    every neuron (they are not rescaled relative to each other), either model cannot be canonicalized exactly or
    imported, or the canonical models' path-norms differ from the originals' (a guard: they are equal exactly).

    Otherwise an onnxlip.api.PathMetricResult: that of metric_between(analyse(canonical(a)),
    analyse(canonical(b))), which is the metric between a and b (Phi is unchanged, exactly), with its `route`
    prefixed by "canonical scaling"."""
    from .api import Analysed, analyse, metric_between, path_norm

    def proto_of(m):
        return m.full_proto() if isinstance(m, Analysed) else load_model(m)

    keep = [output] if isinstance(output, str) else list(output or [])
    try:
        pa, pb = proto_of(a), proto_of(b)
        can_a, fa = canonical(pa, keep)
        can_b, fb = canonical(pb, keep)
        if not _rescaled_relative_to_each_other(fa, fb):
            return None
        models = [analyse(m, output, input_shapes, keep_proto=False) for m in (pa, pb, can_a, can_b)]
        norms = [path_norm(m, device=device).log10_path_norm for m in models]
        if any(abs(norms[i] - norms[i + 2]) > LOG10_NORM_TOLERANCE for i in (0, 1)):
            return None
        result = metric_between(models[2], models[3], device)
    except OnnxlipError:
        return None
    route = f"canonical scaling, {result.route}" if result.route else "canonical scaling"
    return dataclasses.replace(result, route=route)


def rescaled_pairs(pairs) -> bool:
    """Whether two models look rescaled relative to each other: some output channel (axis 0) of a weight tensor has
    its largest |entry| changed by more than 4x, both nonzero. Rounding, noise and pruning do not do that (a channel
    pruned whole is 0); neuron rescaling by large factors, the attack on magnitude pruning, does. A cheap test
    (8 ms for ResNet-18) in front of canonical_metric (0.5 s)."""
    for x, y in pairs:
        if np.ndim(x) < 2 or np.shape(x) != np.shape(y) or not np.size(x):
            continue
        mx, my = (_channel_max(v) for v in (x, y))
        live = (mx > 0) & (my > 0)
        ratio = my[live] / mx[live]
        if ratio.size and (ratio.max() > 4.0 or ratio.min() < 0.25):
            return True
    return False


def _channel_max(v: np.ndarray) -> np.ndarray:
    flat = np.asarray(v).reshape(np.shape(v)[0], -1)
    return np.maximum(flat.max(axis=1), -flat.min(axis=1)).astype(np.float64)


def in_canonical_scaling(a: ModelLike, b: ModelLike, metric, output, input_shapes, device):
    """The metric computed in canonical neuron scaling (onnxlip/canonical.py) where that gives a smaller certified
    bound than `metric` (the hi/lo route is not invariant under rescaling; the path-lifting is), else `metric`."""
    from .api import certified_log10_bound

    better = canonical_metric(a, b, output, input_shapes, device)
    if better is None or certified_log10_bound(better, 1.0) >= certified_log10_bound(metric, 1.0):
        return metric
    log10_given = certified_log10_bound(metric, 1.0)
    given = f"{10**log10_given:.6g}" if log10_given < 300 else f"10^{log10_given:.2f}"
    note = (
        "the models look rescaled neuron by neuron (the path-lifting is invariant under that): the metric was "
        f"computed with both in canonical neuron scaling, which gave a smaller certified bound (compared as given: "
        f"{given})"
    )
    # what changed, and what changed sign, between the models as given (the canonical scaling keeps every sign)
    changed, flips = metric.changed_parameters, metric.sign_flips
    return dataclasses.replace(better, changed_parameters=changed, sign_flips=flips, notes=[note, *better.notes])
