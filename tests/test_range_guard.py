"""range_guard: float32 underflow in the companion is either bounded (and the result certified) or refused, never a
silent undercount; and models with exact zeros, tiny weights or huge spreads that float32 does hold still pass."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.errors import UnderflowError
from onnxlip.lipschitz import pathnorm_bounds
from onnxlip.range_guard import LAM_ZERO, log2_min_nonzero, true_lam
from tests.helpers import chain_log10_pathnorm, gemm_chain, make_model
from tests.test_bad_input import cli


def test_log2_min_nonzero_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.random(200_000, dtype=np.float32)
    a[rng.random(a.size) < 0.5] = 0.0
    a[12345] = np.float32(3e-42)  # a subnormal counts: it is a nonzero entry
    assert log2_min_nonzero(a) == math.log2(float(a[a > 0].min()))
    a[12345] = 0.0
    assert log2_min_nonzero(a.reshape(400, 500)) == math.log2(float(a[a > 0].min()))
    assert log2_min_nonzero(np.zeros((3, 4), np.float32)) == LAM_ZERO
    assert log2_min_nonzero(np.zeros(0, np.float32)) == LAM_ZERO


def _spread_chain(t: float):
    """Two paths of mass t**2 each; the second runs through an activation t**2 of its tensor's largest."""
    ws = [np.array([[1.0, t]]), np.diag([1.0, t]), np.diag([t, 1.0]), np.diag([t, 1.0])]
    return ws, [np.zeros(2)] * 4


def test_lipschitz_bounds_hold_what_float32_can_and_raise_the_rest():
    """2**-100: the paths' products underflow; only raised weights certify a bound, which is then loose and
    says so (tests/test_tiny_weights.py). 2**-40: float32 holds it, exact."""
    notes: list[str] = []
    bounds = pathnorm_bounds(gemm_chain(*_spread_chain(2.0**-100)), notes=notes)
    assert bounds[0].log10 >= math.log10(2 * 2.0**-200) and "loose" in notes[0]
    bounds = pathnorm_bounds(gemm_chain(*_spread_chain(2.0**-40)), notes=notes)
    assert len(notes) == 1
    exact = math.log10(2 * 2.0**-80)  # inf->1: the sum of all input paths, plus the rounding margin
    assert exact <= bounds[0].log10 <= exact + 1e-5


def test_dead_neurons_in_every_layer_are_no_false_alarm():
    """Exact zeros in every activation (a neuron with zero weights and bias per layer): the measured minima are 0,
    so only the propagated bounds certify the run, over 40 layers."""
    rng = np.random.default_rng(3)
    ws = [rng.uniform(0.5, 3.0, size=(6, 6)) for _ in range(40)]
    bs = [rng.uniform(0.1, 1.0, size=6) for _ in range(40)]
    for w, b in zip(ws, bs):
        w[:, 2] = 0.0  # neuron 2 of each layer is dead
        b[2] = 0.0
    model = gemm_chain(ws, bs)
    assert onnxlip.path_norm(model).log10_path_norm == pytest.approx(chain_log10_pathnorm(ws, bs), abs=1e-6)
    pruned = [w.copy() for w in ws]
    pruned[17][3, 4] = 0.0
    m = onnxlip.path_metric(model, gemm_chain(pruned, bs))
    assert m.exact and math.isfinite(m.log10_path_metric)


def test_underflowing_products_that_cannot_matter_are_certified():
    """A weight 2**-125 of its tensor's largest: its products underflow, but every sum they join is dominated by
    normal terms, so the measured minima bound the loss and the path-norm stands, exact."""
    rng = np.random.default_rng(4)
    ws = [rng.uniform(0.5, 1.0, size=(5, 5)) for _ in range(6)]
    bs = [rng.uniform(0.1, 1.0, size=5) for _ in range(6)]
    ws[3][1, 2] = 2.0**-125
    r = onnxlip.path_norm(gemm_chain(ws, bs))
    assert r.log10_path_norm == pytest.approx(chain_log10_pathnorm(ws, bs), abs=1e-7)


def test_metric_of_tiny_but_representable_path_mass_is_exact():
    """A pruned path 1e-30 of the norm whose products all stay in float32's range: certified, and exact."""
    rng = np.random.default_rng(5)
    ws = [rng.uniform(0.5, 1.0, size=(4, 4)) for _ in range(6)]
    bs = [np.zeros(4) for _ in range(6)]
    ws[0][:, 0] = 1e-15
    ws[1][0, 0] = 1e-15
    pruned = [w.copy() for w in ws]
    pruned[1][0, 0] = 0.0
    from tests.helpers import chain_forward_backward

    acts, grads = chain_forward_backward(ws, bs)
    expected = float(np.float32(1e-15)) * acts[1][0] * grads[2][0]
    m = onnxlip.path_metric(gemm_chain(ws, bs), gemm_chain(pruned, bs))
    assert m.exact and m.log10_path_metric == pytest.approx(math.log10(expected), abs=5e-7)


def _conv_chain(ws, bs):
    nodes, inits, x = [], [], "x"
    for i, (w, b) in enumerate(zip(ws, bs)):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"W{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Conv", [x, f"W{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x = f"r{i}"
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ws[0].shape[1], 4, 4])
    return make_model(nodes, [inp], [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)


def _conv_chain_log10(ws, bs) -> float:
    """float64 companion of a 3x3 pad-1 conv chain on the all-ones input, renormalised per layer."""
    a, log_scale = np.ones((ws[0].shape[1], 4, 4)), 0.0
    for w, b in zip(ws, bs):
        w32, b32 = (np.abs(t.astype(np.float32).astype(np.float64)) for t in (w, b))
        padded = np.pad(a, ((0, 0), (1, 1), (1, 1)))
        out = np.zeros((w.shape[0], 4, 4))
        for kh in range(3):
            for kw in range(3):
                out += np.einsum("oc,chw->ohw", w32[:, :, kh, kw], padded[:, kh : kh + 4, kw : kw + 4])
        a = out + (b32 * math.exp(-log_scale))[:, None, None]
        top = a.max()
        a, log_scale = a / top, log_scale + math.log(top)
    return (math.log(a.sum()) + log_scale) / math.log(10)


def test_dead_conv_channels_in_every_layer_are_no_false_alarm():
    """Convolutions whose outputs hold exact zeros in every layer (a channel with zero weights and bias): the
    measured least entries are 0, so each layer measures its least nonzero entry instead, over 30 layers."""
    rng = np.random.default_rng(6)
    ws = [rng.uniform(-1.0, 1.0, size=(4, 4, 3, 3)) * 1e-3 ** rng.random((4, 4, 3, 3)) for _ in range(30)]
    bs = [rng.uniform(0.1, 1.0, size=4) for _ in range(30)]
    for w, b in zip(ws, bs):
        w[1], b[1] = 0.0, 0.0  # output channel 1 is dead in every layer
    r = onnxlip.path_norm(_conv_chain(ws, bs))
    assert r.log10_path_norm == pytest.approx(_conv_chain_log10(ws, bs), abs=1e-6)


def _flushed_weight_chain():
    """W0 = [2**100, 2**-50]: its small entry is 2**-151 of the tensor's largest, a float32 mantissa of 0 once
    formed. The next layers lift that neuron's path to 2**70, far above the other path's 2**-20 (the truth
    2**70 + 2**-20)."""
    ws = [np.array([[2.0**100, 2.0**-50]]), np.diag([2.0**-60, 2.0**60]), np.array([[2.0**-60], [2.0**60]])]
    return ws, [np.zeros(2), np.zeros(2), np.zeros(1)]


def test_weights_below_float32s_range_of_their_own_tensor_are_refused_or_bounded(tmp_path):
    """A weight 2**-151 of its tensor's largest vanishes when the float32 mantissas are formed, and its own least
    entry no longer shows it: the bound of range_guard must come from the true values (true_lam). Before, the
    path-norm came out 1e-6 where the truth is 1e21, certified."""
    ws, bs = _flushed_weight_chain()
    model = gemm_chain(ws, bs)
    with pytest.raises(UnderflowError, match="float32's range"):
        onnxlip.path_norm(model)
    # the metric engine's base lams are true ones too: the lost weight is seen, and since its mantissa tensor may
    # have lost entries to 0 its zeros are raised as well (compiled._raised_run): a certified upper bound, loose
    pruned = [w.copy() for w in ws]
    pruned[2][0, 0] = 0.0
    metric = onnxlip.path_metric(model, gemm_chain(pruned, bs))
    assert metric.path_metric >= 2.0**-20 and not metric.exact and "loose" in metric.notes[0]  # truth: 2**-20
    assert "zeros too" in metric.notes[0]
    # the Lipschitz graphs' constants are raised from their true values: the lost weight counts, loosely
    notes: list[str] = []
    assert pathnorm_bounds(model, notes=notes)[0].log10 >= 70 * math.log10(2) and "loose" in notes[0]
    path, other = tmp_path / "flushed.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, str(path))
    onnx.save(gemm_chain(pruned, bs), str(other))
    code, out, err = cli("bound", path, other, "--json", "--samples", "0")
    assert code == 0 and json.loads(out)["bound"] >= 2.0**-20 and json.loads(out)["exact"] is False
    # a model against itself: no parameter differs, the metric is exactly 0 without any float32 run
    code, out, err = cli("bound", path, path, "--json", "--samples", "0")
    assert code == 0 and json.loads(out)["path_metric"] == 0.0 and json.loads(out)["route"] == "no parameter changed"


def test_weights_below_float32s_range_inside_normal_sums_are_certified():
    """The same lost weight (2**-151 of its tensor's largest) as one term of a normal sum: what it carries is far
    below the rounding margin, range_guard bounds it, and the path-norm is exact."""
    rng = np.random.default_rng(8)
    ws = [np.array([[2.0**100, 1.0, 1.0], [0.0, 2.0**-50, 1.0]])]
    ws += [rng.uniform(0.5, 1.0, size=(3, 3)) for _ in range(2)] + [rng.uniform(0.5, 1.0, size=(3, 1))]
    bs = [np.zeros(3)] * 3 + [np.zeros(1)]
    assert onnxlip.path_norm(gemm_chain(ws, bs)).log10_path_norm == pytest.approx(
        chain_log10_pathnorm(ws, bs), abs=1e-6
    )


def test_true_lam_reads_the_values_not_their_float32_mantissas():
    from onnxlip.mantissas import normalized_power

    v = np.array([2.0**100, -(2.0**-50), 0.0, 3.0])
    m, e = normalized_power(v)
    assert e == 101 and m[1] == 0.0  # flushed
    assert true_lam([v[:2], v[2:]], e) == -151.0
    assert true_lam([np.zeros(3)], e) == LAM_ZERO
    assert true_lam([np.array([0.25, 0.0])], 0, q=2.0) == -4.0


def test_gathered_guard_scalars_give_the_same_verdicts(monkeypatch):
    """On CUDA the guard's scalars come back as one vector (GuardProgram.emit_fetch); the same graphs built that
    way on the CPU give the same values and the same refusals."""
    import importlib

    rng = np.random.default_rng(9)
    ws = [rng.uniform(0.5, 1.0, size=(5, 5)) for _ in range(6)]
    bs = [rng.uniform(0.1, 1.0, size=5) for _ in range(6)]
    ws[3][1, 2] = 2.0**-125  # products below float32's range, dominated: certified by the measured minima
    model = gemm_chain(ws, bs)
    plain = onnxlip.path_norm(model).log10_path_norm
    plain_bounds = [b.log10 for b in pathnorm_bounds(model)]
    for module in ("onnxlip.compiled", "onnxlip.lipschitz"):  # (onnxlip.lipschitz is also a function's name)
        monkeypatch.setattr(importlib.import_module(module), "cuda_possible", lambda device: True)
    assert onnxlip.path_norm(model).log10_path_norm == plain
    assert [b.log10 for b in pathnorm_bounds(model)] == plain_bounds
    with pytest.raises(UnderflowError):
        onnxlip.path_norm(gemm_chain(*_flushed_weight_chain()))
    compounding = [np.array([[1.0, 1.0]])] + [np.diag([1.0, 2.0**-30])] * 6  # (tests/test_tiny_weights.py)
    with pytest.raises(UnderflowError):
        pathnorm_bounds(gemm_chain(compounding, [np.zeros(2)] * 7))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_min_nonzero_abs_matches_numpy(dtype):
    from onnxlip.range_guard import min_nonzero_abs

    rng = np.random.default_rng(2)
    a = (rng.normal(size=(40, 300)) * 10.0 ** rng.integers(-30, 30, size=(40, 300))).astype(dtype)
    a[rng.random(a.shape) < 0.3] = 0.0
    a[3, 7], a[5] = -np.finfo(dtype).smallest_subnormal, -0.0  # a subnormal, and a row of -0.0
    absolute = np.abs(a)
    assert min_nonzero_abs(a) == absolute[absolute > 0].min()
    rows = min_nonzero_abs(a, axis=1)
    assert rows[5] == math.inf and all(rows[i] == absolute[i][absolute[i] > 0].min() for i in range(40) if i != 5)
    assert min_nonzero_abs(np.zeros(7, dtype)) == math.inf


def test_true_lam_of_folded_weights_without_forming_them():
    from onnxlip.ir import Param

    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    base[2] = 0.0
    base[4, 1, 2, 2] = np.float32(1e-40)
    factor = rng.uniform(0.5, 2.0, size=(6, 1, 1, 1)) * 2.0 ** rng.integers(-60, 60, size=(6, 1, 1, 1))
    factor[5] = 0.0
    p = Param("w", None, factors=(base, factor))
    e = p.mantissas()[1]
    formed = base.astype(np.float64) * factor
    assert p.true_lam(e) == math.log2(np.abs(formed[formed != 0]).min()) - e
    assert p.factors is not None  # not formed


def test_products_with_an_all_zero_factor_are_exact_zeros():
    """A product with an all-zero factor (a mantissa whose lam is LAM_ZERO or derives from it, or a multiplier of
    0) is exactly 0, whatever the other factor's lam, even an unknown one (-inf)."""
    from onnxlip.range_guard import _product_lam

    assert _product_lam(2, LAM_ZERO, -math.inf) == LAM_ZERO
    assert _product_lam(1, LAM_ZERO - 1.7, -3.0) == LAM_ZERO  # a zero tensor aligned by 2**-1.7 is still zero
    assert _product_lam(1, -math.inf, -math.inf) == LAM_ZERO  # an unknown mantissa times a zero multiplier
    assert _product_lam(2, -3.0, -math.inf) == -math.inf  # an unknown mantissa: unknown product
    assert _product_lam(2, -3.0, -4.5, -1.0) == -8.5


def test_zeroed_weight_behind_a_copying_pad_is_certified():
    """Regression: the difference stream of one zeroed weight, where an all-zero delta meets an alignment
    multiplier of 0 behind a reflect Pad, was refused as a possible underflow of any amount (exit 2)."""
    from tests import dag_factory as F
    from tests import oracle
    from tests.test_scores import _zeroed

    spec = F.build("layout", 1)
    zeroed = _zeroed(spec.model, "w45", 0)
    m = onnxlip.path_metric(spec.model, zeroed)
    assert m.exact and m.path_metric == pytest.approx(oracle.path_metric(spec.model, zeroed), rel=1e-6)


def test_an_all_zero_sum_is_exactly_zero_downstream():
    """Found by invariant fuzzing: pruning entries whose paths carry no mass (a kernel corner that meets only
    padding) makes the difference stream's first sum all zero, and its exponent the zero exponent; the next layer's
    alignment multiplier 2**(that - E) then looked like an underflowing product, and path_metric, bound and prune
    refused with "any amount", though the oracle's metric is exactly 0. A sum measured all zero in a certified run
    is exactly zero (its own group could not be certified otherwise)."""
    from tests import dag_factory as F
    from tests import oracle as O

    spec = F.build("conv2d", 16)
    w2, w8 = (F.params_of(spec.model, [n])[n] for n in ("w2", "w8"))
    v2, v8 = w2.copy(), w8.copy()
    v2[0, 0, 0, 0] = v8[0, 1, 0, 1] = 0.0
    variant = F._replace_inits(spec.model, {"w2": v2, "w8": v8})
    assert O.path_metric(O.expand(spec.model), O.expand(variant)) == 0.0
    r = onnxlip.path_metric(spec.model, variant)
    assert r.path_metric == 0.0 and r.exact and r.changed_parameters == 2
    assert onnxlip.prune(spec.model, 0.3).sparsity > 0
