"""Canonical neuron scaling (onnxlip/canonical.py): a model and any rescaled copy of it have the same canonical
form; the canonical model is the same function with the same path-norm and scores; the path-metric compared in
canonical scaling is tiny for a rescaled copy (where the hi/lo route gives 1e8) and still bounds the brute-force
metric; and pairs that are not rescaled relative to each other get None."""

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
from tests import dag_factory as F
from tests import oracle

MLP_OUT = ["add_result2"]  # the sklearn MLP's logits, before its Softmax / ArgMax tail
FILES = [("models/digits_cnn.onnx", None), ("models/digits_mlp.onnx", MLP_OUT)]
FAMILIES = ["gemm", "conv1d", "conv2d", "maxpool", "avgpool", "residual", "batchnorm", "batchnorm_bias", "mixed"]
ODD_FACTORS = (0.013, 0.7, 3.3, 91.0)  # not powers of two: the rescaled weights are rounded


def _floats(model) -> dict[str, np.ndarray]:
    proto = onnx.load(model) if isinstance(model, str) else model
    return {
        i.name: a.astype(np.float64)
        for i in proto.graph.initializer
        if (a := numpy_helper.to_array(i)).dtype.kind == "f"
    }


def _assert_same_canonical_form(model, seed: int, factors=ODD_FACTORS) -> None:
    rescaled, result = rescale(model, seed=seed, factors=factors)
    assert result.rescaled_neurons > 0
    original, moved = _floats(model), _floats(rescaled)
    assert any(not np.allclose(moved[n], original[n], rtol=1e-3) for n in original)  # the copy is rescaled
    (ca, fa), (cb, fb) = canonical(model), canonical(rescaled)
    assert fa and fa.keys() == fb.keys()
    assert any(not np.allclose(fa[k], fb[k], rtol=1e-3) for k in fa)  # different factors, ...
    xa, xb = _floats(ca), _floats(cb)
    assert xa.keys() == original.keys()
    for name in xa:  # ... one canonical form (float32 rounding; subnormal entries rounded by the rescaling aside)
        atol = 1e-6 * np.abs(xa[name]).max(initial=0)
        np.testing.assert_allclose(xb[name], xa[name], rtol=1e-6, atol=atol, err_msg=name)
    for k in fa:  # the canonical factors are positive and finite
        assert np.all((fa[k] > 0) & np.isfinite(fa[k]))


@pytest.mark.parametrize("path", [p for p, _ in FILES])
@pytest.mark.parametrize("factors", [(1.0, 128.0, 4096.0), ODD_FACTORS])
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
    """After canonicalization every rescaled channel's largest incoming |entry| is 1: canonicalizing again applies
    factors 1 and changes nothing."""
    can, factors = canonical("models/digits_cnn.onnx")
    again, factors2 = canonical(can)
    assert factors.keys() == factors2.keys() and factors
    for k in factors:
        np.testing.assert_allclose(factors2[k], 1.0, rtol=1e-6)
    xa, xb = _floats(can), _floats(again)
    for name in xa:
        np.testing.assert_allclose(xb[name], xa[name], rtol=1e-6)


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
    assert can is not None and not can.exact and can.route.startswith("canonical scaling")
    assert can.log10_path_metric <= norm - 5
    assert hilo.log10_path_metric >= norm + 1  # the hi/lo route: far above the path-norm itself
    assert certified_log10_bound(can, 1.0) < certified_log10_bound(hilo, 1.0) - 5


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
    rescaled, result = rescale(a, seed=2, factors=(0.013, 91.0))
    assert result.rescaled_neurons > 0
    b = _noisy(rescaled, set(spec.params), noise, seed=7)
    truth = _oracle_metric(a, b)
    can = canonical_metric(a, b)
    assert can is not None
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
    rescaled = tmp_path / "rescaled.onnx"
    rescale(base, seed=0, factors=(0.013, 0.7, 3.3, 91.0), out_path=rescaled)
    norm = onnxlip.path_norm(base).log10_path_norm
    (from_files,) = onnxlip.bound_many(base, [str(rescaled)], samples=16)
    from_protos = onnxlip.bound(onnx.load(base), onnx.load(str(rescaled)), samples=0)
    for r in (from_files, from_protos):
        assert r.route.startswith("canonical scaling") and r.log10_bound < norm - 5
        assert r.changed_parameters > 0 and any("neuron rescaling" in n for n in r.notes)
    assert from_files.log10_bound == from_protos.log10_bound
    assert from_files.observed_max_l1_diff <= from_files.bound
    metric = onnxlip.path_metric(base, str(rescaled))
    assert metric.route.startswith("canonical scaling") and metric.log10_path_metric < norm - 5
    (int8,) = onnxlip.bound_many(base, ["models/digits_cnn_int8.onnx"], samples=0)
    assert not int8.route.startswith("canonical")
