"""Canonical neuron scaling (onnxlip/canonical.py, powers of two: exact): a model and a copy rescaled by powers of
two have the same canonical form, bit for bit; the canonical model is the same function with the same path-norm
and scores; the path-metric compared in canonical scaling is 0 for such a copy (where the hi/lo route gives 1e8),
much smaller for other factors, and always bounds the brute-force metric (an earlier rounding allowance did not,
through a BatchNorm's cancelling folded bias); pairs that are not rescaled relative to each other get None."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxlip
from onnxlip.api import certified_log10_bound
from onnxlip.canonical import canonical, canonical_metric
from onnxlip.rescale import rescale
from onnxlip.routes import ROUTE_TRIANGLE
from tests import dag_factory as F
from tests import oracle

MLP_OUT = ["add_result2"]  # the sklearn MLP's logits, before its Softmax / ArgMax tail
FILES = [("models/digits_cnn.onnx", None), ("models/digits_mlp.onnx", MLP_OUT)]
FAMILIES = ["gemm", "conv1d", "conv2d", "maxpool", "avgpool", "residual", "batchnorm", "batchnorm_bias", "mixed"]
ODD_FACTORS = (0.013, 0.7, 3.3, 91.0)  # not powers of two: the rescaled weights are rounded
TWO_FACTORS = (2.0**-6, 0.5, 8.0, 4096.0)  # powers of two: exact


def _floats(model) -> dict[str, np.ndarray]:
    proto = onnx.load(model) if isinstance(model, str) else model
    return {
        i.name: a.astype(np.float64)
        for i in proto.graph.initializer
        if (a := numpy_helper.to_array(i)).dtype.kind == "f"
    }


def _assert_same_canonical_form(model, seed: int, factors=TWO_FACTORS) -> None:
    rescaled, result = rescale(model, seed=seed, factors=factors)
    assert result.rescaled_neurons > 0
    original, moved = _floats(model), _floats(rescaled)
    assert any(not np.allclose(moved[n], original[n], rtol=1e-3) for n in original)  # the copy is rescaled
    (ca, fa), (cb, fb) = canonical(model), canonical(rescaled)
    assert fa and fa.keys() == fb.keys()
    assert any(not np.allclose(fa[k], fb[k], rtol=1e-3) for k in fa)  # different factors, ...
    xa, xb = _floats(ca), _floats(cb)
    assert xa.keys() == original.keys()
    for name in xa:  # ... one canonical form, bit for bit
        np.testing.assert_array_equal(xb[name], xa[name], err_msg=name)
    for k in fa:  # the canonical factors are positive and finite
        assert np.all((fa[k] > 0) & np.isfinite(fa[k]))


@pytest.mark.parametrize("path", [p for p, _ in FILES])
@pytest.mark.parametrize("factors", [(1.0, 128.0, 4096.0), TWO_FACTORS])
def test_model_files_and_rescaled_copies_share_the_canonical_form(path, factors):
    _assert_same_canonical_form(path, seed=1, factors=factors)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_dags_and_rescaled_copies_share_the_canonical_form(family):
    for seed in (0, 1):
        _assert_same_canonical_form(F.build(family, seed).model, seed=seed + 3)


@pytest.mark.parametrize("arch", ["mix", "convzoo", "resnet", "conv_bias_bn"])
def test_torch_exports_and_rescaled_copies_share_the_canonical_form(tmp_path, arch):
    pytest.importorskip("torch")
    from tests.exporter_models import build, export

    path = str(tmp_path / f"{arch}.onnx")
    export(build(arch).eval(), path, dynamo=False, dynamic_batch=False)
    _assert_same_canonical_form(path, seed=0)


def test_canonical_scaling_normalises_each_channel():
    """After canonicalization every rescaled channel's largest incoming |entry| is within 2**+-0.5 of 1:
    canonicalizing again applies factors 1 and changes nothing."""
    can, factors = canonical("models/digits_cnn.onnx")
    again, factors2 = canonical(can)
    assert factors.keys() == factors2.keys() and factors
    for k in factors:
        np.testing.assert_array_equal(factors2[k], 1.0)
        assert np.all(np.frexp(factors[k])[0] == 0.5)  # powers of two
    xa, xb = _floats(can), _floats(again)
    for name in xa:
        np.testing.assert_array_equal(xb[name], xa[name])


def _run(model, x, names=None):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(names, {sess.get_inputs()[0].name: x})


def _input(model, n=16, seed=0):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    shape = [d if isinstance(d, int) else n for d in ort.InferenceSession(data).get_inputs()[0].shape]
    return np.random.default_rng(seed).uniform(-2, 2, shape).astype(np.float32)


CASES = [*FILES, *[(F.build(f, 0).model, None) for f in ("conv2d", "batchnorm_bias", "mixed", "residual")]]


@pytest.mark.parametrize("model,output", CASES, ids=["cnn", "mlp", "conv2d", "batchnorm_bias", "mixed", "residual"])
def test_canonical_model_is_the_same_function_with_the_same_norm_and_scores(model, output):
    can, factors = canonical(model)
    spread = max(float(np.max(np.abs(np.log10(v)))) for v in factors.values())
    assert spread > 0.05  # the canonical scaling moved the weights
    x = _input(model)
    for a, b in zip(_run(model, x), _run(can, x)):  # every graph output
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max() + 1e-7)
        else:
            np.testing.assert_array_equal(b, a)  # the MLP's labels
    pa, pb = onnxlip.path_norm(model, output=output), onnxlip.path_norm(can, output=output)
    assert pb.log10_path_norm == pytest.approx(pa.log10_path_norm, abs=1e-6)
    sa, sb = onnxlip.scores(model, output=output), onnxlip.scores(can, output=output)
    assert sa.tensors.keys() == sb.tensors.keys()
    for name, t in sa.tensors.items():
        np.testing.assert_allclose(sb.tensors[name].relative, t.relative, rtol=1e-4, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("path,output", FILES)
@pytest.mark.parametrize("factors", [(1.0, 128.0, 4096.0), ODD_FACTORS])
def test_canonical_metric_of_a_rescaled_copy_is_tiny_where_hi_lo_is_huge(path, output, factors):
    rescaled, _ = rescale(path, seed=0, factors=factors)
    norm = onnxlip.path_norm(path, output=output).log10_path_norm
    hilo = _as_given(path, rescaled, output=output)
    can = canonical_metric(path, rescaled, output=output)
    assert can is not None and can.route.startswith("canonical scaling")
    # as given, the hi/lo route is far above the path-norm itself (10^8.1 for the CNN); the triangle inequality caps
    # it at ||Phi(a)||_1 + ||Phi(b)||_1 = 2 ||Phi(a)||_1 (rescaling keeps the path-norm)
    assert hilo.route == ROUTE_TRIANGLE and hilo.log10_path_metric == pytest.approx(norm + math.log10(2), abs=1e-6)
    assert any("hi/lo upper bound 10^" in n for n in hilo.notes)
    if factors != ODD_FACTORS:  # powers of two: one canonical form, the metric 0 exactly (the MLP's 1e-40 weights
        # went subnormal in `rescale`'s copy and lost bits: there the models really differ, by ~1e-34)
        assert (can.path_metric == 0.0 and can.exact) or can.log10_path_metric < norm - 20
    else:  # per-neuron mismatches within 2**+-0.5 remain: much smaller, not 0
        assert certified_log10_bound(can, 1.0) < certified_log10_bound(hilo, 1.0) - 0.2  # (the triangle bound)


def _as_given(a, b, output=None):
    """The metric route of the models as given (onnxlip.path_metric itself switches to canonical scaling)."""
    from onnxlip.api import analyse, metric_between

    return metric_between(analyse(a, output, keep_proto=False), analyse(b, output, keep_proto=False))


def _noisy(model: onnx.ModelProto, names, rel: float, seed: int) -> onnx.ModelProto:
    """A copy with the named initializers multiplied by 1 + u, |u| <= rel (no sign flips)."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for init in out.graph.initializer:
        if init.name in names:
            v = numpy_helper.to_array(init).astype(np.float64)
            v = v * (1.0 + rng.uniform(-rel, rel, size=v.shape))
            init.CopyFrom(numpy_helper.from_array(v.astype(np.float32), init.name))
    return out


def _oracle_metric(a, b) -> float:
    if any(n.op_type == "BatchNormalization" for n in a.graph.node):
        a, b = oracle.fold_batchnorm(a), oracle.fold_batchnorm(b)
    return oracle.path_metric(a, b)


@pytest.mark.parametrize("family", ["gemm", "conv2d", "maxpool", "batchnorm", "batchnorm_bias", "mixed", "residual"])
@pytest.mark.parametrize("noise", [0.0, 1e-3, 0.05])
def test_canonical_metric_bounds_the_brute_force_metric(family, noise):
    """Soundness: for a and a rescaled, slightly noised copy b, the certified canonical bound is >= the
    brute-force path-metric (tests/oracle.py), and far below the hi/lo bound."""
    spec = F.build(family, 0)
    a = spec.model
    rescaled, result = rescale(a, seed=2, factors=(2.0**-7, 64.0))
    assert result.rescaled_neurons > 0
    b = _noisy(rescaled, set(spec.params), noise, seed=7)
    truth = _oracle_metric(a, b)
    can = canonical_metric(a, b)
    assert can is not None
    if noise == 0:  # powers of two: exactly the same canonical form
        assert truth == 0 and can.path_metric == 0.0 and can.exact
        return
    bound = certified_log10_bound(can, 1.0)
    assert truth == 0 or bound >= math.log10(truth)
    hilo = certified_log10_bound(_as_given(a, b), 1.0)
    assert hilo > math.log10(truth) + 0.5 and bound < hilo
    if noise:  # the bound is meaningful: within a few times the truth
        assert bound <= math.log10(truth) + 1.5


@pytest.mark.parametrize(
    "a,b,output",
    [
        ("models/digits_cnn.onnx", "models/digits_cnn_int8.onnx", None),
        ("models/digits_mlp.onnx", "models/digits_mlp_int8.onnx", MLP_OUT),
        ("models/digits_cnn.onnx", "models/digits_cnn_pruned.onnx", None),
    ],
)
def test_no_canonical_metric_for_variants_that_are_not_rescaled(a, b, output):
    assert onnxlip.path_metric(a, b, output=output).log10_path_metric < 10  # a pair the ordinary route handles
    assert canonical_metric(a, b, output=output) is None
    assert canonical_metric(a, a, output=output) is None


@pytest.mark.parametrize("family", ["gemm", "conv2d", "batchnorm", "mixed"])
@pytest.mark.parametrize("kind", ["noise", "quantize"])
def test_no_canonical_metric_for_noisy_or_rounded_dags(family, kind):
    spec = F.build(family, 0)
    if kind == "noise":
        b = _noisy(spec.model, set(spec.params), 0.05, seed=1)
    else:
        vals = F.params_of(spec.model, spec.params)
        b = F._replace_inits(spec.model, {n: np.round(v * 127 / np.abs(v).max()) * np.abs(v).max() / 127
                                          for n, v in vals.items()})  # fmt: skip
    assert any(not np.array_equal(x, _floats(b)[n]) for n, x in _floats(spec.model).items())
    assert canonical_metric(spec.model, b) is None
    rescaled, _ = rescale(b, seed=0, factors=(0.013, 91.0))  # the same pair, rescaled: canonicalization helps
    assert canonical_metric(spec.model, rescaled) is not None


def test_canonical_metric_returns_none_for_models_it_cannot_compare():
    """Different architectures (different rescalable layers) give None, not an error."""
    assert canonical_metric("models/digits_cnn.onnx", "models/digits_mlp.onnx") is None


def test_bound_and_path_metric_compare_rescaled_copies_in_canonical_scaling(tmp_path):
    """`bound a rescale(a)` gave 1.3e8 for identical functions; it now goes through canonical scaling (a cheap
    test on the weights' channel maxima decides), says so with the bound as given, keeps the changed-entry count of
    the models as given, and file (fast path) and proto inputs agree. An int8 variant is not rescaled: its route
    stays the hi/lo one."""
    from onnxlip.rescale import rescale

    base = "models/digits_cnn.onnx"
    as_given = certified_log10_bound(_as_given(base, rescale(base, seed=0, factors=ODD_FACTORS)[0]), 1.0)
    for factors in (TWO_FACTORS, ODD_FACTORS):
        rescaled = tmp_path / "rescaled.onnx"
        rescale(base, seed=0, factors=factors, out_path=rescaled)
        (from_files,) = onnxlip.bound_many(base, [str(rescaled)], samples=16)
        from_protos = onnxlip.bound(onnx.load(base), onnx.load(str(rescaled)), samples=0)
        for r in (from_files, from_protos):
            # (as given: the triangle bound 2 ||Phi||_1)
            assert r.route.startswith("canonical scaling") and r.log10_bound < as_given - 0.5
            assert r.changed_parameters > 0 and any("canonical neuron scaling" in n for n in r.notes)
        assert from_files.log10_bound == from_protos.log10_bound
        assert from_files.observed_max_l1_diff <= from_files.bound
        if factors == TWO_FACTORS:
            assert from_files.bound == 0.0 and from_files.exact
        metric = onnxlip.path_metric(base, str(rescaled))
        assert metric.route.startswith("canonical scaling") and metric.log10_path_metric == from_files.log10_path_metric
        rescaled.unlink()
    (int8,) = onnxlip.bound_many(base, ["models/digits_cnn_int8.onnx"], samples=0)
    assert not int8.route.startswith("canonical")


def _small(nodes, inits: dict, x_dim: int, y_dim: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    from tests.helpers import make_model

    arrays = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in inits.items()]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, x_dim])]
    return make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, y_dim])], arrays)


def test_an_inner_output_is_not_rescaled_away():
    """output= a ReLU's tensor: rescaling that neuron changes the analysed function, so canonical scaling must keep
    it. It did not: bound 1.3e-6 where the exact metric at r1 is 14 (both rescalings have the same path-norm there,
    so the guard on the canonical path-norms missed it)."""
    from onnx import helper

    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["z1"]),
        helper.make_node("Relu", ["z1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "W2", "b2"], ["y"]),
    ]
    w1 = np.zeros((10, 2))
    w1[0, 0], w1[:, 1] = 1.0, 1.0
    w2, mu = np.array([[1.0, 0.5], [0.25, 1.0]]), np.array([8.0, 0.3])
    a = _small(nodes, {"W1": w1, "b1": np.zeros(2), "W2": w2, "b2": np.zeros(2)}, 10, 2)
    b = _small(nodes, {"W1": w1 * mu, "b1": np.zeros(2), "W2": w2 / mu[:, None], "b2": np.zeros(2)}, 10, 2)
    exact = float(np.abs(w1 - (w1 * mu).astype(np.float32)).sum())
    assert onnxlip.path_metric(a, b, output=["r1"]).path_metric >= exact * (1 - 1e-6)
    assert onnxlip.bound(a, b, output=["r1"], samples=0).bound >= exact * (1 - 1e-6)


def test_a_cancelling_folded_batchnorm_bias_stays_sound():
    """MatMul -> Add(33000) -> BatchNorm(beta -33000) -> Relu, and a copy rescaled by (5.1, 2**20): the folded bias
    cancels, which a rounding allowance on the canonical weights missed (certified 4.8e-5, exact 6.2e-4). With
    exact power-of-two scaling nothing is rounded; the bound stays at or above the brute-force metric."""
    from onnx import helper

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m"]),
        helper.make_node("Add", ["m", "c1"], ["s"]),
        helper.make_node("BatchNormalization", ["s", "gamma", "beta", "mean", "var"], ["z"], epsilon=0.0),
        helper.make_node("Relu", ["z"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["y"]),
    ]
    c, w1, w2, mus = (
        33000.0,
        np.array([[100.0, 1e-5], [100.0, 1e-5]]),
        np.array([[1.0], [1e-4]]),
        np.array([5.1, 2.0**20]),
    )
    common = {"W1": w1, "c1": [c, 0.0], "mean": [0.0, 0.0], "var": [1.0, 1.0], "b2": [0.0]}
    a = _small(nodes, {**common, "gamma": [1.0, 1.0], "beta": [-c, 0.0], "W2": w2}, 2, 1)
    b = _small(nodes, {**common, "gamma": mus, "beta": mus * [-c, 0.0], "W2": w2 / mus[:, None]}, 2, 1)
    truth = oracle.path_metric(oracle.fold_batchnorm(a), oracle.fold_batchnorm(b))
    metric = onnxlip.path_metric(a, b)
    assert metric.path_metric / (1 - metric.rounding_margin) >= truth


def test_fast_path_tests_rescaling_in_the_parameters_layout(tmp_path):
    """A transB=1 Gemm's file rows are its outputs, the IR's rows its inputs: the file path tested the other axis
    and missed the rescaling (bound 3.15 by files, 1.5e-5 by protos). Both now agree."""
    from onnx import helper

    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["z"]),
        helper.make_node("Relu", ["z"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1),
    ]
    w1, w2t = np.array([[10.0, 0.1], [-10.0, 0.2], [10.0, -0.1]]), np.array([[1.0, 0.5], [-1.0, 0.3]])
    mu = np.array([1.0, 8.0])
    a = _small(nodes, {"W1": w1, "b1": [0.1, 0.1], "W2": w2t, "b2": [0.0, 0.0]}, 3, 2)
    b = _small(nodes, {"W1": w1 * mu, "b1": mu * 0.1, "W2": w2t / mu, "b2": [0.0, 0.0]}, 3, 2)
    pa, pb = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(a, str(pa))
    onnx.save(b, str(pb))
    (files,) = onnxlip.bound_many(str(pa), [str(pb)], samples=0)
    protos = onnxlip.bound(a, b, samples=0)
    assert files.route == protos.route and files.route.startswith("canonical") and files.bound == protos.bound == 0.0


def test_canonical_scaling_pairs_the_two_exporters(tmp_path):
    """The TorchScript export against a power-of-two rescaled copy of the dynamo export: the canonical factors
    were compared by ReLU output names, which the exporters name differently, so the route was not taken (bound
    2.4e5 for one function). They are compared layer by layer now."""
    pytest.importorskip("torch")
    from tests.exporter_models import build, export

    module = build("conv_bias_bn").eval()
    ts, dy, scaled = (str(tmp_path / f"{n}.onnx") for n in ("ts", "dy", "dy_scaled"))
    export(module, ts, dynamo=False, dynamic_batch=False)
    export(module, dy, dynamo=True, dynamic_batch=False)
    rescale(dy, seed=1, out_path=scaled)
    r = onnxlip.bound(ts, scaled, samples=0)
    assert r.route.startswith("canonical scaling") and r.bound == 0.0
