"""The metric engine's routes for dominated pairs (onnxlip/engine.py): the cancellation-free difference stream and,
when well conditioned, the subtraction of two companion runs; both must give the exact metric, and the
subtraction's rounding margin must keep the certified bound valid."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import onnxlip
from onnxlip.api import analyse
from onnxlip.engine import MetricEngine
from onnxlip.routes import MAX_CONDITION, ROUTE_DIFFERENCE, ROUTE_SUBTRACTION, subtraction_metric
from onnxlip.structure import align_params
from tests import dag_factory as F
from tests import oracle as O

FAMILIES = [f for f in F.FAMILIES if f not in ("batchnorm_bias",)]  # BN after a biased op can flip bias signs
REL = 1e-6


def _rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-300)


@functools.cache
def _case(family: str, seed: int, share: float):
    """A factory model and a copy with the `share` fraction of every parameter's entries zeroed."""
    spec = F.build(family, seed)
    rng = np.random.default_rng([seed, 5])
    vals = F.params_of(spec.model, spec.params)
    pruned = F._replace_inits(spec.model, {n: np.where(rng.random(v.shape) < share, 0.0, v) for n, v in vals.items()})
    model = O.fold_batchnorm(spec.model) if spec.fold else spec.model
    other = O.fold_batchnorm(pruned) if spec.fold else pruned
    return spec, pruned, O.path_metric(O.expand(model), O.expand(other)), O.path_norm(O.expand(model))


# ---- subtraction_metric: the arithmetic of the well-conditioned route ----------------------------------------------
def test_subtraction_refuses_ill_conditioned_pairs():
    eps = 1e-4
    assert subtraction_metric(0.0, math.log10(0.5), eps) is None  # (1 + 0.5) / 0.5 = 3 > 2
    assert subtraction_metric(0.0, 0.0, eps) is None  # d = 0
    assert subtraction_metric(0.0, 0.1, eps) is None  # b above a: not a dominated pair's numbers
    assert subtraction_metric(-math.inf, -math.inf, eps) is None
    assert subtraction_metric(0.0, math.log10(0.3), eps) is not None  # (1 + 0.3) / 0.7 < 2
    assert MAX_CONDITION == 2.0


def test_subtraction_of_an_emptied_model_is_the_whole_norm():
    log10_d, margin = subtraction_metric(12.5, -math.inf, 1e-3)
    assert log10_d == 12.5 and margin >= 1e-3


@pytest.mark.parametrize("seed", range(200))
def test_subtraction_margin_certifies_the_true_difference(seed):
    """Any true pair within the stated relative error of the computed sums: d_true <= d / (1 - margin)."""
    rng = np.random.default_rng(seed)
    eps = float(10 ** rng.uniform(-7, -2))
    true_a = float(10 ** rng.uniform(-30, 30))
    true_b = true_a * float(rng.uniform(0, 0.33))
    worst_a, worst_b = true_a * (1 - eps), true_b * (1 + eps)  # the computed values that make d smallest
    for sa, sb in ((worst_a, worst_b), (true_a, true_b), (true_a * (1 + eps * rng.uniform(-1, 1)), true_b)):
        out = subtraction_metric(math.log10(sa), math.log10(sb) if sb > 0 else -math.inf, eps)
        if out is None:
            continue
        log10_d, margin = out
        assert margin >= eps
        assert true_a - true_b <= 10**log10_d / (1 - margin) * (1 + 1e-12)
        assert _rel(10**log10_d, sa - sb) <= 1e-12


# ---- routes on real models against the oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_heavy_pruning_is_exact_and_mostly_subtracted(family):
    spec, pruned, want, norm = _case(family, 0, 0.9)
    m = onnxlip.path_metric(spec.model, pruned)
    assert m.exact and m.sign_flips == 0
    assert _rel(m.path_metric, want) <= REL, (m.route, m.path_metric, want)
    if want >= 0.9 * norm:  # kept mass below 10%: the well-conditioned route must be taken
        assert m.route == ROUTE_SUBTRACTION
    assert m.path_metric / (1 - m.rounding_margin) >= want


@pytest.mark.parametrize("family", FAMILIES)
def test_both_routes_agree(family):
    spec, pruned, want, _ = _case(family, 1, 0.8)
    base, other = analyse(spec.model), analyse(pruned)
    engine = MetricEngine(base.graph, "cpu")
    vb = align_params(base.graph, other.graph)
    keep = {n: v != 0 for n, v in vb.items()}
    # kept and moved entries are base mantissas: the base's lam bounds them (range_guard; without one, -inf)
    lo = {n: (np.where(keep[n], m, np.float32(0)), e, engine._lam(n)) for n, (m, e) in engine.base_pairs.items()}
    delta = {n: (np.where(keep[n], np.float32(0), m), e, engine._lam(n)) for n, (m, e) in engine.base_pairs.items()}
    stream, _ = engine._difference(lo, delta)
    sub = engine._subtraction(lo)
    assert _rel(10**stream, want) <= REL
    if sub is not None:
        assert _rel(10 ** sub[0], 10**stream) <= 2 * REL
    # pruning given as masks on the IR parameters is the same computation as comparing parameter values
    via_masks = engine.pruned(keep)
    via_values = engine.metric(vb)
    assert via_masks.route == via_values.route
    assert _rel(10**via_masks.log10_metric, 10**via_values.log10_metric) <= 1e-12
    assert via_masks.changed == via_values.changed


def test_one_pruned_weight_takes_the_difference_stream():
    """theory.md section 3's trap: d = 1e-12 of the norm must not be formed by subtraction."""
    spec = F.build("mixed", 0)
    vals = F.params_of(spec.model, spec.params)
    name = max(vals, key=lambda n: vals[n].size)
    flat = vals[name].reshape(-1).copy()
    i = int(np.argmin(np.where(flat != 0, np.abs(flat), np.inf)))
    flat[i] = 0.0
    other = F._replace_inits(spec.model, {name: flat.reshape(vals[name].shape)})
    want = O.path_metric(O.expand(spec.model), O.expand(other))
    m = onnxlip.path_metric(spec.model, other)
    assert m.route == ROUTE_DIFFERENCE and m.exact
    assert _rel(m.path_metric, want) <= REL


def test_upper_bound_below_two_thirds_skips_the_subtraction():
    spec, pruned, _, _ = _case("gemm", 0, 0.9)
    base = analyse(spec.model)
    engine = MetricEngine(base.graph, "cpu")
    vb = align_params(base.graph, analyse(pruned).graph)
    keep = {n: v != 0 for n, v in vb.items()}
    tried = []
    real = engine._subtraction
    engine._subtraction = lambda lo: tried.append(1) or real(lo)
    assert engine.pruned(keep, upper=0.5).route == ROUTE_DIFFERENCE
    assert not tried  # the subtraction is not even tried


def test_engines_are_freed_without_the_cycle_collector():
    """An engine holds full-size buffers; a reference cycle through it (a lam function closing over the engine did)
    keeps them alive until a garbage collection, and every later call then pays for fresh memory."""
    import gc
    import weakref

    spec, pruned, _, _ = _case("residual", 1, 0.3)
    base, other = analyse(spec.model), analyse(pruned)
    vb = align_params(base.graph, other.graph)
    quantized = {n: np.round(v * 8) / 8 for n, v in vb.items()}
    gc.disable()
    try:
        engine = MetricEngine(base.graph, "cpu")
        for keep_route in (0.0, None):  # the difference stream (base lams, hi feeds) and subtraction
            engine.pruned({n: v != 0 for n, v in vb.items()}, upper=keep_route)
        engine.metric(quantized)  # the hi/lo stream (lams of formed values)
        ref = weakref.ref(engine)
        del engine
        assert ref() is None
    finally:
        gc.enable()


def _far_pair(tmp_path, flips: bool):
    """Two gemm chains far apart: the second's magnitudes shuffled (and, with flips, some signs flipped)."""
    from tests.helpers import gemm_chain

    rng = np.random.default_rng(3)
    ws = [rng.normal(size=(4, 6)), rng.normal(size=(6, 6)), rng.normal(size=(6, 2))]
    bs = [rng.normal(size=6), rng.normal(size=6), rng.normal(size=2)]
    other_ws = [np.sign(w) * rng.permutation(np.abs(w).ravel()).reshape(w.shape) for w in ws]
    if flips:
        other_ws[1][0] *= -1
    a, b = gemm_chain(ws, bs), gemm_chain(other_ws, bs)
    paths = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for m, p in zip((a, b), paths):
        __import__("onnx").save(m, str(p))
    return a, b, paths


@pytest.mark.parametrize("flips", [False, True])
def test_far_apart_models_get_the_triangle_bound_when_it_is_smaller(tmp_path, flips):
    """||Phi(a) - Phi(b)||_1 <= ||Phi(a)||_1 + ||Phi(b)||_1: for models far apart the hi/lo (or sign-split) upper
    bound exceeded it (the digits CNN with shuffled magnitudes: 172593 against 134632)."""
    from onnxlip.routes import ROUTE_TRIANGLE

    a, b, (pa, pb) = _far_pair(tmp_path, flips)
    norms = onnxlip.path_norm(a).path_norm + onnxlip.path_norm(b).path_norm
    truth = O.path_metric(a, b)
    for base in (pa, a):  # the variant-file fast path and the full import
        r = onnxlip.path_metric(base, pb) if base is a else onnxlip.bound(base, pb, samples=64)
        assert not r.exact and r.path_metric <= norms * (1 + 1e-6)  # never above the triangle bound
        if not flips:  # here the hi/lo bound is above it (with a sign flip the split is below: 381 against 481)
            assert r.route == ROUTE_TRIANGLE and r.path_metric == pytest.approx(norms, rel=1e-6)
            assert any("triangle inequality" in n for n in r.notes)
        assert r.path_metric / (1 - r.rounding_margin) >= truth
    r = onnxlip.bound(pa, pb, samples=64)
    assert r.observed_max_l1_diff <= r.bound
    near = onnxlip.path_metric(a, a)  # an upper bound below Phi(a) never pays for the variant's run
    assert near.route != ROUTE_TRIANGLE


def test_the_base_norm_comes_from_the_run_that_gives_the_difference_streams_inputs(monkeypatch):
    """A sweep's first difference stream runs the base's companion for its inputs; that run's certified total is
    the base's norm, so the subtraction route later needs no run of its own for it."""
    import onnxlip.compiled as compiled

    spec, pruned, want, norm = _case("mixed", 2, 0.05)
    base = analyse(spec.model)
    engine = MetricEngine(base.graph, "cpu")
    keep = {n: v != 0 for n, v in align_params(base.graph, analyse(pruned).graph).items()}
    assert engine.pruned(keep).route == ROUTE_DIFFERENCE
    runs = []
    real = compiled.run
    monkeypatch.setattr(compiled, "run", lambda *a, **k: runs.append(1) or real(*a, **k))
    log10_base = engine.log10_base()
    assert not runs
    assert _rel(10**log10_base, norm) <= REL
    assert log10_base == MetricEngine(base.graph, "cpu").log10_base()


def test_pruning_counts_only_the_nonzero_entries_it_removes():
    """Removed entries are counted from the mask where the base has no zero mantissa, from the values elsewhere:
    pruning an entry that is already zero changes nothing."""
    spec = F.build("gemm", 3)
    vals = F.params_of(spec.model, spec.params)
    name = max(vals, key=lambda n: vals[n].size)
    with_zeros = vals[name].copy().reshape(-1)
    with_zeros[::3] = 0.0
    model = F._replace_inits(spec.model, {name: with_zeros.reshape(vals[name].shape)})
    base = analyse(model)
    engine = MetricEngine(base.graph, "cpu")
    rng = np.random.default_rng(0)
    keep = {n: rng.random(v.shape) < 0.7 for n, v in align_params(base.graph, base.graph).items()}
    want = sum(int(np.count_nonzero((v != 0) & ~keep[n])) for n, v in align_params(base.graph, base.graph).items())
    assert engine._nonzero(name) < with_zeros.size  # the case with zeros, beside others without
    assert engine.pruned(keep).changed == want
