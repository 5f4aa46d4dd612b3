"""Weight-only quantized models: DequantizeLinear of constant weights is folded with onnxruntime's arithmetic
(bit for bit, at every opset and layout), and the folded network's path-norm and bounds are right; quantized
activations are rejected with the node named."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.dequantize import fold_dequantize
from tests import oracle
from tests.helpers import make_model
from tests.test_bad_input import cli

_INFO = np.iinfo


def _ort_dequantize(x, scale, zero, opset: int, **attrs) -> np.ndarray:
    """onnxruntime's own DequantizeLinear of constants: the oracle."""
    names = ["x", "s"] + (["z"] if zero is not None else [])
    inits = [numpy_helper.from_array(a, n) for a, n in zip((x, scale, zero), names)]
    node = helper.make_node("DequantizeLinear", names, ["y"], **attrs)
    y_type = helper.np_dtype_to_tensor_dtype(scale.dtype)
    model = make_model([node], [], [helper.make_tensor_value_info("y", y_type, None)], inits, opset=opset)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


def _case(dtype, layout: str, with_zero: bool, scale_dtype=np.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    info = _INFO(dtype)
    lo, hi = max(info.min, -(2**30)), min(info.max, 2**30)
    x = rng.integers(lo, hi, size=(6, 10), endpoint=True).astype(dtype)
    attrs = {}
    if layout == "tensor":
        shape = ()
    elif layout in ("axis0", "axis-1"):
        axis = 0 if layout == "axis0" else -1
        shape, attrs = (x.shape[axis],), {"axis": axis}
    else:  # blocks of 4 along axis 1 (10 = 4 + 4 + 2)
        shape, attrs = (6, 3), {"axis": 1, "block_size": 4}
    # scales of every magnitude, with long mantissas: products that round
    scale = (rng.uniform(0.5, 1.0, size=shape) * 2.0 ** rng.integers(-30, 10, size=shape)).astype(scale_dtype)
    zero = rng.integers(max(info.min, -100), min(info.max, 100), size=shape, endpoint=True).astype(dtype)
    if dtype == np.int32:
        zero = np.zeros(shape, dtype)  # onnxruntime requires a zero zero-point for int32
    return x, scale, zero if with_zero else None, attrs


CASES = [
    (np.int8, "tensor", True, np.float32, 10),
    (np.uint8, "tensor", True, np.float32, 10),
    (np.int8, "tensor", False, np.float32, 10),
    (np.int8, "axis0", True, np.float32, 13),
    (np.uint8, "axis-1", True, np.float32, 13),
    (np.int32, "axis0", False, np.float32, 13),
    (np.int8, "tensor", True, np.float16, 19),
    (np.int16, "axis0", True, np.float32, 21),
    (np.uint16, "tensor", True, np.float32, 21),
    (np.int8, "blocks", True, np.float32, 21),
    (np.uint8, "blocks", False, np.float16, 21),
]


@pytest.mark.parametrize("dtype, layout, with_zero, scale_dtype, opset", CASES)
def test_fold_equals_onnxruntime_bit_for_bit(dtype, layout, with_zero, scale_dtype, opset):
    for seed in range(3):
        x, scale, zero, attrs = _case(dtype, layout, with_zero, scale_dtype, seed)
        expected = _ort_dequantize(x, scale, zero, opset, **attrs)
        names = ["x", "s"] + (["z"] if zero is not None else [])
        node = helper.make_node("DequantizeLinear", names, ["y"], **attrs)
        consts = dict(zip(names, (x, scale, zero)))
        (got,) = fold_dequantize(node, consts)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


def test_fold_leaves_what_it_does_not_know_to_others():
    x, scale = np.arange(6, dtype=np.int8).reshape(2, 3), np.float32(0.5)
    node = helper.make_node("DequantizeLinear", ["x", "s"], ["y"], output_dtype=TensorProto.FLOAT16)
    assert fold_dequantize(node, {"x": x, "s": scale}) is None
    node = helper.make_node("DequantizeLinear", ["x", "s"], ["y"], axis=0)
    assert fold_dequantize(node, {"x": x, "s": np.ones(3, np.float32)}) is None  # 3 scales for an axis of 2
    assert fold_dequantize(node, {"x": x.astype(np.float32), "s": scale}) is None  # not an integer tensor


# ---- weight-only quantized networks ----------------------------------------------------------------------------
def _float_cnn(seed: int = 0) -> tuple[dict[str, np.ndarray], list]:
    rng = np.random.default_rng(seed)
    w = {
        "conv.weight": rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.1, 4).astype(np.float32),
        "fc.weight": rng.normal(0, 0.5, (3, 4 * 2 * 2)).astype(np.float32),
        "fc.bias": rng.normal(0, 0.1, 3).astype(np.float32),
    }
    return w, rng


def _cnn(
    weights: dict[str, np.ndarray], quantized: bool, act_quant: bool = False, float_fc: bool = False
) -> onnx.ModelProto:
    """x (1, 2, 4, 4) -> Conv 3x3 stride 2 pad 1 -> Relu -> Flatten -> Gemm; with `quantized`, the conv weight is
    int8 per output channel (axis 0) and the fc weight uint8 per tensor with a zero point, each behind a
    DequantizeLinear, as weight-only quantizers write them; `act_quant` also quantizes the conv's output, as static
    quantization does; `float_fc` keeps the fc weight in float."""
    nodes, inits = [], []
    conv_w, fc_w = "conv.weight", "fc.weight"
    if quantized:
        w = weights["conv.weight"]
        step = np.abs(w).reshape(4, -1).max(axis=1) / 127
        q = np.clip(np.round(w / step[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [
            numpy_helper.from_array(q, "conv.weight_q"),
            numpy_helper.from_array(step.astype(np.float32), "conv.weight_scale"),
            numpy_helper.from_array(np.zeros(4, np.int8), "conv.weight_zp"),
        ]
        nodes.append(
            helper.make_node(
                "DequantizeLinear", ["conv.weight_q", "conv.weight_scale", "conv.weight_zp"], ["conv_w"], axis=0
            )
        )
        conv_w = "conv_w"
    if quantized and not float_fc:
        f = weights["fc.weight"]
        fstep = np.float32((f.max() - f.min()) / 255)
        fzero = np.uint8(np.round(-f.min() / fstep))
        fq = np.clip(np.round(f / fstep) + fzero, 0, 255).astype(np.uint8)
        inits += [
            numpy_helper.from_array(fq, "fc.weight_q"),
            numpy_helper.from_array(fstep, "fc.weight_scale"),
            numpy_helper.from_array(np.array(fzero, np.uint8), "fc.weight_zp"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["fc.weight_q", "fc.weight_scale", "fc.weight_zp"], ["fc_w"]))
        fc_w = "fc_w"
    inits += [
        numpy_helper.from_array(weights[n], n)
        for n, used in (("conv.weight", conv_w), ("fc.weight", fc_w))
        if n == used
    ]
    inits += [numpy_helper.from_array(weights[n], n) for n in ("conv.bias", "fc.bias")]
    nodes.append(helper.make_node("Conv", ["x", conv_w, "conv.bias"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]))
    if act_quant:
        inits += [numpy_helper.from_array(np.float32(0.05), "a_s"), numpy_helper.from_array(np.uint8(128), "a_z")]
        nodes += [
            helper.make_node("QuantizeLinear", ["c", "a_s", "a_z"], ["c_q"], name="act_quant"),
            helper.make_node("DequantizeLinear", ["c_q", "a_s", "a_z"], ["c_dq"], name="act_dequant"),
        ]
    nodes += [
        helper.make_node("Relu", ["c_dq" if act_quant else "c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", fc_w, "fc.bias"], ["y"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]
    return make_model(nodes, inputs, outputs, inits, opset=13)


def _dequantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float weights onnxruntime computes from the quantized ones (the oracle for the fold)."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            x, s, z = (consts[n] for n in node.input)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            out[node.output[0]] = _ort_dequantize(x, s, z, 13, **attrs)
    return {"conv.weight": out["conv_w"], "fc.weight": out["fc_w"]}


def test_weight_only_quantized_cnn(tmp_path):
    weights, rng = _float_cnn()
    qdq = _cnn(weights, quantized=True)
    onnx.save(qdq, str(tmp_path / "q.onnx"))
    onnx.save(_cnn(weights, quantized=False), str(tmp_path / "f.onnx"))
    deq = {**weights, **_dequantized_weights(qdq)}
    onnx.save(_cnn(deq, quantized=False), str(tmp_path / "d.onnx"))

    # the float network with onnxruntime's dequantized weights computes what the quantized file computes (to
    # float32 rounding: onnxruntime's optimiser treats the two files differently)
    xs = rng.uniform(-1, 1, (8, 1, 2, 4, 4)).astype(np.float32)
    run_q, run_d = (oracle.session(str(tmp_path / n)) for n in ("q.onnx", "d.onnx"))
    for x in xs:
        np.testing.assert_allclose(run_q.run(None, {"x": x})[0], run_d.run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)

    # path-norm against path enumeration of the quantized file itself (the oracle folds with onnxruntime)
    got = onnxlip.path_norm(tmp_path / "q.onnx", device="cpu")
    assert got.path_norm == pytest.approx(oracle.path_norm(str(tmp_path / "q.onnx")), rel=1e-6)
    assert got.log10_path_norm == onnxlip.path_norm(tmp_path / "d.onnx", device="cpu").log10_path_norm

    # the bound between the float model and its quantized export is the one for the dequantized weights, and holds
    b = onnxlip.bound(tmp_path / "f.onnx", tmp_path / "q.onnx", samples=256, device="cpu")
    ref = onnxlip.bound(tmp_path / "f.onnx", tmp_path / "d.onnx", samples=0, device="cpu")
    assert b.log10_bound == ref.log10_bound and b.changed_parameters == ref.changed_parameters > 0
    assert b.path_metric >= oracle.path_metric(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx")) * (1 - 1e-6)
    assert 0 < b.observed_max_l1_diff <= b.bound

    # the CLI: `check` accepts it, scores are keyed by the user's names and say where a folded weight comes from
    code, out, _ = cli("check", tmp_path / "q.onnx", "--json")
    assert code == 0 and json.loads(out)["supported"] and json.loads(out)["ops"]["DequantizeLinear"] == 2
    s = onnxlip.scores(tmp_path / "q.onnx", device="cpu")
    assert {"conv_w", "fc_w"} <= set(s.tensors)
    assert set(s.tensors["conv_w"].sources) >= {"conv.weight_q", "conv.weight_scale"}


def test_quantized_activations_are_rejected_with_the_nodes_named(tmp_path):
    weights, _ = _float_cnn()
    model = _cnn(weights, quantized=True, act_quant=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "static.onnx"))
    oracle.session(str(tmp_path / "static.onnx"))  # a valid model onnxruntime runs
    code, out, err = cli("check", tmp_path / "static.onnx", "--json")
    errors = json.loads(out)["errors"]
    assert code == 2 and {e["node"] for e in errors} >= {"act_quant", "act_dequant"}
    assert any("quantized activation" in e["reason"] for e in errors)
    code, _, err = cli("bound", tmp_path / "static.onnx", tmp_path / "static.onnx")
    assert code == 2 and "act_dequant" in err and "Traceback" not in err


def test_pruning_leaves_quantized_weights_and_says_so(tmp_path):
    weights, _ = _float_cnn()
    onnx.save(_cnn(weights, quantized=True), str(tmp_path / "q.onnx"))
    code, _, err = cli("prune", tmp_path / "q.onnx", "--sparsity", "0.5", "-o", tmp_path / "p.onnx")
    assert code == 2 and "no prunable weights" in err and "conv_w" in err and "fc_w" in err
    onnx.save(_cnn(weights, quantized=True, float_fc=True), str(tmp_path / "half.onnx"))
    r = onnxlip.prune(tmp_path / "half.onnx", 0.5, out_path=tmp_path / "p.onnx", device="cpu")
    assert r.prunable_entries == weights["fc.weight"].size and "conv_w" in r.notes[0]
    pruned = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "half.onnx")).graph.initializer}
    assert np.array_equal(pruned["conv.weight_q"], original["conv.weight_q"])  # the quantized weights stay
    assert np.count_nonzero(pruned["fc.weight"] == 0) == r.pruned_entries
