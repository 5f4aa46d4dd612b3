"""Pairing two models (structure.align_params): parameter-free copies (slices, splits, concats of slices, pads,
transposes, reshapes, selects) pair by what they copy, not by how an exporter wrote them; anything that copies
differently must not pair. The references here are onnxruntime runs of the models themselves."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.errors import MismatchError
from tests.helpers import make_model

SHAPE = [1, 2, 4, 5]


def _model(copy_nodes, inits, copied: str, seed: int = 0):
    """x -> Conv(2->2, 3x3, pad 1) -> Relu -> r -> [copy_nodes: r -> copied] -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    size = 2 * SHAPE[2] * SHAPE[3]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        *copy_nodes,
        helper.make_node("Flatten", [copied], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(size=(2, 2, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(size, 3)).astype(np.float32), "G"),
        *[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
        opset=19,
    )


def _roll(shift: int, end_max: bool):
    """torch.roll along the last axis: Slice + Slice + Concat (ends INT64_MAX as TorchScript writes, or exact)."""
    n = SHAPE[3]
    end = np.iinfo(np.int64).max if end_max else n
    nodes = [
        helper.make_node("Slice", ["r", "s0", "e0", "ax"], ["p0"]),
        helper.make_node("Slice", ["r", "s1", "e1", "ax"], ["p1"]),
        helper.make_node("Concat", ["p1", "p0"], ["rolled"], axis=3),
    ]
    inits = {"s0": [0], "e0": [n - shift], "s1": [n - shift], "e1": [end], "ax": [3]}
    return _model(nodes, {k: np.asarray(v, np.int64) for k, v in inits.items()}, "rolled")


def _wrap_pad_then_crop(shift: int):
    """The same roll as a wrapping Pad (opset 19) cropped by a Slice."""
    n = SHAPE[3]
    nodes = [
        helper.make_node("Pad", ["r", "pads"], ["padded"], mode="wrap"),
        helper.make_node("Slice", ["padded", "s", "e", "ax"], ["rolled"]),
    ]
    inits = {"pads": [0, 0, 0, shift, 0, 0, 0, 0], "s": [0], "e": [n], "ax": [3]}
    return _model(nodes, {k: np.asarray(v, np.int64) for k, v in inits.items()}, "rolled")


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_one_copy_written_three_ways_pairs_with_metric_zero():
    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    models = [_roll(2, True), _roll(2, False), _wrap_pad_then_crop(2)]
    outputs = [_run(m, x) for m in models]
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])  # the same function, as onnxruntime runs it
    for other in models[1:]:
        r = onnxlip.bound(models[0], other, samples=8)
        assert r.path_metric == 0.0 and r.observed_max_l1_diff == 0.0


@pytest.mark.parametrize("other", [lambda: _roll(1, True), lambda: _wrap_pad_then_crop(3), lambda: _model([], {}, "r")])
def test_different_copies_do_not_pair(other):
    with pytest.raises(MismatchError):
        onnxlip.bound(_roll(2, True), other(), samples=0)


def test_split_and_two_slices_pair():
    half = [helper.make_node("Split", ["r", "sizes"], ["a", "b"], axis=1)]
    slices = [
        helper.make_node("Slice", ["r", "z", "one", "ax1"], ["a"]),
        helper.make_node("Slice", ["r", "one", "big", "ax1"], ["b"]),
    ]
    tail = [helper.make_node("Relu", ["b"], ["rb"]), helper.make_node("Concat", ["rb", "a"], ["swapped"], axis=1)]
    ints = {"z": [0], "one": [1], "big": [np.iinfo(np.int64).max], "ax1": [1], "sizes": [1, 1]}
    ints = {k: np.asarray(v, np.int64) for k, v in ints.items()}
    a = _model(half + tail, {"sizes": ints["sizes"]}, "swapped")
    b = _model(slices + tail, {k: v for k, v in ints.items() if k != "sizes"}, "swapped")
    assert onnxlip.bound(a, b, samples=0).path_metric == 0.0
    c = _model(slices + [tail[0], helper.make_node("Concat", ["a", "rb"], ["swapped"], axis=1)], ints, "swapped")
    with pytest.raises(MismatchError):  # the concat's order differs: another function
        onnxlip.bound(a, c, samples=0)


@pytest.mark.parametrize("kernel, pads, pairs", [([4, 5], [0, 0, 0, 0], True), ([4, 4], [0, 0, 0, 0], False)])
def test_a_global_max_pool_pairs_with_reduce_max(kernel, pads, pairs):
    pool = [helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=kernel, pads=pads)]
    reduce = [helper.make_node("ReduceMax", ["r", "axes"], ["m"], keepdims=1)]

    def model(nodes, inits):
        m = _model(nodes, inits, "m")
        size = 2 * (SHAPE[3] - kernel[1] + 1) if nodes is pool else 2
        m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones((size, 3), np.float32), "G"))
        return m

    a = model(pool, {})
    b = model(reduce, {"axes": np.asarray([2, 3], np.int64)})
    if pairs:
        assert onnxlip.bound(a, b, samples=8).path_metric == 0.0
    else:
        with pytest.raises(MismatchError):
            onnxlip.bound(a, b, samples=0)


def _activation_model(node: str, **attrs):
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(size=(2, 4)).astype(np.float32), "W2"),
    ]
    extra = []
    if node == "PRelu":
        extra = ["slope"]
        inits.append(numpy_helper.from_array(np.array([attrs.pop("slope")], np.float32), "slope"))
    nodes = [
        helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1),
        helper.make_node(node, ["h", *extra], ["a"], **attrs),
        helper.make_node("Gemm", ["a", "W2"], ["y"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    return make_model(nodes, [x], [y], inits)


@pytest.mark.parametrize(
    "a, b",
    [
        (("Abs", {}), ("LeakyRelu", {"alpha": -1.0})),
        (("PRelu", {"slope": 0.2}), ("LeakyRelu", {"alpha": 0.2})),
        (("Relu", {}), ("LeakyRelu", {"alpha": 0.0})),
    ],
)
def test_activations_that_are_one_function_pair(a, b):
    """Abs is LeakyRelu(alpha=-1): the same fragment, whose label differs (it was refused on it)."""
    ma, mb = _activation_model(a[0], **a[1]), _activation_model(b[0], **b[1])
    assert onnxlip.bound(ma, mb, samples=0).bound == 0.0


def test_activations_that_differ_do_not_pair():
    with pytest.raises(MismatchError):
        onnxlip.bound(_activation_model("Abs"), _activation_model("LeakyRelu", alpha=-0.5), samples=0)


def test_models_with_different_op_counts_are_refused_naming_where_they_part():
    """An identity Gather (dropped on import) against a permuting one: the message gave only the two counts."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "w2")

    def model(order):
        idx = numpy_helper.from_array(np.array(order, np.int64), "idx")
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gather", ["r", "idx"], ["g"], axis=1),
            helper.make_node("MatMul", ["g", "w2"], ["y"]),
        ]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        return make_model(nodes, [x], [y], [w1, w2, idx])

    with pytest.raises(
        MismatchError, match=r"test 3, test 4; they part at op #2 \(test: 'y' \(MatMul\), test: 'copy of r' \(copy\)\)"
    ):
        onnxlip.path_metric(model([0, 1, 2, 3]), model([1, 0, 2, 3]))
