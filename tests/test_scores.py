"""Path-magnitude scores (theory.md section 4) against independent routes: score_i equals the exact path-metric
between the model and the model with entry i zeroed; layer sums equal the path-norm in bias-free chains;
rescaling changes no score; torch autograd of the float64 companion agrees (when torch is installed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxlip
from onnxlip.scores import scores
from tests import dag_factory as F
from tests.helpers import chain_forward_backward, gemm_chain


def _zeroed(model: onnx.ModelProto, name: str, flat_index: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init).copy()
            arr.flat[flat_index] = 0
            init.CopyFrom(numpy_helper.from_array(arr, name))
    return out


def _check_against_zeroed_entries(spec: F.Spec, rng: np.random.Generator, per_tensor: int = 3) -> int:
    result = scores(spec.model)
    inits = {i.name: numpy_helper.to_array(i) for i in spec.model.graph.initializer}
    checked = 0
    for name, t in result.tensors.items():
        if t.folded or name not in spec.params or inits[name].shape != t.shape:
            continue  # folded tensors have no single original entry to zero
        for flat in rng.choice(inits[name].size, size=min(per_tensor, inits[name].size), replace=False):
            expected = onnxlip.path_metric(spec.model, _zeroed(spec.model, name, int(flat)))
            got = result.absolute(name).flat[int(flat)]
            assert expected.exact
            assert got == pytest.approx(expected.path_metric, rel=2e-6, abs=1e-12 * 10**result.log10_path_norm)
            checked += 1
    return checked


@pytest.mark.parametrize("family", sorted(F.FAMILIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_score_equals_metric_to_the_model_with_that_entry_zeroed(family, seed):
    assert _check_against_zeroed_entries(F.build(family, seed), np.random.default_rng(seed)) > 0


def _conv_geometry_model(kind: str) -> F.Spec:
    """1x1 conv -> Relu -> the layer under test -> Relu -> 3x3 conv -> Relu -> Gemm: the weight-gradient of the
    middle layer sees non-uniform activations and adjoints."""
    b = F.Builder(np.random.default_rng(list(GEOMETRIES).index(kind)), "geometry")
    spatial, c_in, layer = GEOMETRIES[kind]
    h = b.relu(b.conv(b.input(c_in, *spatial), c_in, (1,) * len(spatial)))
    h = b.relu(layer(b, h))
    h = b.relu(b.conv(h, 2, (3,) * len(spatial), pads=[1] * 2 * len(spatial)))
    return b.spec(b.gemm(b.flatten(h), 2))


def _conv_transpose(b, h, c_out, kernel, **attrs):
    c_in = b.shape(h)[0]
    w = b.weight(c_in, c_out // attrs.get("group", 1), *kernel, scale=0.8)
    return b.op("ConvTranspose", [h, w, b.bias(c_out)], kernel_shape=list(kernel), **attrs)


GEOMETRIES = {  # spatial, input channels, layer
    "stem 7x7 stride 2": ((17, 15), 3, lambda b, h: b.conv(h, 4, (7, 7), strides=[2, 2], pads=[3, 2, 3, 1])),
    "stride and dilation": ((11, 12), 4, lambda b, h: b.conv(h, 6, (3, 2), strides=[2, 3], dilations=[2, 1])),
    "grouped": ((9, 9), 6, lambda b, h: b.conv(h, 4, (3, 3), strides=[2, 1], pads=[1, 0, 1, 1], group=2)),
    "grouped, one output per group": ((7, 8), 6, lambda b, h: b.conv(h, 3, (2, 3), pads=[0, 1, 1, 1], group=3)),
    "depthwise x2": ((9, 8), 3, lambda b, h: b.conv(h, 6, (3, 3), strides=[2, 2], dilations=[2, 1], group=3)),
    "1-D": ((19,), 3, lambda b, h: b.conv(h, 4, (3,), strides=[3], pads=[2, 0], dilations=[2])),
    "3-D": ((5, 6, 4), 2, lambda b, h: b.conv(h, 3, (2, 3, 2), strides=[2, 1, 1], pads=[1, 0, 1, 0, 1, 0])),
    "transpose dilated": (
        (4, 5),
        4,
        lambda b, h: _conv_transpose(
            b, h, 4, (3, 2), strides=[2, 3], dilations=[2, 1], pads=[1, 0, 0, 1], output_padding=[1, 2], group=2
        ),
    ),
    "transpose 1-D": ((6,), 2, lambda b, h: _conv_transpose(b, h, 3, (4,), strides=[2], pads=[1, 2])),
}


@pytest.mark.parametrize("kind", list(GEOMETRIES))
def test_conv_weight_scores_over_geometries(kind):
    """Strided + dilated, grouped, depthwise with a channel multiplier, 1-D and 3-D convs, stems (7x7 stride 2)
    and dilated ConvTranspose with output_padding, against the same zeroed-entry oracle."""
    assert _check_against_zeroed_entries(_conv_geometry_model(kind), np.random.default_rng(7), per_tensor=4) > 0


def test_layer_scores_sum_to_the_path_norm_in_a_bias_free_chain():
    rng = np.random.default_rng(3)
    ws = [rng.normal(size=(5, 7)), rng.normal(size=(7, 6)), rng.normal(size=(6, 3))]
    bs = [np.zeros(7), np.zeros(6), np.zeros(3)]
    model = gemm_chain(ws, bs)
    result = scores(model)
    norm = 10**result.log10_path_norm
    for i in range(3):
        assert result.absolute(f"W{i}").sum() == pytest.approx(norm, rel=1e-6)
    acts, grads = chain_forward_backward(ws, bs)
    expected = np.abs(ws[1].astype(np.float32)) * np.outer(acts[1], grads[2])
    assert np.allclose(result.absolute("W1"), expected, rtol=1e-6)


def test_scores_survive_huge_norms():
    rng = np.random.default_rng(4)
    ws = [rng.uniform(2, 4, size=(4, 4)) for _ in range(400)]
    bs = [np.zeros(4) for _ in range(400)]
    result = scores(gemm_chain(ws, bs))
    assert result.log10_path_norm > 308
    for i in (0, 199, 399):
        t = result.tensors[f"W{i}"]
        assert t.relative.sum() == pytest.approx(1.0, rel=1e-5)  # every path crosses every layer
        assert t.log10_sum == pytest.approx(result.log10_path_norm, abs=1e-5)


@pytest.mark.parametrize("family", sorted(F.FAMILIES)[:6])
def test_comparable_arrays_are_the_relative_scores_exactly(family):
    """The selection arrays pruning sorts are the float32 mantissas times integer powers of two, exactly: their
    order is the order of the relative scores."""
    result = scores(F.build(family, 0).model)
    names = list(result.tensors)
    values, log2_factor = result.comparable(names)
    for n in names:
        t = result.tensors[n]
        assert values[n].shape == t.shape and values[n].dtype == np.float32
        drop = t.shift - log2_factor
        assert drop == pytest.approx(round(drop), abs=1e-9)
        np.testing.assert_array_equal(values[n], np.ldexp(t.mantissa.astype(np.float64), round(drop)))
        np.testing.assert_allclose(values[n].astype(np.float64) * 2.0**log2_factor, t.relative, rtol=1e-15, atol=0)


def test_comparable_falls_back_to_float64_when_float32_would_underflow():
    from onnxlip.scores import ScoresResult, TensorScores

    big = TensorScores("a", (3,), 0.0, 0.0, np.array([1.0, 0.5, 0.0], np.float32), -1.0, ("a",))
    far = TensorScores("b", (2,), 0.0, 0.0, np.array([1.0, 2.0**-20], np.float32), -1.0 - 120, ("b",))
    result = ScoresResult(0.0, ["y"], "cpu", {"a": big, "b": far})
    values, log2_factor = result.comparable(["a", "b"])
    assert log2_factor == 0.0 and values["b"].dtype == np.float64  # 2**-20 * 2**-120 is below float32's range
    assert values["b"][1] == 2.0**-141
    near = TensorScores("b", (2,), 0.0, 0.0, np.array([1.0, 2.0**-2], np.float32), -1.0 - 120, ("b",))
    result.tensors["b"] = near
    values, log2_factor = result.comparable(["a", "b"])
    assert log2_factor == -1.0 and values["b"].dtype == np.float32 and values["b"][1] == np.float32(2.0**-122)


def test_all_zero_score_tensors_keep_the_float32_selection_arrays():
    """A parameter tensor that is all zero (here conv1's folded weights, through a BatchNorm scale of 0) scores 0
    with the companion's ZERO_EXPONENT: it must neither set the common scale nor push the other tensors to the
    float64 fallback."""
    model = onnx.load("models/digits_cnn.onnx")
    for t in model.graph.initializer:
        if t.name == "bn.scale":
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    result = scores(model, device="cpu")
    assert not result.tensors["conv1.weight"].mantissa.any()
    assert not result.tensors["conv1.weight"].relative.any()
    values, log2_factor = result.comparable(list(result.tensors))
    assert all(v.dtype == np.float32 for v in values.values())
    for n, t in result.tensors.items():
        np.testing.assert_allclose(values[n].astype(np.float64) * 2.0**log2_factor, t.relative, rtol=1e-15, atol=0)
    assert max(float(v.max()) for v in values.values()) * 2.0**log2_factor > 1e-3  # the live tensors set the scale


def test_scores_through_neg_and_mean():
    """Residual family seed 2 has a Neg before a ReLU (seeds 0-1 a Mean of branches): scores still equal the
    exact metric to the model with that entry zeroed."""
    for seed in (0, 2):
        spec = F.build("residual", seed)
        ops = {n.op_type for n in spec.model.graph.node}
        assert ops & {"Neg", "Mean"}
        assert _check_against_zeroed_entries(spec, np.random.default_rng(seed)) > 0


def _faint_branch_model(depth: int = 20, w: float = 1e-20) -> onnx.ModelProto:
    """y = x A + x B_1 ... B_depth: the second branch carries w**depth (1e-400) of the path mass."""
    from onnx import TensorProto, helper

    from tests.helpers import make_model

    nodes = [helper.make_node("Gemm", ["x", "A"], ["ya"])]
    inits = [numpy_helper.from_array(np.ones((1, 1), np.float32), "A")]
    t = "x"
    for i in range(depth):
        nodes.append(helper.make_node("Gemm", [t, f"B{i}"], [f"b{i}"]))
        inits.append(numpy_helper.from_array(np.full((1, 1), w, np.float32), f"B{i}"))
        t = f"b{i}"
    nodes.append(helper.make_node("Add", ["ya", t], ["y"]))
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])]
    return make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)


def test_scores_below_float64s_range_are_kept_in_log10(tmp_path):
    """Every weight of the faint branch scores 1e-400 of the path-norm: `relative` reads 0 there, `log10_relative`
    is exact, and `scores -o` says how many entries its float64 file loses and that --log10 keeps them."""
    import json
    import math

    from tests.test_bad_input import cli

    model = _faint_branch_model()
    exact = 20 * math.log10(float(np.float32(1e-20)))
    result = scores(model)
    for i in range(20):
        t = result.tensors[f"B{i}"]
        assert t.relative[0, 0] == 0.0 and t.below_float64() == 1
        assert t.log10_relative[0, 0] == pytest.approx(exact, abs=1e-6)
    assert result.tensors["A"].below_float64() == 0
    path = tmp_path / "faint.onnx"
    onnx.save(model, str(path))
    code, out, _ = cli("scores", path, "-o", tmp_path / "s.npz", "--json")
    assert code == 0 and any("20 nonzero score(s)" in n and "--log10" in n for n in json.loads(out)["notes"])
    code, out, _ = cli("scores", path, "-o", tmp_path / "l.npz", "--log10", "--json")
    assert code == 0 and json.loads(out)["notes"] == []
    logs = np.load(tmp_path / "l.npz")
    assert logs["B7"][0, 0] == pytest.approx(exact, abs=1e-6) and logs["A"][0, 0] == pytest.approx(0.0, abs=1e-6)
