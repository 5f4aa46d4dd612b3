"""Canonical neuron scaling, and the path-metric between two models compared in it.

The path-lifting Phi(theta), and with it the path-norm and the path-metric, is invariant under neuron-wise
rescaling (theory.md section 3: multiply a ReLU neuron's incoming weights and bias by lam > 0 and divide its
outgoing weights by lam), but the hi/lo upper bound ||Phi(hi)||_1 - ||Phi(lo)||_1 used for pairs where neither
model dominates the other is not: a model and a rescaled copy of it, whose true metric is 0, can get a bound of
1e8. `canonical` therefore brings every neuron that onnxlip/rescale.py can rescale exactly to one scale: layer by
layer in node order, lam_c = 1 / f_c, where f_c is the largest |entry| of channel c over every tensor the incoming
step multiplies (its weight rows or channels and its bias, or a BatchNorm's gamma and beta), read after the
earlier layers' outgoing divisions (a channel with f_c = 0 keeps lam = 1). f is positively homogeneous of degree 1
in exactly the entries the rescaling multiplies, and the earlier layers' divisions are exactly what their own
canonical scaling undoes: if b is a rescaled by mu at some neurons, then by induction over the layers the
incoming tensors of a layer of b are those of a times mu_c when its turn comes, so f^b_c = mu_c f^a_c, and both
are scaled to incoming / f^a_c. A model and any rescaled copy of it thus have the same canonical form up to float
rounding, and since the canonical models have the same Phi as the originals (theory.md section 3), the hi/lo bound
computed between the canonical models bounds the path-metric between the originals (it is an upper bound for any
parameterisation of a same-sign pair, and the canonical scaling keeps every sign).

The canonical weights are rounded to the model's float type, so Phi(canonical(a)) equals Phi(a) only up to a
relative error per path: each changed entry is rounded at most twice (once as a layer's incoming, once as the next
layer's outgoing weight), so a path through R rescaled layers carries at most 2R roundings, each a relative error
of at most u (the unit roundoff, plus the float64 slack of the factors). A BatchNorm's folded bias
beta - a * mean (+ a * b of a biased layer before it) is a sum of rounded terms: its relative error is at most
kappa * u with kappa = (|beta| + |a mean| + |a b|) / |c|. Hence |Phi(can) - Phi(a)|_1 <= ((1 + kappa u)**(2R) - 1)
||Phi(a)||_1, and canonical_metric adds that allowance for both models to the metric it reports."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxlipError
from .loading import ModelLike, load_model
from .rescale import rescale_layers

# canonical factors of two models that differ by no more than this anywhere: not rescaled relative to each other
FACTOR_TOLERANCE = 2.0
# the canonical models' log10 path-norms must equal the originals' within this (a guard against rescaling errors)
LOG10_NORM_TOLERANCE = 1e-6
# the path-norms behind the rounding allowance are computed in float32: a safety factor on them
_NORM_SLACK = 1.01


def _canonical_factors(node: onnx.NodeProto, f: np.ndarray) -> np.ndarray:
    lam = np.ones_like(f)
    positive = f > 0
    lam[positive] = 1.0 / f[positive]
    return lam


def canonical(model: ModelLike) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of `model` in canonical neuron scaling: at every ReLU (LeakyReLU, PReLU) neuron onnxlip.rescale can
    rescale exactly, lam_c = 1 / f_c (f_c: channel c's largest incoming |entry|, see the module docstring; 1 where
    f_c = 0). Returns the model and the factors applied, keyed by the output name of each rescaled layer's ReLU
    node. OnnxlipError where the model cannot be rescaled (an entry would overflow or underflow)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(load_model(model))
    _, _, _, factors = rescale_layers(proto, _canonical_factors)
    return proto, factors


def _rescaled_relative_to_each_other(fa: dict[str, np.ndarray], fb: dict[str, np.ndarray]) -> bool:
    if fa.keys() != fb.keys() or any(fa[k].shape != fb[k].shape for k in fa):
        return False
    for k in fa:
        ratio = fa[k] / fb[k]
        if np.any((ratio > FACTOR_TOLERANCE) | (ratio < 1.0 / FACTOR_TOLERANCE)):
            return True
    return False


def _floats(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: a for i in proto.graph.initializer if (a := numpy_helper.to_array(i)).dtype.kind == "f"}


def _attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(onnx.helper.get_attribute_value(a))
    return default


def _bias_amplification(proto: onnx.ModelProto, values: dict[str, np.ndarray], changed: set[str]) -> float:
    """kappa: the largest relative rounding amplification of a BatchNorm's folded bias whose gamma and beta were
    rescaled (1 where there is none; inf where a bias that is a sum of nonzero terms is exactly 0)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    kappa = 1.0
    for bn in proto.graph.node:
        if bn.op_type != "BatchNormalization" or bn.input[1] not in changed or len(bn.input) < 5:
            continue
        gamma, beta, mean, var = (values[t].astype(np.float64) for t in bn.input[1:5])
        a = gamma / np.sqrt(var + _attr_float(bn, "epsilon", 1e-5))
        terms, c = np.abs(beta) + np.abs(a * mean), beta - a * mean
        cases = [(terms, c)]
        src = producer.get(bn.input[0])
        if src is not None and src.op_type in ("Conv", "Gemm") and len(src.input) > 2 and src.input[2] in values:
            b = np.broadcast_to(values[src.input[2]].astype(np.float64).reshape(-1), a.shape)
            cases.append((terms + np.abs(a * b), c + a * b))
        for t, s in cases:
            if np.any((s == 0) & (t > 0)):
                return math.inf
            nz = s != 0
            if np.any(nz):
                kappa = max(kappa, float(np.max(t[nz] / np.abs(s[nz]))))
    return kappa


def _log10_allowance(original: onnx.ModelProto, can: onnx.ModelProto, rescaled_layers: int, log10_norm: float):
    """log10 of a bound on ||Phi(can) - Phi(original)||_1 from the float rounding of the canonical weights (the
    module docstring); None where it cannot be bounded (a changed entry rounded to a subnormal, a cancelling
    BatchNorm bias)."""
    before, after = _floats(original), _floats(can)
    changed = {n for n in after if n in before and not np.array_equal(after[n], before[n])}
    if not changed or rescaled_layers == 0 or not math.isfinite(log10_norm):
        return -math.inf
    u = 0.0
    for name in changed:
        info = np.finfo(after[name].dtype)
        v = np.abs(after[name])
        if np.any((v > 0) & (v < info.tiny)):  # rounded to a subnormal: no relative error bound
            return None
        u = max(u, float(info.eps) / 2)
    u += 8 * 2.0**-53  # the float64 factors, their reciprocals and products
    kappa = _bias_amplification(original, before, changed)
    if not math.isfinite(kappa):
        return None
    gamma = math.expm1(2 * rescaled_layers * math.log1p(kappa * u))
    return math.log10(gamma) + log10_norm + math.log10(_NORM_SLACK)


def _log10_add(x: float, y: float) -> float:
    hi, lo = max(x, y), min(x, y)
    if hi == -math.inf:
        return hi
    return hi + math.log10(1.0 + 10.0 ** (lo - hi))


def canonical_metric(
    a: ModelLike,
    b: ModelLike,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
):
    """An upper bound on the l1 path-metric between a and b computed in canonical neuron scaling, or None where
    canonicalization cannot help: the models' canonical factors differ by no more than a factor 2 at every neuron
    (they are not rescaled relative to each other), either model cannot be canonicalized or imported, or a check
    fails (the canonical models' path-norms differ from the originals' by more than 1e-6 in log10, or the rounding
    of the canonical weights cannot be bounded).

    Otherwise an onnxlip.api.PathMetricResult: that of metric_between(analyse(canonical(a)),
    analyse(canonical(b))) with the rounding allowance of the canonical weights for both models (the module
    docstring) added to path_metric, so that path_metric / (1 - rounding_margin) bounds the metric between a
    and b. Its `exact` is False, `route` starts with "canonical scaling", and a note gives the allowance."""
    from .api import Analysed, analyse, metric_between, path_norm
    from .companion import plain_value

    def proto_of(m):
        return m.full_proto() if isinstance(m, Analysed) else load_model(m)

    try:
        pa, pb = proto_of(a), proto_of(b)
        can_a, fa = canonical(pa)
        can_b, fb = canonical(pb)
        if not _rescaled_relative_to_each_other(fa, fb):
            return None
        models = [analyse(m, output, input_shapes, keep_proto=False) for m in (pa, pb, can_a, can_b)]
        norms = [path_norm(m, device=device).log10_path_norm for m in models]
        if any(abs(norms[i] - norms[i + 2]) > LOG10_NORM_TOLERANCE for i in (0, 1)):
            return None
        allowances = [
            _log10_allowance(p, c, sum(bool(np.any(lam != 1.0)) for lam in f.values()), n)
            for p, c, f, n in ((pa, can_a, fa, norms[0]), (pb, can_b, fb, norms[1]))
        ]
        if None in allowances:
            return None
        result = metric_between(models[2], models[3], device)
    except OnnxlipError:
        return None
    allowance = _log10_add(*allowances)
    log10 = _log10_add(result.log10_path_metric, allowance)
    note = (
        f"compared in canonical neuron scaling; includes a float rounding allowance of 10^{allowance:.3f} for the "
        "canonical weights"
        if math.isfinite(allowance)
        else "compared in canonical neuron scaling"
    )
    return dataclasses.replace(
        result,
        path_metric=plain_value(log10),
        log10_path_metric=log10,
        exact=False,
        route=f"canonical scaling, {result.route}" if result.route else "canonical scaling",
        notes=[*result.notes, note],
    )


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
        "the models differ by a neuron rescaling, under which the path-lifting is invariant: the metric was "
        f"computed in canonical neuron scaling (compared as given, its certified upper bound was {given})"
    )
    # what changed, and what changed sign, between the models as given (the canonical scaling keeps every sign)
    changed, flips = metric.changed_parameters, metric.sign_flips
    return dataclasses.replace(better, changed_parameters=changed, sign_flips=flips, notes=[note, *better.notes])
