"""Small model builders and float64 references shared by the tests (independent of onnxlip's code)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, inits, opset: int = 17, ir_version: int = 10) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def gemm_chain(weights: list[np.ndarray], biases: list[np.ndarray], relu: bool = True) -> onnx.ModelProto:
    """x -> Gemm -> Relu -> ... -> Gemm (no Relu after the last), weights W_i of shape (in, out), float32."""
    nodes, inits = [], []
    x = "x"
    for i, (w, b) in enumerate(zip(weights, biases)):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"W{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
        ]
        y = f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [y], name=f"gemm{i}"))
        x = y
        if relu and i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weights[0].shape[0]])
    out = helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", weights[-1].shape[1]])
    return make_model(nodes, [inp], [out], inits)


def chain_log10_pathnorm(weights, biases, q: float = 1.0) -> float:
    """log10 sum_p |Phi_p|^q of a Gemm chain, float64 with a running log-scale (no overflow at any depth)."""
    v = np.ones(weights[0].shape[0])
    log_scale = 0.0
    for w, b in zip(weights, biases):
        w32, b32 = (
            np.abs(w.astype(np.float32).astype(np.float64)) ** q,
            np.abs(b.astype(np.float32).astype(np.float64)) ** q,
        )
        v = v @ w32 + b32 * math.exp(-log_scale) if b32.any() and log_scale < 700 else v @ w32
        top = v.max()
        v /= top
        log_scale += math.log(top)
    return (math.log(v.sum()) + log_scale) / math.log(10)


def chain_forward_backward(weights, biases):
    """Companion forward values a (per layer input) and adjoint values g (per layer output), float64."""
    ws = [np.abs(w.astype(np.float32).astype(np.float64)) for w in weights]
    bs = [np.abs(b.astype(np.float32).astype(np.float64)) for b in biases]
    acts = [np.ones(ws[0].shape[0])]
    for w, b in zip(ws, bs):
        acts.append(acts[-1] @ w + b)
    grads = [np.ones(ws[-1].shape[1])]
    for w in reversed(ws):
        grads.append(w @ grads[-1])
    grads = list(reversed(grads))  # grads[i] = adjoint at the input of layer i; grads[i+1] at its output
    return acts, grads


def sklearn_digits_classifier(path, options=None, **mlp_kwargs):
    """An MLPClassifier trained on scikit-learn's digits (pixels / 16) and exported by skl2onnx to `path`:
    (classifier, path as str, inputs). Skips the test where scikit-learn or skl2onnx is missing."""
    import warnings

    import pytest

    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(**mlp_kwargs).fit(x, y)
    model = to_onnx(clf, x[:1], target_opset={"": 17, "ai.onnx.ml": 1}, options=options or {})
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, str(path))
    return clf, str(path), x
