"""The numeric traps of theory.md sections 2-3: depth (no overflow at 1000 layers), cancellation (a single
pruned weight in a deep, huge-norm network), and tiny metrics next to huge norms."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.errors import UnderflowError
from tests import oracle
from tests.helpers import chain_forward_backward, chain_log10_pathnorm, gemm_chain, make_model
from tests.test_bad_input import cli


def _deep_chain(depth: int, width: int, seed: int, low=0.5, high=3.0):
    rng = np.random.default_rng(seed)
    signs = lambda shape: rng.choice([-1.0, 1.0], size=shape)  # noqa: E731
    ws = [rng.uniform(low, high, size=(width, width)) * signs((width, width)) for _ in range(depth)]
    bs = [rng.uniform(0.1, 1.0, size=width) * signs(width) for _ in range(depth)]
    return ws, bs


@pytest.mark.parametrize("q", [1.0, 2.0])
def test_thousand_layers_log10_pathnorm(q):
    ws, bs = _deep_chain(1000, 4, seed=1)
    expected = chain_log10_pathnorm(ws, bs, q) / q
    assert expected > 400 * q / q  # far beyond float64's range: 10^expected overflows
    r = onnxlip.path_norm(gemm_chain(ws, bs), q=q)
    assert r.path_norm is None  # does not fit a float64, reported as log10 only
    assert r.log10_path_norm == pytest.approx(expected, rel=1e-9, abs=1e-6)


def test_thousand_layers_shrinking_does_not_underflow():
    ws, bs = _deep_chain(1000, 4, seed=2, low=0.01, high=0.05)
    bs = [b * 1e-3 for b in bs]
    expected = chain_log10_pathnorm(ws, bs)
    r = onnxlip.path_norm(gemm_chain(ws, bs))
    assert r.log10_path_norm == pytest.approx(expected, abs=1e-6)


def test_thousand_layers_shrinking_with_zero_biases():
    """Zero biases carry no scale of their own (mantissas.ZERO_EXPONENT): with activations shrinking to 1e-900,
    a zero bias given an ordinary exponent won every alignment and flushed the activations to 0 (log10 -inf)."""
    ws, bs = _deep_chain(1000, 4, seed=3, low=0.01, high=0.05)
    bs = [np.zeros_like(b) for b in bs]
    expected = chain_log10_pathnorm(ws, bs)
    assert expected < -400  # far below float64's range too
    r = onnxlip.path_norm(gemm_chain(ws, bs))
    assert r.log10_path_norm == pytest.approx(expected, abs=1e-6)
    m = onnxlip.path_metric(gemm_chain(ws, bs), gemm_chain([w * (1 - 1e-3) for w in ws], bs))
    assert m.exact and math.isfinite(m.log10_path_metric)


def test_tiny_difference_survives_unchanged_layers():
    """One pruned weight whose path mass is ~2**-130 of every later layer's activations. The unchanged layers'
    zero deltas used to set the difference stream's scale and flush it to 0 (a metric, and bound, of 0)."""
    rng = np.random.default_rng(7)
    ws = [rng.uniform(0.5, 1.0, size=(4, 4)) for _ in range(8)]
    bs = [rng.uniform(0.1, 1.0, size=4) for _ in range(8)]
    ws[0][:, 0] = 2.0**-80  # neuron 0 of the first layer carries ~2**-80 of its layer's mass
    bs[0][0] = 0.0
    ws[1][0, 0] = 1.0  # the largest weight of its tensor, fed by that neuron: pruned below
    ws[2][0, :] = 2.0**-50  # and its difference reaches the next layers ~2**-50 weaker still
    pruned = [w.copy() for w in ws]
    pruned[1][0, 0] = 0.0
    acts, grads = chain_forward_backward(ws, bs)
    expected = acts[1][0] * grads[2][0]  # |w| a_u g_v with |w| = 1
    m = onnxlip.path_metric(gemm_chain(ws, bs), gemm_chain(pruned, bs))
    assert m.exact
    assert m.log10_path_metric == pytest.approx(math.log10(expected), abs=5e-7)
    assert m.log10_path_metric < onnxlip.path_norm(gemm_chain(ws, bs)).log10_path_norm - 38  # 2**-126 ~ 1e-38


def test_products_below_float32s_range_are_refused(tmp_path):
    """Weights and path masses far below their tensors' largest meet in products below float32's range, where the
    path mass through them is lost. range_guard sees it: an error or a certified upper bound, never the undercount
    of before (a metric of 0, a path-norm half the truth)."""
    rng = np.random.default_rng(1)
    ws = [rng.uniform(0.5, 1.0, size=(4, 4)) for _ in range(6)]
    bs = [np.zeros(4) for _ in range(6)]
    ws[0][:, 0] = 1e-25  # a neuron carrying 1e-25 of its layer's path mass
    ws[1][0, 0] = 1e-25  # read through a weight 1e-25 of its tensor's largest: products ~1e-50 of the scale
    pruned = [w.copy() for w in ws]
    pruned[1][0, 0] = 0.0
    # was: log10 metric -inf, a bound of 0; then an UnderflowError; now raised tiny entries give a certified
    # upper bound (loose: the metric is carried by the tiny entries alone), not called exact
    m = onnxlip.path_metric(gemm_chain(ws, bs), gemm_chain(pruned, bs))
    truth = oracle.path_metric(gemm_chain(ws, bs), gemm_chain(pruned, bs))
    assert math.log10(truth) <= m.log10_path_metric and not m.exact and "loose" in m.notes[0]
    # two paths of mass 2**-200 each; the second runs through activations 2**-200 of their tensor's largest
    t = 2.0**-100
    ws = [np.array([[1.0, t]]), np.diag([1.0, t]), np.diag([t, 1.0]), np.diag([t, 1.0])]
    model = gemm_chain(ws, [np.zeros(2)] * 4)
    with pytest.raises(UnderflowError):  # was: log10 -60.206, half the truth (-59.905)
        onnxlip.path_norm(model)
    path = tmp_path / "spread.onnx"
    onnx.save(model, str(path))
    code, out, err = cli("pathnorm", path, "--json")
    assert code == 2 and "float32's range" in json.loads(out)["error"] and "Traceback" not in err
    # the same weights a little less extreme: every product stays in range, and the value is exact
    t = 2.0**-40
    ws = [np.array([[1.0, t]]), np.diag([1.0, t]), np.diag([t, 1.0]), np.diag([t, 1.0])]
    assert onnxlip.path_norm(gemm_chain(ws, [np.zeros(2)] * 4)).log10_path_norm == pytest.approx(
        math.log10(2 * t**2), abs=1e-9
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_pruned_weight_in_deep_network_is_exact(seed):
    """One weight zeroed in a 60-layer network with a ~1e65 path-norm: the metric must equal the exact path
    mass through that weight (|w| a_u g_v, theory.md section 4) to 1e-6, though it is ~1e-30 of the norm."""
    rng = np.random.default_rng(seed)
    ws, bs = _deep_chain(60, 6, seed=seed + 10, low=1.0, high=3.0)
    layer = int(rng.integers(0, 60))
    i, j = int(rng.integers(0, 6)), int(rng.integers(0, 6))
    ws[layer][i, j] = 1e-30 * np.sign(ws[layer][i, j])  # a weight that barely matters
    pruned = [w.copy() for w in ws]
    pruned[layer][i, j] = 0.0
    acts, grads = chain_forward_backward(ws, bs)
    w_ij = abs(float(np.float32(ws[layer][i, j])))
    expected = w_ij * acts[layer][i] * grads[layer + 1][j]
    norm = onnxlip.path_norm(gemm_chain(ws, bs))
    assert norm.log10_path_norm > 60
    m = onnxlip.path_metric(gemm_chain(ws, bs), gemm_chain(pruned, bs))
    assert m.exact and m.sign_flips == 0
    assert m.log10_path_metric == pytest.approx(math.log10(expected), abs=5e-7)
    assert m.log10_path_metric < norm.log10_path_norm - 25  # far below float64 cancellation (1e-16)


def test_metric_of_identical_models_is_zero():
    ws, bs = _deep_chain(5, 4, seed=3)
    m = onnxlip.path_metric(gemm_chain(ws, bs), gemm_chain(ws, bs))
    assert m.path_metric == 0.0 and m.log10_path_metric == -math.inf and m.exact


def test_bias_only_change_is_exact():
    ws, bs = _deep_chain(8, 5, seed=4)
    changed = [b.copy() for b in bs]
    changed[7][2] = 0.0  # last layer bias: metric is exactly |b|
    m = onnxlip.path_metric(gemm_chain(ws, bs), gemm_chain(ws, changed))
    assert m.exact
    assert m.path_metric == pytest.approx(abs(float(np.float32(bs[7][2]))), rel=1e-7)


def test_sign_flip_bound_uses_midpoint_split():
    ws, bs = _deep_chain(3, 3, seed=5)
    flipped = [w.copy() for w in ws]
    flipped[1][0, 0] *= -1
    a, b = gemm_chain(ws, bs), gemm_chain(flipped, bs)
    m = onnxlip.path_metric(a, b)
    assert m.sign_flips == 1 and not m.exact
    # the split bound equals 2 * (path mass through the flipped weight): M(a, mid) + M(mid, b), both exact
    acts, grads = chain_forward_backward(ws, bs)
    through = abs(float(np.float32(ws[1][0, 0]))) * acts[1][0] * grads[2][0]
    assert m.path_metric == pytest.approx(2 * through, rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_rounding_margin_covers_the_float64_truth(seed):
    """The certified bound must dominate max(R,1) times the EXACT metric (float64 reference), and the
    computed metric must lie within the a-priori rounding margin of it."""
    rng = np.random.default_rng(seed)
    width = [8, 64, 256][seed % 3]
    ws, bs = _deep_chain(12, width, seed=seed + 20, low=0.0, high=1.0)
    pruned = [np.where(rng.random(w.shape) < 0.5, 0.0, w) for w in ws]
    acts_full = chain_log10_pathnorm(ws, bs)
    acts_pruned = chain_log10_pathnorm(pruned, bs)
    exact = 10**acts_full - 10**acts_pruned  # dominated pair: metric = difference of norms (fits float64 here)
    r = onnxlip.bound(gemm_chain(ws, bs), gemm_chain(pruned, bs), input_bound=2.0, samples=0)
    assert r.exact and r.rounding_margin > 0
    assert abs(r.path_metric - exact) <= r.rounding_margin * exact
    assert r.bound >= 2.0 * exact
    assert r.bound <= 2.0 * exact * (1 + 3 * r.rounding_margin)


def test_large_q_path_norm_is_exact_or_refused():
    """For q > 1 a tensor's |w|^q can span more than float32's range: entries below 2**-126 of the largest are
    lost. Where the paths through them do not matter the result stands; where they do, a clear error (not the
    silent -inf or underestimate of before)."""
    ws = [np.array([[1.0, 0.0], [0.0, 0.5]]), np.array([[0.01], [1.0]])]
    bs = [np.zeros(2), np.zeros(1)]
    # the largest path, 0.5 * 1, runs through W1's weak 0.5 (0.5**200 = 2**-200 of W1's largest, 1**200)
    with pytest.raises(onnxlip.OnnxlipError, match="too large"):
        onnxlip.path_norm(gemm_chain(ws, bs), q=200)
    # at q = 100 only 0.01**100 is lost, and its path (1 * 0.01) is negligible next to 0.5 * 1
    r = onnxlip.path_norm(gemm_chain(ws, bs), q=100)
    assert r.log10_path_norm == pytest.approx(math.log10(0.5**100 + 0.01**100) / 100, abs=1e-9)
    code, out, _ = cli("pathnorm", "models/digits_cnn.onnx", "--q", "10000", "--json")
    assert code == 2 and "too large" in json.loads(out)["error"]


def test_check_warns_about_weights_beyond_float32s_range_within_a_tensor():
    ws = [np.array([[1.0, 0.0], [0.0, 1e-40]], dtype=np.float32), np.ones((2, 1))]  # 1e-40: a float32 subnormal
    r = onnxlip.check(gemm_chain(ws, [np.zeros(2), np.zeros(1)]))
    assert r.supported and any("W0: 1 non-zero entry is below 2^-126" in w for w in r.warnings)
    assert not onnxlip.check("models/digits_cnn.onnx").warnings


def test_check_counts_weak_weights_block_by_block():
    """The check reads a weight in blocks (a whole |W| and its nonzero copy held 3.3x a 404 MB model): weak entries
    in several blocks are all counted, and the largest may lie in a later block than they do."""
    w0 = np.full((700, 700), 1e-30, dtype=np.float32)  # ~490k entries: several blocks
    w0[3, 5] = w0[400, 2] = w0[650, 699] = 1e-42  # float32 subnormals, < 2^-126 of the largest
    w0[699, 699] = 1e10
    w0[10, 10] = 0.0
    ws = [w0, np.ones((700, 1), np.float32)]
    r = onnxlip.check(gemm_chain(ws, [np.zeros(700), np.zeros(1)]))
    # 1e-30 is below 2^-126 * 1e10 = 1.2e-28 too: every nonzero entry but the largest
    assert r.supported and any(f"W0: {700 * 700 - 2} non-zero entries are below 2^-126" in w for w in r.warnings)


def test_certified_log10_values_cover_the_host_rounding():
    """log10 of a companion result is formed in float64 (the sum, its log10, the exponent times log10(2)). At the
    exponents of deep networks (here up to 2**20000) one ulp of headroom is not enough: certified log10 values
    are raised by 1e-12 of their size (api.log10_rounded_up). Oracle: 60-digit decimal arithmetic."""
    from decimal import Decimal, localcontext

    from onnxlip.api import log10_rounded_up
    from onnxlip.companion import log10_total

    rng = np.random.default_rng(1)
    one_ulp_short = 0
    with localcontext() as ctx:
        ctx.prec = 60
        log10_2 = Decimal(2).log10()
        for _ in range(3000):
            m, e = rng.random(5).astype(np.float32), int(rng.integers(-20000, 20000))
            exact = sum(Decimal(float(x)) for x in m).log10() + e * log10_2
            got = log10_total([(m, float(e))])
            one_ulp_short += Decimal(math.nextafter(got, math.inf)) < exact
            assert exact <= Decimal(log10_rounded_up(got)) <= exact + (abs(exact) + 1) * Decimal(1e-11)
    assert one_ulp_short > 0  # what a single ulp of headroom gave: below the exact value


@pytest.mark.parametrize(
    "op,attrs,q,terms",
    [
        ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, 600.0, [0.2 * 1.5, 0.2 * 1.5, 0.5, 0.5]),
        ("HardSigmoid", {"alpha": 5.0, "beta": 0.5}, 600.0, [5.0 * 1.5, 5.0 * 1.5, 0.5, 0.5]),
        ("LeakyRelu", {"alpha": 1e6}, 60.0, [(1e6 - 1) * 1.5, 1.5]),
        ("LeakyRelu", {"alpha": 0.5}, 2000.0, [0.5 * 1.5, 0.5 * 1.5]),
        ("Abs", {}, 2000.0, [1.5, 1.5]),
    ],
)
def test_fixed_fragment_gains_at_large_q(op, attrs, q, terms):
    """A fragment's fixed edges enter as |c|**q: formed in float64 they left its range at large q (HardSigmoid at
    q = 600 gave a path-norm of 0, a slope of 1e6 at q = 60 an OverflowError). x -> 1.5 x -> op: the paths are
    the fragment's edges times 1.5 (HardSigmoid's two ReLU neurons each carry alpha), and its bias paths."""
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node(op, ["h"], ["y"], **attrs)]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(np.array([[1.5]], np.float32), "w")],
    )
    logs = [q * math.log10(t) for t in terms]
    top = max(logs)
    want = (top + math.log10(math.fsum(10 ** (v - top) for v in logs))) / q
    assert onnxlip.path_norm(model, q=q).log10_path_norm == pytest.approx(want, abs=1e-6)
