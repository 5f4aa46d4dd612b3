"""Build the small demo models shipped in models/ (deterministic; numpy, onnx, scikit-learn, skl2onnx only).

    python models/make_models.py

Writes, next to this script:
  digits_mlp.onnx          scikit-learn MLPClassifier (64 -> 64 -> 32 -> 10, ReLU) exported by skl2onnx
  digits_mlp_pruned.onnx   the same graph, 50% of the weight-matrix entries zeroed (global magnitude pruning)
  digits_mlp_int8.onnx     the same graph, weight matrices rounded to symmetric per-tensor int8 (stored as float)
  digits_cnn.onnx          Conv-BN-ReLU-MaxPool-Conv-ReLU-Flatten-Gemm, trained here in plain numpy
  digits_cnn_pruned.onnx   as for the MLP
  digits_cnn_int8.onnx     as for the MLP

All models take pixels scaled to [0, 1] (load_digits pixels divided by 16). The held-out split is
train_test_split(test_size=0.25, random_state=0, stratify=y); its accuracy is printed for every file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
IR_VERSION = 10  # onnxruntime 1.31 refuses the onnx 1.23 default (IR 14)
PRUNE_FRACTION = 0.5

# the logits tensor of the skl2onnx export (the input of its Softmax node); onnxlip needs --output MLP_LOGITS
MLP_LOGITS = "add_result2"
# the weight matrices (pruned / quantized); biases and BatchNorm statistics are left unchanged
MLP_WEIGHTS = ("coefficient", "coefficient1", "coefficient2")
CNN_WEIGHTS = ("conv1.weight", "conv2.weight", "fc.weight")


# ---- data ---------------------------------------------------------------------------------------------------
def load_data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)


# ---- variants: only initializer values change -----------------------------------------------------------------
def _initializers(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    found = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer if init.name in names}
    missing = set(names) - set(found)
    if missing:
        raise RuntimeError(f"initializers {sorted(missing)} not found in the model")
    return found


def with_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with the given initializers replaced (same names, shapes and dtypes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in values:
            old = numpy_helper.to_array(init)
            new = np.asarray(values[init.name], dtype=old.dtype)
            assert new.shape == old.shape, (init.name, new.shape, old.shape)
            init.CopyFrom(numpy_helper.from_array(new, init.name))
    return out


def pruned(model: onnx.ModelProto, names, fraction: float = PRUNE_FRACTION) -> onnx.ModelProto:
    """Global unstructured magnitude pruning: zero the `fraction` smallest |w| over all listed weight tensors."""
    weights = _initializers(model, names)
    flat = np.concatenate([np.abs(weights[n]).ravel() for n in names])
    k = int(round(fraction * flat.size))
    drop = np.zeros(flat.size, dtype=bool)
    drop[np.argsort(flat, kind="stable")[:k]] = True
    values, start = {}, 0
    for n in names:
        w = weights[n]
        mask = drop[start : start + w.size].reshape(w.shape)
        values[n] = np.where(mask, np.zeros_like(w), w)
        start += w.size
    return with_initializers(model, values)


def int8_dequantized(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """Symmetric per-tensor int8: w -> round(w / s) * s with s = max|w| / 127, stored back as float."""
    values = {}
    for n, w in _initializers(model, names).items():
        scale = float(np.abs(w).max()) / 127.0
        q = np.clip(np.round(w.astype(np.float64) / scale), -127, 127)
        values[n] = (q * scale).astype(w.dtype)
    return with_initializers(model, values)


def with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Record the type and shape of every intermediate tensor (onnx shape inference), so that a tool cutting the
    graph at an inner tensor (onnx.utils.Extractor, used by `onnxlip bound --output add_result2` to run the
    sub-model on random inputs) finds it. The nodes and initializers are unchanged."""
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


# ---- the scikit-learn MLP -------------------------------------------------------------------------------------
def make_mlp(x_train, y_train) -> onnx.ModelProto:
    clf = MLPClassifier(hidden_layer_sizes=(64, 32), activation="relu", max_iter=300, random_state=SEED)
    clf.fit(x_train, y_train)
    model = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        target_opset={"": OPSET, "ai.onnx.ml": 1},
        options={id(clf): {"zipmap": False}},
    )
    model.graph.name = "digits_mlp"
    # skl2onnx lists the opsets in set order (it varies with PYTHONHASHSEED): sort them for byte-identical files
    opsets = sorted(((o.domain, o.version) for o in model.opset_import), key=lambda dv: dv[0])
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets)
    model = with_value_info(model)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    if len(softmax) != 1 or softmax[0].input[0] != MLP_LOGITS:
        raise RuntimeError(f"skl2onnx changed its graph: the Softmax input is not {MLP_LOGITS!r}")
    return model


# ---- the numpy CNN --------------------------------------------------------------------------------------------
def _im2col(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N*H*W, C*9) patches of a 3x3 convolution with padding 1 and stride 1."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # N, C, H, W, 3, 3
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)


def _col2im(cols: np.ndarray, shape) -> np.ndarray:
    """Adjoint of _im2col."""
    n, c, h, w = shape
    patches = cols.reshape(n, h, w, c, 3, 3)
    xp = np.zeros((n, c, h + 2, w + 2), dtype=cols.dtype)
    for i in range(3):
        for j in range(3):
            xp[:, :, i : i + h, j : j + w] += patches[..., i, j].transpose(0, 3, 1, 2)
    return xp[:, :, 1:-1, 1:-1]


def conv_forward(x, w, b=None):
    n, _, h, wd = x.shape
    cols = _im2col(x)
    out = cols @ w.reshape(w.shape[0], -1).T
    if b is not None:
        out = out + b
    return out.reshape(n, h, wd, w.shape[0]).transpose(0, 3, 1, 2), cols


def conv_backward(dout, cols, w, x_shape, need_dx=True):
    dflat = dout.transpose(0, 2, 3, 1).reshape(-1, w.shape[0])
    dw = (dflat.T @ cols).reshape(w.shape)
    db = dflat.sum(axis=0)
    dx = _col2im(dflat @ w.reshape(w.shape[0], -1), x_shape) if need_dx else None
    return dx, dw, db


def maxpool_forward(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    arg = win.argmax(axis=-1)
    return np.take_along_axis(win, arg[..., None], axis=-1)[..., 0], arg


def maxpool_backward(dout, arg, x_shape):
    n, c, h, w = x_shape
    dwin = np.zeros((n, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(dwin, arg[..., None], dout[..., None], axis=-1)
    return dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x_shape)


BN_EPS = 1e-5


class NumpyCNN:
    """input (N,1,8,8) -> Conv3x3(1->8, no bias) -> BatchNorm -> ReLU -> MaxPool2x2 -> Conv3x3(8->16) -> ReLU
    -> Flatten(256) -> Gemm(10 logits)."""

    def __init__(self, rng: np.random.Generator):
        def he(shape, fan_in):
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)

        self.p = {
            "conv1.weight": he((8, 1, 3, 3), 9),
            "bn.scale": np.ones(8),
            "bn.bias": np.zeros(8),
            "conv2.weight": he((16, 8, 3, 3), 72),
            "conv2.bias": np.zeros(16),
            "fc.weight": he((10, 256), 256) / 2,
            "fc.bias": np.zeros(10),
        }
        self.running_mean = np.zeros(8)
        self.running_var = np.ones(8)

    def forward(self, x, train: bool):
        p, cache = self.p, {}
        z1, cache["cols1"] = conv_forward(x, p["conv1.weight"])
        if train:
            mu, var = z1.mean(axis=(0, 2, 3)), z1.var(axis=(0, 2, 3))
            m = z1.size / z1.shape[1]
            self.running_mean = 0.9 * self.running_mean + 0.1 * mu
            self.running_var = 0.9 * self.running_var + 0.1 * var * m / (m - 1)
        else:
            mu, var = self.running_mean, self.running_var
        inv = 1.0 / np.sqrt(var + BN_EPS)
        xhat = (z1 - mu[None, :, None, None]) * inv[None, :, None, None]
        a1 = np.maximum(p["bn.scale"][None, :, None, None] * xhat + p["bn.bias"][None, :, None, None], 0.0)
        pooled, cache["arg"] = maxpool_forward(a1)
        z2, cache["cols2"] = conv_forward(pooled, p["conv2.weight"], p["conv2.bias"])
        a2 = np.maximum(z2, 0.0)
        flat = a2.reshape(len(x), -1)
        logits = flat @ p["fc.weight"].T + p["fc.bias"]
        cache.update(x_shape=x.shape, xhat=xhat, inv=inv, a1=a1, pooled=pooled, z2=z2, flat=flat)
        return logits, cache

    def backward(self, dlogits, cache):
        p, g = self.p, {}
        g["fc.weight"] = dlogits.T @ cache["flat"]
        g["fc.bias"] = dlogits.sum(axis=0)
        da2 = (dlogits @ p["fc.weight"]).reshape(cache["z2"].shape)
        dz2 = da2 * (cache["z2"] > 0)
        dpooled, g["conv2.weight"], g["conv2.bias"] = conv_backward(
            dz2, cache["cols2"], p["conv2.weight"], cache["pooled"].shape
        )
        da1 = maxpool_backward(dpooled, cache["arg"], cache["a1"].shape)
        dy = da1 * (cache["a1"] > 0)
        xhat, inv = cache["xhat"], cache["inv"]
        g["bn.scale"] = (dy * xhat).sum(axis=(0, 2, 3))
        g["bn.bias"] = dy.sum(axis=(0, 2, 3))
        dxhat = dy * p["bn.scale"][None, :, None, None]
        m = dxhat.size / dxhat.shape[1]
        dz1 = (
            inv[None, :, None, None]
            / m
            * (
                m * dxhat
                - dxhat.sum(axis=(0, 2, 3), keepdims=True)
                - xhat * (dxhat * xhat).sum(axis=(0, 2, 3), keepdims=True)
            )
        )
        _, g["conv1.weight"], _ = conv_backward(dz1, cache["cols1"], p["conv1.weight"], cache["x_shape"], False)
        return g

    def predict(self, x):
        return self.forward(x, train=False)[0].argmax(axis=1)


def train_cnn(x_train, y_train, epochs: int = 30, batch: int = 32, lr: float = 3e-3, weight_decay: float = 1e-4):
    rng = np.random.default_rng(SEED)
    net = NumpyCNN(rng)
    x = x_train.reshape(-1, 1, 8, 8).astype(np.float64)
    m = {k: np.zeros_like(v) for k, v in net.p.items()}
    v = {k: np.zeros_like(val) for k, val in net.p.items()}
    b1, b2, step = 0.9, 0.999, 0
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        rate = lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))  # cosine schedule
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            logits, cache = net.forward(x[idx], train=True)
            prob = np.exp(logits - logits.max(axis=1, keepdims=True))
            prob /= prob.sum(axis=1, keepdims=True)
            prob[np.arange(len(idx)), y_train[idx]] -= 1.0
            grads = net.backward(prob / len(idx), cache)
            step += 1
            for k, gk in grads.items():
                if k.endswith("weight"):
                    gk = gk + weight_decay * net.p[k]
                m[k] = b1 * m[k] + (1 - b1) * gk
                v[k] = b2 * v[k] + (1 - b2) * gk * gk
                mhat, vhat = m[k] / (1 - b1**step), v[k] / (1 - b2**step)
                net.p[k] -= rate * mhat / (np.sqrt(vhat) + 1e-8)
    return net


def cnn_to_onnx(net: NumpyCNN) -> onnx.ModelProto:
    p = net.p

    def init(name, value):
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

    inits = [
        init("conv1.weight", p["conv1.weight"]),
        init("bn.scale", p["bn.scale"]),
        init("bn.bias", p["bn.bias"]),
        init("bn.running_mean", net.running_mean),
        init("bn.running_var", net.running_var),
        init("conv2.weight", p["conv2.weight"]),
        init("conv2.bias", p["conv2.bias"]),
        init("fc.weight", p["fc.weight"]),
        init("fc.bias", p["fc.bias"]),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["conv1"], "conv1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node(
            "BatchNormalization",
            ["conv1", "bn.scale", "bn.bias", "bn.running_mean", "bn.running_var"],
            ["bn"],
            "bn",
            epsilon=BN_EPS,
        ),
        helper.make_node("Relu", ["bn"], ["relu1"], "relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], "pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(
            "Conv", ["pool1", "conv2.weight", "conv2.bias"], ["conv2"], "conv2", kernel_shape=[3, 3], pads=[1] * 4
        ),
        helper.make_node("Relu", ["conv2"], ["relu2"], "relu2"),
        helper.make_node("Flatten", ["relu2"], ["flat"], "flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], "fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxlip-models")
    model.ir_version = IR_VERSION
    model = with_value_info(model)
    onnx.checker.check_model(model, full_check=True)
    return model


# ---- verification ---------------------------------------------------------------------------------------------
def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray, output: str) -> float:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    scores = sess.run([output], feed)[0]
    return float(np.mean(np.asarray(scores).argmax(axis=1) == y))


def weight_zero_fraction(model: onnx.ModelProto, names) -> float:
    ws = _initializers(model, names)
    return sum(int(np.count_nonzero(w == 0)) for w in ws.values()) / sum(w.size for w in ws.values())


def main() -> None:
    t0 = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data()
    print(f"load_digits: {len(x_train)} train / {len(x_test)} test images, pixels scaled to [0, 1]")

    mlp = make_mlp(x_train, y_train)
    cnn_net = train_cnn(x_train, y_train)
    numpy_acc = float(np.mean(cnn_net.predict(x_test.reshape(-1, 1, 8, 8).astype(np.float64)) == y_test))
    print(f"numpy CNN test accuracy (before export): {numpy_acc:.4f}")
    cnn = cnn_to_onnx(cnn_net)

    families = [
        ("digits_mlp", mlp, MLP_WEIGHTS, x_test, "probabilities"),  # the logits are not a graph output
        ("digits_cnn", cnn, CNN_WEIGHTS, x_test.reshape(-1, 1, 8, 8), "logits"),
    ]
    for stem, base, weights, x_eval, output in families:
        variants = {
            f"{stem}.onnx": base,
            f"{stem}_pruned.onnx": pruned(base, weights),
            f"{stem}_int8.onnx": int8_dequantized(base, weights),
        }
        for name, model in variants.items():
            path = HERE / name
            onnx.save_model(model, str(path))
            acc = ort_accuracy(path, x_eval, y_test, output)
            zeros, kib = weight_zero_fraction(model, weights), path.stat().st_size / 1024
            print(f"{name:24s} test accuracy {acc:.4f}   weight zeros {zeros:6.1%}   {kib:6.1f} KiB")
    print(f"--output for the sklearn model: {MLP_LOGITS}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
