"""Tiny weights (sklearn's MLPs keep weights of 1e-40 on dead neurons): where range_guard cannot certify a run,
the tiny entries are raised (compiled.CompiledCompanion._raised_run, lipschitz.pathnorm_bounds). Raising only raises
path masses, so every result stays a certified upper bound, checked here against brute-force path enumeration
(tests/oracle.py) and float64 products; a result is called exact only where the raising changed it by < 1e-7."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

import onnxlip
from onnxlip.errors import UnderflowError
from onnxlip.lipschitz import pathnorm_bounds
from tests import oracle
from tests.helpers import chain_log10_pathnorm, gemm_chain, sklearn_digits_classifier

TINY = 1e-40  # float32 subnormal


def _dead_neuron_chain(seed: int = 0, biases: bool = False):
    """A 6-5-4-3 ReLU chain whose hidden neuron 1 has tiny incoming and outgoing weights (a dead neuron as L2
    regularisation leaves it), with zero biases: its activation is ~1e-40 of its layer's largest."""
    rng = np.random.default_rng(seed)
    ws = [rng.uniform(-1, 1, (6, 5)), rng.uniform(-1, 1, (5, 4)), rng.uniform(-1, 1, (4, 3))]
    ws[0][:, 1] = rng.uniform(-1, 1, 6) * TINY
    ws[1][1, :] = rng.uniform(-1, 1, 4) * TINY
    bs = [rng.uniform(-1, 1, n) if biases else np.zeros(n) for n in (5, 4, 3)]
    return ws, bs


def _flushed(ws):
    """The chain's weights with the tiny entries set to zero (what a flush-to-zero export does)."""
    return [np.where(np.abs(w.astype(np.float32)) < 1e-30, 0.0, w) for w in ws]


def _abs_product(ws) -> np.ndarray:
    """|W_1| |W_2| ... in float64 from the float32 weights: entry (i, j) is the path mass from input i to output j."""
    out = np.eye(ws[0].shape[0])
    for w in ws:
        out = out @ np.abs(w.astype(np.float32).astype(np.float64))
    return out


def test_path_norm_with_dead_neurons_is_exact():
    ws, bs = _dead_neuron_chain()
    r = onnxlip.path_norm(gemm_chain(ws, bs))
    assert r.log10_path_norm == pytest.approx(chain_log10_pathnorm(ws, bs), abs=1e-7)
    assert any("raised" in n and "agrees" in n and "zeros too" not in n for n in r.notes)


def test_lipschitz_bounds_with_dead_neurons_hold_and_are_tight():
    """Refused before (range_guard: 'any amount'); now each bound is above the float64 value by its rounding
    margin only."""
    ws, bs = _dead_neuron_chain()
    notes: list[str] = []
    bounds = {b.norm: b for b in pathnorm_bounds(gemm_chain(ws, bs), notes=notes)}
    paths = _abs_product(ws)
    exact = {
        "inf->1": paths.sum(),
        "inf->inf": paths.sum(axis=0).max(),
        "1->1": paths.sum(axis=1).max(),
    }
    exact["2->2"] = math.sqrt(exact["inf->inf"] * exact["1->1"])
    for norm, value in exact.items():
        assert math.log10(value) <= bounds[norm].log10 <= math.log10(value) + 1e-5, norm
        assert "raised" in bounds[norm].method
    assert len(notes) == 1 and "agrees with the unraised run's" in notes[0]
    result = onnxlip.lipschitz(gemm_chain(ws, bs), "inf", lower_seconds=0.2)
    assert result.upper.log10 == bounds["inf->inf"].log10 and result.notes == notes
    assert result.lower["value"] <= result.upper.value


def test_bound_against_the_flushed_model_is_certified_and_says_it_is_loose():
    """The metric is the mass of the paths through the tiny weights alone (~1e-79): the raised run bounds it,
    loosely, and says so; it is not called exact."""
    ws, bs = _dead_neuron_chain()
    a, b = gemm_chain(ws, bs), gemm_chain(_flushed(ws), bs)
    truth = oracle.path_metric(a, b)
    assert 0 < truth < 1e-70
    r = onnxlip.bound(a, b, samples=16)
    assert r.log10_bound >= math.log10(truth)
    assert not r.exact and r.route == "difference stream"
    assert any("loose" in n for n in r.notes)
    assert r.observed_max_l1_diff is not None and r.observed_max_l1_diff <= r.bound


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_pruning_a_model_with_dead_neurons(sparsity, tmp_path):
    """0.2 removes the tiny weights and a few more: the metric is the mass of the normal ones, exact to 1e-7; the
    pruned file's brute-force metric lies within the certified bound."""
    ws, bs = _dead_neuron_chain()
    model = gemm_chain(ws, bs)
    out = tmp_path / "pruned.onnx"
    r = onnxlip.prune(model, sparsity, criterion="magnitude", out_path=out)
    truth = oracle.path_metric(model, onnx.load(str(out)))
    assert r.exact
    assert math.log10(truth) <= r.log10_bound
    assert r.log10_path_metric == pytest.approx(math.log10(truth), abs=1e-6)


def test_pruning_only_the_tiny_weights_gives_a_certified_loose_bound():
    ws, bs = _dead_neuron_chain()
    model = gemm_chain(ws, bs)
    tiny = sum(int(np.count_nonzero(np.abs(w.astype(np.float32)) < 1e-30)) for w in ws)
    total = sum(w.size for w in ws)
    r = onnxlip.prune(model, tiny / total, criterion="magnitude")
    truth = oracle.path_metric(model, gemm_chain(_flushed(ws), bs))
    assert r.pruned_entries == tiny
    assert math.log10(truth) <= r.log10_bound and not r.exact
    assert any("loose" in n for n in r.notes)


def test_spread_chain_bound_is_certified_but_marked_loose():
    """Two paths of mass 2**-200, carried entirely by tiny weights: raising them gives a valid bound far above
    the truth, and the note says so instead of calling it tight."""
    t = 2.0**-100
    ws = [np.array([[1.0, t]]), np.diag([1.0, t]), np.diag([t, 1.0]), np.diag([t, 1.0])]
    notes: list[str] = []
    bounds = pathnorm_bounds(gemm_chain(ws, [np.zeros(2)] * 4), notes=notes)
    assert bounds[0].log10 >= math.log10(2 * t * t)
    assert len(notes) == 1 and "loose" in notes[0]


def test_what_raising_cannot_hold_is_still_refused():
    """Activation ratios that compound through the layers (1 : 2**-30 per layer, 2**-180 after six) are not tiny
    weights: no floor helps, and the bounds are refused, not guessed."""
    t = 2.0**-30
    ws = [np.array([[1.0, 1.0]])] + [np.diag([1.0, t])] * 6
    with pytest.raises(UnderflowError):
        pathnorm_bounds(gemm_chain(ws, [np.zeros(2)] * 7))


# ---- a real scikit-learn export -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sklearn_dead_neurons(tmp_path_factory):
    """An MLP whose L2 penalty leaves weights of ~1e-40 on dead neurons (as float32 subnormals)."""
    path = tmp_path_factory.mktemp("sklearn") / "dead.onnx"
    clf, path, _ = sklearn_digits_classifier(
        path, {"zipmap": False}, hidden_layer_sizes=(64, 32), alpha=1e-2, max_iter=300, random_state=2
    )
    (softmax,) = [n for n in onnx.load(path).graph.node if n.op_type == "Softmax"]
    return clf, path, softmax.input[0]


def test_sklearn_mlp_with_subnormal_weights(sklearn_dead_neurons):
    clf, path, logits = sklearn_dead_neurons
    weights = np.concatenate([np.abs(w.astype(np.float32)).ravel() for w in clf.coefs_])
    assert np.count_nonzero((weights > 0) & (weights < 1e-37)) > 10  # the case under test
    for norm in ("inf", "1", "2"):
        r = onnxlip.lipschitz(path, norm, output=[logits], lower_seconds=0.2)
        assert r.lower["value"] <= r.upper.value
    paths = _abs_product(clf.coefs_)
    bounds = {b.norm: b for b in pathnorm_bounds(path, output=[logits])}
    for norm, exact in (("inf->inf", paths.sum(axis=0).max()), ("1->1", paths.sum(axis=1).max())):
        # above by the rounding margins only (~1e-5 relative for these fan-ins)
        assert math.log10(exact) <= bounds[norm].log10 <= math.log10(exact) + 1e-4, norm


def _sklearn_params(path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    names = ("", "1", "2")
    return [inits[f"coefficient{k}"] for k in names], [inits[f"intercepts{k}"].reshape(-1) for k in names]


def _dominated_metric(a, b) -> float:
    """Phi(a) - Phi(b) for an MLP b dominated by a (|b| <= |a|, same signs), by the telescoping difference stream
    in float64: every term is non-negative, so there is no cancellation (theory.md section 3)."""
    (wa, ca), (wb, cb) = a, b
    h = np.ones(wa[0].shape[0])  # b's companion values
    d = np.zeros_like(h)
    for la, lb, ba, bb in zip(wa, wb, ca, cb):
        la, lb = (np.abs(x.astype(np.float64)) for x in (la, lb))
        ba, bb = (np.abs(x.astype(np.float64)) for x in (ba, bb))
        d = d @ la + h @ (la - lb) + (ba - bb)
        h = h @ lb + bb
    return float(d.sum())


def test_sklearn_mlp_pruned_and_flushed(sklearn_dead_neurons, tmp_path):
    _, path, logits = sklearn_dead_neurons
    base = _sklearn_params(path)
    for sparsity in (0.05, 0.3):
        out = tmp_path / f"pruned{sparsity}.onnx"
        r = onnxlip.prune(path, sparsity, criterion="magnitude", output=[logits], out_path=out)
        truth = _dominated_metric(base, _sklearn_params(str(out)))
        assert math.log10(truth) <= r.log10_bound, sparsity
        if r.exact:
            assert r.log10_path_metric == pytest.approx(math.log10(truth), abs=1e-6)
    flushed = onnx.load(path)
    for init in flushed.graph.initializer:
        if init.name.startswith("coefficient"):
            w = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(np.where(np.abs(w) < 1e-30, 0, w).astype(np.float32), init.name))
    out = tmp_path / "flushed.onnx"
    onnx.save(flushed, str(out))
    r = onnxlip.bound(path, str(out), output=[logits], samples=8)
    truth = _dominated_metric(base, _sklearn_params(str(out)))
    assert 0 < truth and math.log10(truth) <= r.log10_bound


def test_sklearn_mlp_against_its_rescaled_copy(sklearn_dead_neurons, tmp_path):
    """bound exited 2 (UnderflowError) for an MLP with subnormal weights against `rescale`'s copy of it: the hi/lo
    difference of a subnormal and its rescaled-then-rounded copy may be flushed when formed, and such mantissas
    were not raised. Their zeros are raised too now: a certified (loose) bound, not a refusal."""
    from onnxlip.rescale import rescale

    _, path, logits = sklearn_dead_neurons
    rescaled = tmp_path / "rescaled.onnx"
    rescale(path, seed=0, out_path=rescaled)
    r = onnxlip.bound(path, str(rescaled), output=[logits], samples=64)
    assert math.isfinite(r.log10_bound) and r.observed_max_l1_diff <= r.bound


def test_a_negligible_raised_term_is_said_to_be_negligible(tmp_path):
    """The digits CNN with five negative Gemm weights set to +1e-40: a sign-flip split whose second metric (1e-27,
    raised) is a term of a 116.3 result. The note called the bound 'a loose one: the raising adds most of this
    value', quoting the 1e-27 term's figures as if they were the result's."""
    from onnx import numpy_helper

    model = onnx.load("models/digits_cnn.onnx")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    init = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    w = numpy_helper.to_array(init).copy()
    negative = np.flatnonzero(w < 0)[:5]
    w.flat[negative] = np.float32(1e-40)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    r = onnxlip.bound("models/digits_cnn.onnx", model, samples=0)
    assert r.sign_flips == 5 and not r.exact
    zeroed = w.copy()
    zeroed.flat[negative] = 0.0
    init.CopyFrom(numpy_helper.from_array(zeroed, init.name))
    exact = onnxlip.bound("models/digits_cnn.onnx", model, samples=0)
    assert exact.exact and r.bound == pytest.approx(exact.bound, rel=1e-6)
    (note,) = r.notes
    assert "less than 1e-7 relative" in note and "loose" not in note
