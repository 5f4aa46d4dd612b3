"""Real exporter output gives the same path-norm as a float64 reference computed on the framework side
(theory.md section 2: the absolute-value companion graph on the all-ones input).

1. torch.onnx, TorchScript-based (dynamo=False) and dynamo=True exporters: a ResNet-style CNN and small models
   with the layers of tests/exporter_models.py; reference = the float64 torch companion of the same module.
2. Keras / tf2onnx-style graphs (NHWC, Transpose around the convs, MatMul + Add dense layers, Reshape [-1, K]).
3. scikit-learn MLPClassifier / MLPRegressor exported by skl2onnx (Softmax / ArgMax / ZipMap tail).
4. MATLAB exportONNXNetwork-style graphs (Sub/Div input normalisation, Conv + BatchNormalization, Gemm transB=1,
   opsets 7 to 11, IR versions 4 to 7, a Shape -> Gather -> Unsqueeze -> Concat reshape).
5. Rejections: Sigmoid, Tanh, a middle Softmax, LSTM; every problem is reported at once.

Every hand-built reference is a numpy float64 function that computes the real forward pass too (checked against
onnxruntime, so the reference is known to describe the same network) and, with q given, the companion.
Torch tests skip without torch; the rest needs only numpy / onnx / onnxruntime (and scikit-learn for part 3).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from tests.helpers import sklearn_digits_classifier

onnxruntime.set_default_logger_severity(3)

REL = 1e-6
QS = (1.0, 2.0)


def _save(model: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _ort_run(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _t(arr: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _f32(arr) -> np.ndarray:
    """A float32 parameter as the file stores it, widened to float64 for the reference."""
    return np.asarray(arr, dtype=np.float32).astype(np.float64)


# ---- numpy float64 reference ops: real forward (q=None) or companion (q given) -------------------------------
def _w(w: np.ndarray, q: float | None) -> np.ndarray:
    return w if q is None else np.abs(w) ** q


def _relu(x: np.ndarray, q: float | None) -> np.ndarray:
    return np.maximum(x, 0.0) if q is None else x  # ReLU -> identity in the companion


def conv2d(x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """x (C, H, W); w (O, C/group, kh, kw); pads (top, left, bottom, right) with zeros."""
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_c, cin_g, kh, kw = w.shape
    ho = (xp.shape[1] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (xp.shape[2] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((out_c, ho, wo))
    og = out_c // group
    for g in range(group):
        xs = xp[g * cin_g : (g + 1) * cin_g]
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dilations[0], j * dilations[1]
                patch = xs[
                    :,
                    r0 : r0 + strides[0] * (ho - 1) + 1 : strides[0],
                    c0 : c0 + strides[1] * (wo - 1) + 1 : strides[1],
                ]
                out[g * og : (g + 1) * og] += np.einsum("oc,chw->ohw", w[g * og : (g + 1) * og, :, i, j], patch)
    if b is not None:
        out += b[:, None, None]
    return out


def pool2d(x, k, s, pads=(0, 0, 0, 0), q: float | None = None):
    """Max-pool (q=None, -inf padding) or its companion, the window sum (q given, zero padding)."""
    fill = -np.inf if q is None else 0.0
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=fill)
    ho = (xp.shape[1] - k) // s + 1
    wo = (xp.shape[2] - k) // s + 1
    out = np.full((x.shape[0], ho, wo), fill)
    for i in range(k):
        for j in range(k):
            patch = xp[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s]
            out = np.maximum(out, patch) if q is None else out + patch
    return out


def batchnorm_affine(gamma, beta, mean, var, eps):
    a = gamma / np.sqrt(var + eps)
    return a, beta - a * mean


# ============================================================================================================
# 1. torch.onnx exporters
# ============================================================================================================
TORCH_ARCHS = ("resnet", "convzoo", "conv1d", "transpose", "mix", "unet", "densenet", "shuffle")
# ops each export must contain, so that each test exercises what it claims to
EXPECTED_OPS = {
    "resnet": {"Conv", "MaxPool", "Add", "Relu", "Gemm"},
    "convzoo": {"Conv", "LeakyRelu", "Clip", "MaxPool", "AveragePool", "BatchNormalization"},
    "conv1d": {"Conv", "MaxPool"},
    "transpose": {"ConvTranspose", "Relu"},
    "mix": {"Max", "Min", "Concat", "Resize", "Transpose", "MatMul"},
    "unet": {"Pad", "ConvTranspose", "Concat", "Resize", "MaxPool", "PRelu"},
    "densenet": {"Concat", "BatchNormalization", "AveragePool", "Gemm"},
    "shuffle": {"Slice", "Concat", "Transpose"},
}


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory):
    """export(arch, exporter, batch) -> (path, ONNX input name, {q: float64 reference ||Phi||_q}); cached."""
    pytest.importorskip("torch")
    from tests import exporter_models as em

    folder = tmp_path_factory.mktemp("torch_exports")
    cache: dict[tuple, tuple] = {}

    def export(arch: str, exporter: str, batch: str):
        if exporter == "dynamo":
            pytest.importorskip("onnxscript")
        key = (arch, exporter, batch)
        if key not in cache:
            model = em.build(arch, seed=sum(map(ord, arch)))
            path = folder / f"{arch}_{exporter}_{batch}.onnx"
            em.export(model, path, dynamo=exporter == "dynamo", dynamic_batch=batch == "dynamic")
            refs = {q: em.reference_pathnorm(model, model.input_shape, q) for q in QS}
            cache[key] = (str(path), refs)
        return cache[key]

    return export


def _batch_dim(path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("batch", ["fixed", "dynamic"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_torch_resnet(torch_export, exporter, batch, q):
    path, refs = torch_export("resnet", exporter, batch)
    dim = _batch_dim(path)
    if batch == "dynamic":
        assert dim.dim_param and not dim.dim_value  # a symbolic batch axis; onnxlip fixes it to 1
    else:
        assert dim.dim_value == 1
    r = onnxlip.path_norm(path, q)
    assert r.path_norm == pytest.approx(refs[q], rel=REL)
    assert r.log10_path_norm == pytest.approx(math.log10(refs[q]), abs=1e-6)


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("batch", ["fixed", "dynamic"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", ["convzoo", "conv1d", "transpose", "mix", "unet", "densenet", "shuffle"])
def test_torch_layers(torch_export, arch, exporter, batch, q):
    path, refs = torch_export(arch, exporter, batch)
    assert onnxlip.path_norm(path, q).path_norm == pytest.approx(refs[q], rel=REL)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("align_corners,by_size", [(False, False), (True, False), (False, True), (True, True)])
def test_torch_bilinear_interpolation(tmp_path, exporter, align_corners, by_size):
    """Resize in linear mode from F.interpolate: the path-norm equals the torch float64 companion (q = 1, where the
    companion of a bilinear map is itself); bicubic (negative coefficients) loads and bounds its outputs."""
    pytest.importorskip("torch")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    import torch

    from tests import exporter_models as em

    model = em.randomize(em.Interpolating("bilinear", align_corners, by_size), 3)
    em.export(model, tmp_path / "m.onnx", dynamo=exporter == "dynamo", dynamic_batch=False)
    assert "Resize" in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert onnxlip.path_norm(tmp_path / "m.onnx").path_norm == pytest.approx(
        em.reference_pathnorm(model, model.input_shape, 1.0), rel=REL
    )
    cubic = em.randomize(em.Interpolating("bicubic", align_corners, by_size), 3)
    em.export(cubic, tmp_path / "c.onnx", dynamo=exporter == "dynamo", dynamic_batch=False)
    norm = onnxlip.path_norm(tmp_path / "c.onnx").path_norm
    x = torch.rand((1, *cubic.input_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert float(cubic(x).abs().sum()) <= norm  # theory.md section 6 with theta' = 0, ||x||_inf <= 1


@pytest.mark.parametrize("arch", ["resnet", "convzoo", "mix", "unet", "densenet", "shuffle"])
def test_the_two_exporters_outputs_pair(torch_export, arch):
    """The TorchScript and the dynamo export of one module differ in graph details (a one-input Concat, F.pad as a
    Pad or inside the Conv, BatchNorm folded by the exporter in float32 or left to onnxlip, Slices or a Split, a
    circular pad as Slices and Concats or a wrapping Pad, a global MaxPool or a ReduceMax): `bound` pairs them,
    and its bound is at the level of float32 rounding of the path-norm."""
    a, _ = torch_export(arch, "torchscript", "fixed")
    b, _ = torch_export(arch, "dynamo", "fixed")
    r = onnxlip.bound(a, b, samples=32)
    assert r.bound <= 1e-5 * onnxlip.path_norm(a).path_norm and r.observed_max_l1_diff <= max(r.bound, 1e-4)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", TORCH_ARCHS)
def test_torch_exports_contain_the_layers_under_test(torch_export, arch, exporter):
    path, _ = torch_export(arch, exporter, "fixed")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert EXPECTED_OPS[arch] <= ops, f"{arch} ({exporter}) lacks {EXPECTED_OPS[arch] - ops}"
    result = onnxlip.check(path)
    assert result.supported and not result.errors


@pytest.mark.parametrize("arch", TORCH_ARCHS)
def test_torch_reference_bounds_the_outputs(torch_export, arch):
    """Sanity check of the reference itself (theory.md section 6, theta' = 0):
    ||R(x)||_1 <= max(||x||_inf, 1) * ||Phi||_1 on random inputs of the exported network."""
    path, refs = torch_export(arch, "torchscript", "fixed")
    shape = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    for scale in (0.5, 1.0, 3.0):
        x = (rng.uniform(-scale, scale, size=shape)).astype(np.float32)
        (y,) = _ort_run(path, {"x": x})
        assert np.abs(y).sum() <= max(np.abs(x).max(), 1.0) * refs[1.0] * (1 + 1e-5)


def test_torchscript_dynamic_batch_shape_arithmetic_is_folded(torch_export):
    """x.view(x.shape[0], -1) with a dynamic batch: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    path, refs = torch_export("conv1d", "torchscript", "dynamic")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= ops
    result = onnxlip.check(path)
    assert result.supported
    assert list(result.inputs.values())[0][0] == 1
    assert onnxlip.path_norm(path, 1.0).path_norm == pytest.approx(refs[1.0], rel=REL)


def test_dynamo_view_after_pad(torch_export):
    path, refs = torch_export("mix_view", "dynamo", "fixed")
    for q in QS:
        assert onnxlip.path_norm(path, q).path_norm == pytest.approx(refs[q], rel=REL)


def test_torchscript_view_after_pad(torch_export):
    path, refs = torch_export("mix_view", "torchscript", "fixed")
    assert onnxlip.path_norm(path, 1.0).path_norm == pytest.approx(refs[1.0], rel=REL)


def _pad_then_dynamic_reshape() -> onnx.ModelProto:
    """Minimal repro of the folding bug: Pad(pads = Cast(int32 initializer)) -> Relu -> Shape -> Concat ->
    Reshape. The companion is 18 ones (2 x 3 x 3 real entries, the padded zeros carry no path)."""
    inits = [_t(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int32), "pads32"), _t(np.array([-1], np.int64), "minus1")]
    nodes = [
        helper.make_node("Cast", ["pads32"], ["pads"], name="cast", to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad"),
        helper.make_node("Relu", ["xp"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"], name="shape", start=0, end=1),
        helper.make_node("Concat", ["s", "minus1"], ["new_shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["r", "new_shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "pad_reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 50])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_minimal_repro_shape_after_folded_pad(tmp_path):
    path = _save(_pad_then_dynamic_reshape(), tmp_path / "pad_reshape.onnx")
    assert _ort_run(path, {"x": np.ones((1, 2, 3, 3), np.float32)})[0].shape == (1, 50)
    assert onnxlip.path_norm(path, 1.0).path_norm == pytest.approx(18.0, rel=REL)


@pytest.fixture(scope="module")
def conv_bias_bn(tmp_path_factory):
    """A Conv2d with bias + BatchNorm, exported by TorchScript with the BN fused (default, training=EVAL) and
    kept as a BatchNormalization node (training=PRESERVE on an eval-mode model). Reference: the folded conv, the
    parameterisation onnxlip analyses (it folds BN into the conv before it)."""
    torch = pytest.importorskip("torch")
    from tests import exporter_models as em

    model = em.build("conv_bias_bn", seed=2)
    folder = tmp_path_factory.mktemp("conv_bias_bn")
    paths = {}
    for mode in ("fused", "preserve"):
        paths[mode] = str(folder / f"{mode}.onnx")
        extra = {"training": torch.onnx.TrainingMode.PRESERVE} if mode == "preserve" else {}
        em.export(model, paths[mode], dynamo=False, dynamic_batch=False, **extra)
    refs = {q: em.reference_pathnorm(model.folded(), model.input_shape, q) for q in QS}
    unfolded = {q: em.reference_pathnorm(model, model.input_shape, q) for q in QS}
    # the two bias paths b -> BN (a*b) and c become one path a*b + c: for q = 1 the triangle inequality makes
    # folding lower the norm, but for q = 2 it can RAISE it, (ab + c)^2 > (ab)^2 + c^2 when ab and c share a
    # sign (theory.md section 3's "equal or smaller" holds for q <= 1 only); with this seed both happen
    assert refs[1.0] < unfolded[1.0] and refs[2.0] > unfolded[2.0]
    return paths, refs


@pytest.mark.parametrize("q", QS)
def test_torchscript_fused_conv_bias_bn(conv_bias_bn, q):
    paths, refs = conv_bias_bn
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(paths["fused"]).graph.node}
    assert onnxlip.path_norm(paths["fused"], q).path_norm == pytest.approx(refs[q], rel=REL)


def test_torchscript_preserved_conv_bias_bn(conv_bias_bn):
    paths, refs = conv_bias_bn
    assert "BatchNormalization" in {n.op_type for n in onnx.load(paths["preserve"]).graph.node}
    assert onnxlip.path_norm(paths["preserve"], 1.0).path_norm == pytest.approx(refs[1.0], rel=REL)


# ============================================================================================================
# 2. Keras / tf2onnx-style graphs
# ============================================================================================================
def _keras_params(rng) -> dict[str, np.ndarray]:
    n = lambda *s, scale=0.6: _f32(rng.normal(size=s) * scale)  # noqa: E731
    return {
        "conv1/W": n(8, 3, 3, 3),
        "conv1/b": n(8, scale=0.3),
        "conv2/W": n(8, 8, 3, 3, scale=0.3),
        "conv2/b": n(8, scale=0.3),
        "bn/mul": n(8, scale=1.2),
        "bn/add": n(8, scale=0.5),
        "dense/kernel": n(72, 16, scale=0.2),
        "dense/bias": n(16, scale=0.3),
        "dense_1/kernel": n(16, 4, scale=0.4),
        "dense_1/bias": n(4, scale=0.3),
    }


def _keras_model(p: dict[str, np.ndarray], opset: int) -> onnx.ModelProto:
    """A tf2onnx-style CNN: NHWC input -> Transpose -> Conv(explicit pads) -> Relu -> Conv(stride 2, SAME_UPPER)
    -> Relu -> MaxPool -> Transpose back -> Mul/Add (a Keras BatchNorm folded by tf2onnx, NHWC channel-last)
    -> Reshape [-1, 72] -> MatMul + Add -> Relu -> MatMul + Add."""
    pre = "StatefulPartitionedCall/sequential/"
    inits = [_t(v.astype(np.float32), k) for k, v in p.items()]
    inits.append(_t(np.array([-1, 72], np.int64), "const_fold_opt__12"))
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["t_in"], name=pre + "conv1/Conv2D__6", perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv",
            ["t_in", "conv1/W", "conv1/b"],
            ["c1"],
            name=pre + "conv1/Conv2D",
            pads=[1, 1, 1, 1],
            kernel_shape=[3, 3],
            strides=[1, 1],
            dilations=[1, 1],
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name=pre + "conv1/Relu"),
        helper.make_node(
            "Conv",
            ["r1", "conv2/W", "conv2/b"],
            ["c2"],
            name=pre + "conv2/Conv2D",
            auto_pad="SAME_UPPER",
            kernel_shape=[3, 3],
            strides=[2, 2],
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name=pre + "conv2/Relu"),
        helper.make_node(
            "MaxPool", ["r2"], ["mp"], name=pre + "max_pooling2d/MaxPool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Transpose", ["mp"], ["t_out"], name=pre + "max_pooling2d/MaxPool__20", perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["t_out", "bn/mul"], ["bn_m"], name=pre + "batch_normalization/mul_1"),
        helper.make_node("Add", ["bn_m", "bn/add"], ["bn_a"], name=pre + "batch_normalization/add_1"),
        helper.make_node("Reshape", ["bn_a", "const_fold_opt__12"], ["flat"], name=pre + "flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "dense/kernel"], ["d1"], name=pre + "dense/MatMul"),
        helper.make_node("Add", ["d1", "dense/bias"], ["d1b"], name=pre + "dense/BiasAdd"),
        helper.make_node("Relu", ["d1b"], ["d1r"], name=pre + "dense/Relu"),
        helper.make_node("MatMul", ["d1r", "dense_1/kernel"], ["d2"], name=pre + "dense_1/MatMul"),
        helper.make_node("Add", ["d2", "dense_1/bias"], ["dense_1"], name=pre + "dense_1/BiasAdd"),
    ]
    graph = helper.make_graph(
        nodes,
        "tf2onnx",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", 12, 12, 3])],
        [helper.make_tensor_value_info("dense_1", TensorProto.FLOAT, ["unk__1", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx")
    model.ir_version = 8 if opset >= 13 else 7
    return model


def _keras_reference(p, x_nhwc: np.ndarray, q: float | None = None) -> np.ndarray:
    x = x_nhwc.transpose(2, 0, 1)
    x = _relu(conv2d(x, _w(p["conv1/W"], q), _w(p["conv1/b"], q), pads=(1, 1, 1, 1)), q)
    # SAME_UPPER, 12 -> 6 with stride 2 and a 3x3 kernel: total padding 1, all of it at the end
    x = _relu(conv2d(x, _w(p["conv2/W"], q), _w(p["conv2/b"], q), strides=(2, 2), pads=(0, 0, 1, 1)), q)
    x = pool2d(x, 2, 2, q=q).transpose(1, 2, 0)  # back to HWC
    x = x * _w(p["bn/mul"], q) + _w(p["bn/add"], q)
    x = x.reshape(-1)  # flattened in NHWC order
    x = _relu(x @ _w(p["dense/kernel"], q) + _w(p["dense/bias"], q), q)
    return x @ _w(p["dense_1/kernel"], q) + _w(p["dense_1/bias"], q)


@pytest.mark.parametrize("opset", [11, 13])
def test_keras_tf2onnx_style(tmp_path, opset):
    rng = np.random.default_rng(opset)
    p = _keras_params(rng)
    path = _save(_keras_model(p, opset), tmp_path / "keras.onnx")
    x = rng.normal(size=(2, 12, 12, 3)).astype(np.float32)
    (y,) = _ort_run(path, {"input_1": x})
    expected = np.stack([_keras_reference(p, xi.astype(np.float64)) for xi in x])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)  # the reference describes this network
    for q in QS:
        ref = float(_keras_reference(p, np.ones((12, 12, 3)), q).sum()) ** (1 / q)
        assert onnxlip.path_norm(path, q).path_norm == pytest.approx(ref, rel=REL)


# ============================================================================================================
# 3. scikit-learn MLPs exported by skl2onnx
# ============================================================================================================
def _mlp_reference(clf, q: float) -> float:
    """sum over outputs of the paths |W_L|...|W_1| (and bias paths), with float32-rounded parameters."""
    v = np.ones(clf.coefs_[0].shape[0])
    for w, b in zip(clf.coefs_, clf.intercepts_):
        v = v @ (np.abs(_f32(w)) ** q) + np.abs(_f32(b)) ** q
    return float(v.sum()) ** (1 / q)


@pytest.fixture(scope="module")
def sklearn_classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("sklearn") / "mlp_classifier.onnx"
    return sklearn_digits_classifier(path, hidden_layer_sizes=(32, 16), activation="relu", max_iter=40, random_state=0)


def _logits_name(path) -> str:
    (softmax,) = [n for n in onnx.load(path).graph.node if n.op_type == "Softmax"]
    return softmax.input[0]


def test_sklearn_classifier_tail_is_rejected_with_a_hint(sklearn_classifier):
    _, path, _ = sklearn_classifier
    result = onnxlip.check(path)
    assert not result.supported
    ops = {e.op for e in result.errors}
    assert {"Softmax", "ArgMax", "ZipMap"} <= ops
    nodes = {n.name: n.op_type for n in onnx.load(path).graph.node}
    for err in result.errors:
        if err.op in ("Softmax", "ArgMax", "ZipMap"):
            assert nodes[err.node] == err.op and err.reason
    assert result.hint and "--output" in result.hint
    assert f"--output {_logits_name(path)}" in result.hint
    with pytest.raises(onnxlip.UnsupportedModelError) as info:
        onnxlip.path_norm(path)
    assert {"Softmax", "ArgMax", "ZipMap"} <= {i.op for i in info.value.issues}


@pytest.mark.parametrize("q", QS)
def test_sklearn_classifier_logits(sklearn_classifier, q):
    clf, path, x = sklearn_classifier
    logits = _logits_name(path)
    assert onnxlip.check(path, output=[logits]).supported
    r = onnxlip.path_norm(path, q, output=[logits])
    assert r.outputs == [logits]
    assert r.path_norm == pytest.approx(_mlp_reference(clf, q), rel=REL)


def test_sklearn_classifier_logits_tensor_is_the_pre_softmax_value(sklearn_classifier):
    """The tensor analysed really is the logits: its softmax gives predict_proba."""
    clf, path, x = sklearn_classifier
    logits = _logits_name(path)
    model = onnx.load(path)
    model.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
    sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    z = sess.run([logits], {"X": x[:5]})[0]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p / p.sum(axis=1, keepdims=True), clf.predict_proba(x[:5]), rtol=1e-4, atol=1e-5)


def test_sklearn_hint_suggests_only_runtime_tensors(sklearn_classifier):
    """Not 'classes' / 'shape_tensor', the initializers feeding the skl2onnx label branch."""
    _, path, _ = sklearn_classifier
    hint = onnxlip.check(path).hint
    initializers = {i.name for i in onnx.load(path).graph.initializer}
    assert not any(f"--output {name}" in hint for name in initializers), hint


def test_output_naming_an_initializer_is_a_clean_error(sklearn_classifier):
    _, path, _ = sklearn_classifier
    with pytest.raises(onnxlip.OnnxlipError):
        onnxlip.path_norm(path, output=["classes"])


@pytest.mark.parametrize("q", QS)
def test_sklearn_regressor(tmp_path, q):
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = np.stack([np.maximum(x[:, 0], 0) - x[:, 1], x[:, 2] * 2 + 1], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg = MLPRegressor(hidden_layer_sizes=(24, 12), max_iter=60, random_state=0).fit(x, y)
    model = to_onnx(reg, x[:1], target_opset=17)
    model.ir_version = min(model.ir_version, 10)
    path = _save(model, tmp_path / "mlp_regressor.onnx")
    (pred,) = _ort_run(path, {"X": x[:4]})
    # skl2onnx reshapes a two-target prediction to (-1, 1); the path-norm sums every output either way
    np.testing.assert_allclose(pred.ravel(), reg.predict(x[:4]).ravel(), rtol=1e-4, atol=1e-4)
    assert onnxlip.check(path).supported
    assert onnxlip.path_norm(path, q).path_norm == pytest.approx(_mlp_reference(reg, q), rel=REL)


# ============================================================================================================
# 4. MATLAB exportONNXNetwork-style graphs
# ============================================================================================================
def _matlab_params(rng) -> dict[str, np.ndarray]:
    n = lambda *s, scale=0.5: _f32(rng.normal(size=s) * scale)  # noqa: E731
    return {
        "imageinput_Mean": n(1, 1, 12, 12, scale=0.3),
        "imageinput_StandardDeviation": _f32(np.array([0.45])),
        "conv_1_W": n(4, 1, 3, 3),
        "conv_1_B": n(4, scale=0.3),
        "batchnorm_1_scale": n(4, scale=1.3),
        "batchnorm_1_B": n(4, scale=0.6),
        "batchnorm_1_mean": n(4, scale=1.5),
        "batchnorm_1_var": _f32(rng.uniform(0.2, 3.0, size=4)),
        "conv_2_W": n(6, 4, 3, 3, scale=0.4),
        "batchnorm_2_scale": n(6, scale=1.3),
        "batchnorm_2_B": n(6, scale=0.6),
        "batchnorm_2_mean": n(6, scale=1.5),
        "batchnorm_2_var": _f32(rng.uniform(0.2, 3.0, size=6)),
        "fc_1_W": n(10, 54, scale=0.3),
        "fc_1_B": n(10, scale=0.3),
        "fc_2_W": n(3, 10, scale=0.5),
        "fc_2_B": n(3, scale=0.3),
    }


def _matlab_model(
    p, opset: int, ir_version: int, reshape: str, spatial: int | None, inits_as_inputs: bool, softmax: bool
) -> onnx.ModelProto:
    """imageinput (zscore: Sub mean, Div std) -> conv_1 (with a bias if "conv_1_B" in p) -> batchnorm_1 -> relu_1
    -> maxpool (2x2/2) -> conv_2 (stride 2, no bias) -> batchnorm_2 -> relu_2 -> reshape -> fc_1 (Gemm transB=1)
    -> relu_3 -> fc_2 [-> softmax].
    `reshape`: "shape_chain" (Shape -> Gather -> Unsqueeze -> Concat -> Reshape) or "flatten"."""
    bn_attrs = {"epsilon": 1e-5}
    if spatial is not None:
        bn_attrs["spatial"] = spatial
    nodes = [
        helper.make_node("Sub", ["data", "imageinput_Mean"], ["sub"], name="imageinput_Sub"),
        helper.make_node("Div", ["sub", "imageinput_StandardDeviation"], ["norm"], name="imageinput_Div"),
        helper.make_node(
            "Conv",
            ["norm", "conv_1_W"] + ["conv_1_B"] * ("conv_1_B" in p),
            ["conv_1"],
            name="conv_1",
            pads=[1, 1, 1, 1],
            kernel_shape=[3, 3],
            strides=[1, 1],
        ),
        helper.make_node(
            "BatchNormalization",
            ["conv_1"] + [f"batchnorm_1_{k}" for k in ("scale", "B", "mean", "var")],
            ["batchnorm_1"],
            name="batchnorm_1",
            **bn_attrs,
        ),
        helper.make_node("Relu", ["batchnorm_1"], ["relu_1"], name="relu_1"),
        helper.make_node("MaxPool", ["relu_1"], ["maxpool"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(
            "Conv",
            ["maxpool", "conv_2_W"],
            ["conv_2"],
            name="conv_2",
            pads=[1, 1, 1, 1],
            kernel_shape=[3, 3],
            strides=[2, 2],
        ),
        helper.make_node(
            "BatchNormalization",
            ["conv_2"] + [f"batchnorm_2_{k}" for k in ("scale", "B", "mean", "var")],
            ["batchnorm_2"],
            name="batchnorm_2",
            **bn_attrs,
        ),
        helper.make_node("Relu", ["batchnorm_2"], ["relu_2"], name="relu_2"),
    ]
    extra_inits = []
    if reshape == "shape_chain":
        extra_inits = [_t(np.array(0, np.int64), "fc_1_Reshape_idx"), _t(np.array([-1], np.int64), "fc_1_Reshape_rest")]
        nodes += [
            helper.make_node("Shape", ["relu_2"], ["fc_1_shape"], name="fc_1_Shape"),
            helper.make_node("Gather", ["fc_1_shape", "fc_1_Reshape_idx"], ["fc_1_batch"], name="fc_1_Gather", axis=0),
            helper.make_node("Unsqueeze", ["fc_1_batch"], ["fc_1_batch1"], name="fc_1_Unsqueeze", axes=[0]),
            helper.make_node(
                "Concat", ["fc_1_batch1", "fc_1_Reshape_rest"], ["fc_1_newshape"], name="fc_1_Concat", axis=0
            ),
            helper.make_node("Reshape", ["relu_2", "fc_1_newshape"], ["flat"], name="fc_1_Reshape"),
        ]
    else:
        nodes.append(helper.make_node("Flatten", ["relu_2"], ["flat"], name="fc_1_Flatten", axis=1))
    nodes += [
        helper.make_node("Gemm", ["flat", "fc_1_W", "fc_1_B"], ["fc_1"], name="fc_1", transB=1),
        helper.make_node("Relu", ["fc_1"], ["relu_3"], name="relu_3"),
        helper.make_node("Gemm", ["relu_3", "fc_2_W", "fc_2_B"], ["fc_2"], name="fc_2", transB=1),
    ]
    out = "fc_2"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["fc_2"], ["softmax"], name="softmax", axis=1))
        out = "softmax"
    inits = [_t(v.astype(np.float32), k) for k, v in p.items()] + extra_inits
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 1, 12, 12])]
    if inits_as_inputs:  # old exporters list every initializer as a graph input too
        inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
    graph = helper.make_graph(
        nodes, "matlab", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 3])], inits
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="MATLAB Deep Learning Toolbox Converter for ONNX Model Format",
    )
    model.ir_version = ir_version
    return model


def _matlab_reference(p, x: np.ndarray, q: float | None = None) -> np.ndarray:
    """Real forward (q=None; x of shape (1, 12, 12)) or the companion, with both BatchNorms folded into their
    convs as onnxlip does (conv_1 has a bias: folding is the smaller, valid parameterisation)."""
    mean, std = p["imageinput_Mean"][0], p["imageinput_StandardDeviation"][0]
    # Sub then Div: paths from the input carry the weight 1/std, the bias paths start at -mean/std
    x = (x - mean) / std if q is None else x * _w(1.0 / std, q) + _w(mean / std, q)
    a1, c1 = batchnorm_affine(*(p[f"batchnorm_1_{k}"] for k in ("scale", "B", "mean", "var")), 1e-5)
    w1, b1 = p["conv_1_W"] * a1[:, None, None, None], a1 * p.get("conv_1_B", 0.0) + c1
    x = _relu(conv2d(x, _w(w1, q), _w(b1, q), pads=(1, 1, 1, 1)), q)
    x = pool2d(x, 2, 2, q=q)
    a2, c2 = batchnorm_affine(*(p[f"batchnorm_2_{k}"] for k in ("scale", "B", "mean", "var")), 1e-5)
    w2 = p["conv_2_W"] * a2[:, None, None, None]
    x = _relu(conv2d(x, _w(w2, q), _w(c2, q), strides=(2, 2), pads=(1, 1, 1, 1)), q)
    x = x.reshape(-1)
    x = _relu(x @ _w(p["fc_1_W"], q).T + _w(p["fc_1_B"], q), q)
    return x @ _w(p["fc_2_W"], q).T + _w(p["fc_2_B"], q)


MATLAB_CASES = {
    # id: (opset, ir_version, reshape, BN spatial attribute, initializers listed as inputs, trailing Softmax,
    #      conv_1 has a bias)
    "opset9_ir4": (9, 4, "shape_chain", None, False, False, False),
    "opset11_ir7_softmax": (11, 7, "shape_chain", None, False, True, False),
    "opset7_ir4_spatial_default": (7, 4, "shape_chain", None, True, False, False),
    "opset8_ir5_spatial1_flatten": (8, 5, "flatten", 1, False, False, False),
    "opset9_ir4_conv_bias": (9, 4, "shape_chain", None, False, False, True),
    "opset8_ir5_conv_bias_flatten": (8, 5, "flatten", 1, True, False, True),
}


@pytest.mark.parametrize("case", list(MATLAB_CASES))
def test_matlab_style(tmp_path, case):
    opset, ir_version, reshape, spatial, inits_as_inputs, softmax, conv_bias = MATLAB_CASES[case]
    rng = np.random.default_rng(len(case))
    p = _matlab_params(rng)
    if not conv_bias:
        del p["conv_1_B"]
    path = _save(_matlab_model(p, opset, ir_version, reshape, spatial, inits_as_inputs, softmax), tmp_path / "m.onnx")
    x = rng.normal(size=(1, 1, 12, 12)).astype(np.float32)
    if not softmax:
        (y,) = _ort_run(path, {"data": x})
        np.testing.assert_allclose(y[0], _matlab_reference(p, x[0].astype(np.float64)), rtol=1e-4, atol=1e-4)
    output = ["fc_2"] if softmax else None
    result = onnxlip.check(path, output=output)
    assert result.supported, result.errors
    assert result.inputs == {"data": [1, 1, 12, 12]}
    for q in QS:
        ref = float(_matlab_reference(p, np.ones((1, 12, 12)), q).sum()) ** (1 / q)
        assert onnxlip.path_norm(path, q, output=output).path_norm == pytest.approx(ref, rel=REL)
    if softmax:
        bad = onnxlip.check(path)
        assert not bad.supported and [(e.node, e.op) for e in bad.errors] == [("softmax", "Softmax")]
        assert "--output fc_2" in bad.hint


def _conv_bias_batchnorm() -> onnx.ModelProto:
    """Minimal repro: x (1, 1, 2, 2) -> Conv(W (2, 1, 1, 1), B (2,)) -> BatchNormalization -> y."""
    inits = [
        _t(np.array([1.0, -2.0], np.float32).reshape(2, 1, 1, 1), "W"),
        _t(np.array([0.5, -1.0], np.float32), "B"),
        _t(np.array([2.0, -1.0], np.float32), "gamma"),
        _t(np.array([0.25, 0.5], np.float32), "beta"),
        _t(np.array([1.0, -1.0], np.float32), "mean"),
        _t(np.array([1.0, 3.0], np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=0.0),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bias_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_minimal_repro_conv_bias_batchnorm():
    # folded: a = gamma / sqrt(var) = (2, -1/sqrt(3)), c = beta - a * mean = (-1.75, 0.5 - 1/sqrt(3));
    # W' = a W = (2, 2/sqrt(3)), b' = a B + c = (-0.75, 0.5); 4 output pixels per channel, one input path each
    a = np.array([2.0, -1.0 / math.sqrt(3.0)])
    c = np.array([0.25, 0.5]) - a * np.array([1.0, -1.0])
    w, b = a * np.array([1.0, -2.0]), a * np.array([0.5, -1.0]) + c
    expected = 4 * float(np.sum(np.abs(w) + np.abs(b)))
    assert onnxlip.path_norm(_conv_bias_batchnorm(), 1.0).path_norm == pytest.approx(expected, rel=REL)


# ============================================================================================================
# 5. Rejections
# ============================================================================================================
def _mlp_with(middle: list[tuple[str, dict]], opset: int = 17) -> onnx.ModelProto:
    """x (1, 4) -> Gemm -> <op 0> -> Gemm -> <op 1> -> ... -> Gemm; ops named act0, act1, ..."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(len(middle) + 1):
        inits += [_t(rng.normal(size=(4, 4)).astype(np.float32), f"W{i}"), _t(np.zeros(4, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"b{i}"], [f"g{i}"], name=f"gemm{i}"))
        cur = f"g{i}"
        if i < len(middle):
            op, attrs = middle[i]
            nodes.append(helper.make_node(op, [cur], [f"a{i}"], name=f"act{i}", **attrs))
            cur = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "rej",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _lstm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    seq, inp, hidden = 5, 3, 4
    inits = [
        _t(rng.normal(size=(1, 4 * hidden, inp)).astype(np.float32), "lstm_W"),
        _t(rng.normal(size=(1, 4 * hidden, hidden)).astype(np.float32), "lstm_R"),
        _t(rng.normal(size=(1, 8 * hidden)).astype(np.float32), "lstm_B"),
        _t(rng.normal(size=(hidden, 2)).astype(np.float32), "fc_W"),
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "lstm_W", "lstm_R", "lstm_B"], ["Y", "Y_h"], name="lstm", hidden_size=hidden),
        helper.make_node("Squeeze", ["Y_h", "axes0"], ["h"], name="squeeze"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "fc_W"], ["y"], name="fc"),
    ]
    inits.append(_t(np.array([0], np.int64), "axes0"))
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, 1, inp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


REJECTED_MODELS = {
    "sigmoid": (lambda: _mlp_with([("Relu", {}), ("Sigmoid", {})]), [("act1", "Sigmoid")]),
    "tanh": (lambda: _mlp_with([("Tanh", {})]), [("act0", "Tanh")]),
    "middle_softmax": (lambda: _mlp_with([("Softmax", {"axis": 1}), ("Relu", {})]), [("act0", "Softmax")]),
    "lstm": (_lstm_model, [("lstm", "LSTM")]),
}


@pytest.mark.parametrize("name", list(REJECTED_MODELS))
def test_rejected_models(tmp_path, name):
    build, expected = REJECTED_MODELS[name]
    path = _save(build(), tmp_path / f"{name}.onnx")
    _ort_run(
        path,
        {"x": np.ones([d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim], np.float32)},
    )  # a valid model
    result = onnxlip.check(path)
    assert not result.supported
    assert [(e.node, e.op) for e in result.errors] == expected
    assert all(e.reason for e in result.errors)
    with pytest.raises(onnxlip.UnsupportedModelError) as info:
        onnxlip.path_norm(path)
    assert [(i.node, i.op) for i in info.value.issues] == expected
    for node, op in expected:
        assert node in str(info.value) and op in str(info.value)


def test_all_problems_are_reported_at_once(tmp_path):
    path = _save(_mlp_with([("Sigmoid", {}), ("Relu", {}), ("Tanh", {})]), tmp_path / "two_bad.onnx")
    expected = [("act0", "Sigmoid"), ("act2", "Tanh")]
    result = onnxlip.check(path)
    assert not result.supported
    assert [(e.node, e.op) for e in result.errors] == expected
    with pytest.raises(onnxlip.UnsupportedModelError) as info:
        onnxlip.path_norm(path, 2.0)
    assert [(i.node, i.op) for i in info.value.issues] == expected
    assert "2 unsupported" in str(info.value)
    # the part before the first unsupported node is analysable
    assert onnxlip.path_norm(path, output=["g0"]).path_norm > 0
