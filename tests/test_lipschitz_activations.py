"""The lipschitz-only import mode: a 1-Lipschitz network (orthogonal / certified-norm-normalised dense and conv
layers with MaxMin or GroupSort, seeds 003-004) certifies at most 1 + 1e-3 in l2 and its lower bound comes close;
Tanh/Sigmoid/Abs carry their constants; bound/scores keep refusing them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip import opnorm
from onnxlip.lipschitz import lipschitz
from tests.helpers import make_model


def _orth(rng, n):
    return np.linalg.qr(rng.normal(size=(n, n)))[0].astype(np.float32)


def _maxmin(nodes, x, tag, axis=1):
    a, b = f"{tag}_a", f"{tag}_b"
    nodes += [
        helper.make_node("Split", [x], [a, b], axis=axis, num_outputs=2),
        helper.make_node("Max", [a, b], [f"{tag}_max"]),
        helper.make_node("Min", [a, b], [f"{tag}_min"]),
        helper.make_node("Concat", [f"{tag}_max", f"{tag}_min"], [f"{tag}_out"], axis=axis),
    ]
    return f"{tag}_out"


def _dense_maxmin_net(seed=0, width=8, depth=3):
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        inits += [
            numpy_helper.from_array(_orth(rng, width), f"W{i}"),
            numpy_helper.from_array(rng.normal(size=width).astype(np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [f"h{i}"]))
        x = _maxmin(nodes, f"h{i}", f"mm{i}") if i < depth - 1 else f"h{i}"
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])],
        inits,
        opset=18,
    )


def _conv_groupsort_net(seed=0):
    """1x1 orthogonal conv -> MaxMin over channels -> 3x3 conv normalised by its certified norm -> GroupSort
    (TopK within groups of 2 channels) -> Flatten -> orthogonal Gemm."""
    rng = np.random.default_rng(seed)
    w1 = _orth(rng, 4).reshape(4, 4, 1, 1)
    w2 = rng.normal(size=(4, 4, 3, 3))
    w2 = (w2 / opnorm.conv_norm_certified(w2, (5, 5), (1, 1), (1, 1, 1, 1), (1, 1), 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(_orth(rng, 100), "fc"),
        numpy_helper.from_array(np.array([1, 2, 2, 5, 5], np.int64), "g"),
        numpy_helper.from_array(np.array([1, 4, 5, 5], np.int64), "back"),
        numpy_helper.from_array(np.array([2], np.int64), "k"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"])]
    mm = _maxmin(nodes, "c1", "mm")
    nodes += [
        helper.make_node("Conv", [mm, "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "g"], ["grp"]),
        helper.make_node("TopK", ["grp", "k"], ["sorted", "idx"], axis=2),
        helper.make_node("Reshape", ["sorted", "back"], ["gs"]),
        helper.make_node("Flatten", ["gs"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
        inits,
        opset=18,
    )


def test_dense_maxmin_network_certifies_one_and_the_lower_bound_comes_close():
    model = _dense_maxmin_net()
    result = lipschitz(model, "2", lower_seconds=1.0)
    assert result.upper.certified and result.upper.value <= 1 + 1e-3
    assert result.upper.method.startswith("AutoLip")
    # orthogonal layers and MaxMin preserve norms; the search maximises over ~1e5 float32 evaluations of the model,
    # whose rounding (~1e-5 relative) can lift an observed ratio that much above the exact network's constant
    assert 0.99 <= result.lower["value"] <= result.upper.value * (1 + 1e-4)


def test_conv_groupsort_network_certifies_one():
    model = _conv_groupsort_net()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((1, 4, 5, 5), np.float32)})[0].shape == (1, 100)
    result = lipschitz(model, "2", per_layer=True, lower_seconds=1.0)
    assert result.upper.value <= 1 + 1e-3
    assert 0.5 < result.lower["value"] <= result.upper.value


def _two_layers(seed: int, activation):
    """x (1x6) -> MatMul w1 -> activation -> MatMul w2 (5x3), and the two weights."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), activation, helper.make_node("MatMul", ["a", "w2"], ["y"])]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return model, w1, w2


@pytest.mark.parametrize("op,constant", [("Tanh", 1.0), ("Sigmoid", 0.25), ("Abs", 1.0)])
def test_monotone_and_abs_activations_carry_their_constants(op, constant):
    model, w1, w2 = _two_layers(0, helper.make_node(op, ["h"], ["a"]))
    result = lipschitz(model, "2", lower_seconds=0.5)
    expected = (
        np.linalg.svd(w1.astype(np.float64), compute_uv=False)[0]
        * constant
        * np.linalg.svd(w2.astype(np.float64), compute_uv=False)[0]
    )
    assert result.upper.value == pytest.approx(expected, rel=1e-6)
    assert 0 < result.lower["value"] <= result.upper.value
    if op == "Abs":  # a ReLU fragment, ReLU(x) + ReLU(-x): the path-norm bounds exist too
        assert lipschitz(model, "inf", lower_seconds=0.2).upper.value > 0
        assert onnxlip.bound(model, model, samples=0).bound == 0
        return
    with pytest.raises(onnxlip.UnsupportedModelError):
        onnxlip.bound(model, model, samples=0)
    with pytest.raises(onnxlip.OnnxlipError, match="--norm 2"):
        lipschitz(model, "inf")


@pytest.mark.parametrize("alpha", [-2.0, -0.5, 0.3, 2.5])
def test_leaky_relu_slope_sets_its_lipschitz_constant(alpha):
    """LeakyRelu(alpha) has slopes 1 and alpha: the l2 bound carries max(1, |alpha|) between the layer norms, and
    the sampled lower bound stays below it."""
    model, w1, w2 = _two_layers(1, helper.make_node("LeakyRelu", ["h"], ["a"], alpha=alpha))
    result = lipschitz(model, "2", lower_seconds=0.3)
    norms = [np.linalg.svd(w.astype(np.float64), compute_uv=False)[0] for w in (w1, w2)]
    assert result.upper.value == pytest.approx(norms[0] * max(1.0, abs(alpha)) * norms[1], rel=1e-6)
    assert 0 < result.lower["value"] <= result.upper.value * (1 + 1e-4)


def test_torch_exported_one_lipschitz_network_certifies_one(tmp_path):
    """An orthogonal-weight MLP with MaxMin (x.view(B, -1, 2) max/min), exported by torch.onnx."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from torch import nn

    class MaxMin(nn.Module):
        def forward(self, x):
            pairs = x.view(x.shape[0], -1, 2)
            out = torch.cat([pairs.max(-1, keepdim=True).values, pairs.min(-1, keepdim=True).values], -1)
            return out.view(x.shape[0], -1)

    torch.manual_seed(0)
    layers = []
    for i in range(3):
        lin = nn.Linear(8, 8)
        with torch.no_grad():
            lin.weight.copy_(torch.linalg.qr(torch.randn(8, 8))[0])
        layers += [lin] + ([MaxMin()] if i < 2 else [])
    net = nn.Sequential(*layers).eval()
    path = tmp_path / "lip1.onnx"
    torch.onnx.export(net, (torch.randn(1, 8),), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    result = lipschitz(path, "2", lower_seconds=1.0)
    assert result.upper.value <= 1 + 1e-3
    assert 0.99 <= result.lower["value"] <= result.upper.value * (1 + 1e-4)
    # MaxMin via ReduceMax/ReduceMin is a ReLU network too: the path-metric still works on it
    assert onnxlip.path_norm(path).path_norm > 0


def test_torch_exported_one_lipschitz_conv_network_certifies_one(tmp_path):
    """Orthogonal 1x1 convolutions (norm-preserving) with MaxMin over channel pairs, then a spectrally normalised
    3x3 convolution (divided by its certified norm), exported by torch.onnx."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from torch import nn

    class ChannelMaxMin(nn.Module):
        def forward(self, x):
            b, c, h, w = x.shape
            pairs = x.view(b, c // 2, 2, h, w)
            return torch.cat([pairs.max(2, keepdim=True).values, pairs.min(2, keepdim=True).values], 2).view(b, c, h, w)

    torch.manual_seed(1)
    convs = []
    for _ in range(2):
        conv = nn.Conv2d(6, 6, 1, bias=True)
        with torch.no_grad():
            conv.weight.copy_(torch.linalg.qr(torch.randn(6, 6))[0].view(6, 6, 1, 1))
        convs += [conv, ChannelMaxMin()]
    last = nn.Conv2d(6, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        w = last.weight.double().numpy()
        last.weight.copy_(torch.from_numpy(w / opnorm.conv_norm_certified(w, (5, 5), (1, 1), (1, 1, 1, 1), (1, 1), 1)))
    net = nn.Sequential(*convs, last).eval()
    path = tmp_path / "lipconv.onnx"
    torch.onnx.export(net, (torch.randn(1, 6, 5, 5),), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    result = lipschitz(path, "2", per_layer=True, lower_seconds=1.0)
    assert result.upper.value <= 1 + 1e-3
    assert 0.5 < result.lower["value"] <= result.upper.value * (1 + 1e-4)
    without_last = lipschitz(path, "2", output=[_input_of_last_conv(path)], lower_seconds=1.0)
    assert without_last.upper.value <= 1 + 1e-3 and without_last.lower["value"] >= 0.99  # norm-preserving part


def _input_of_last_conv(path):
    import onnx

    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    return convs[-1].input[0]


@pytest.mark.parametrize("alpha,beta", [(0.2, 0.5), (2.5, -0.3)])
def test_hardsigmoid_is_a_relu_fragment_of_slope_alpha(alpha, beta):
    """HardSigmoid = alpha ReLU(x - t1) - alpha ReLU(x - t2): its l2 constant is alpha times the layer's norm, and
    the path-metric reads it (it was refused everywhere)."""
    w = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("HardSigmoid", ["h"], ["y"], alpha=alpha, beta=beta),
    ]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])]
    model = make_model(
        nodes,
        io,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "W")],
    )
    result = onnxlip.lipschitz(model, "2", lower_seconds=0.3)
    assert result.upper.value == pytest.approx(
        alpha * np.linalg.svd(w.astype(np.float64), compute_uv=False)[0], rel=1e-6
    )
    assert 0 < result.lower["value"] <= result.upper.value * (1 + 1e-4)
    # ||Phi||_1 of the fragment: alpha |w| per input edge pair, and the bias paths |beta| + |1 - beta| per output
    want = 2 * alpha * np.abs(w.astype(np.float64)).sum() + 2 * (abs(beta) + abs(1 - beta))
    assert onnxlip.path_norm(model).path_norm == pytest.approx(want, rel=1e-6)
    bad = make_model(
        [nodes[0], helper.make_node("HardSigmoid", ["h"], ["y"], alpha=-0.2)],
        io,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "W")],
    )
    with pytest.raises(onnxlip.UnsupportedModelError, match="alpha"):
        onnxlip.path_norm(bad)


@pytest.mark.parametrize("act", ["Abs", "Clip", "Relu"])
def test_a_0d_output_after_a_fragment_gets_the_bounds_of_its_1d_twin(act):
    """The adjoint's all-ones seed at a 0-d output was the shared scalar constant 1.0, which range_guard reads as
    a multiplier: after a fragment with gain != 1 (Abs, Clip) the lipschitz run failed (a TypeError, or in the CLI
    onnxruntime's Reshape error). A ReduceSum with keepdims=0 or 1 computes the same function: same bounds."""
    rng = np.random.default_rng(2)
    w, c = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)

    def model(keepdims):
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "c"], ["hc"]),
            helper.make_node(act, ["hc", "lo"] if act == "Clip" else ["hc"], ["a"]),
            helper.make_node("ReduceSum", ["a"], ["y"], keepdims=keepdims),
        ]
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(c, "c")]
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "lo")] if act == "Clip" else []
        return make_model(
            nodes,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            inits,
        )

    for norm in ("1", "inf", "2"):
        flat, kept = (lipschitz(model(k), norm, lower_seconds=0.1) for k in (0, 1))
        assert flat.upper.value == pytest.approx(kept.upper.value, rel=1e-12)
        assert 0 < flat.lower["value"] <= flat.upper.value * (1 + 1e-4)
    assert onnxlip.scores(model(0)).log10_path_norm == pytest.approx(onnxlip.path_norm(model(1)).log10_path_norm)
