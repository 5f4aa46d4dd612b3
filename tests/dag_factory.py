"""Generators of tiny random ONNX ReLU-DAGs (opset 17, ir_version 10, symbolic batch dimension "N") for the
exactness tests, one builder per op family, and same-architecture perturbations (pruned, quantized, noised,
sign-flipped, rescaled) of a model's learned parameters.

Every builder returns a `Spec`: the model, the names of its learned (perturbable) initializers, and whether the
model has a BatchNormalization after an op WITH a bias (then onnxlip's BN folding can lower the path-norm, and
the oracle must be built on `oracle.fold_batchnorm(model)`). BatchNormalization statistics, Div constants, Clip
bounds, shapes and indices are never perturbed (they are not path parameters: a pruned running variance is not
a pruned path weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

OPSET = 17
IR_VERSION = 10


@dataclass
class Spec:
    model: onnx.ModelProto
    params: list[str]
    fold: bool = False  # BatchNormalization after a biased Conv/Gemm: compare with the oracle on the folded model
    family: str = ""
    notes: list[str] = field(default_factory=list)


class Builder:
    """Append nodes one by one; shapes are read back by ONNX shape inference (batch dimension "N")."""

    def __init__(self, rng: np.random.Generator, family: str = ""):
        self.rng = rng
        self.family = family
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.params: list[str] = []
        self.fold = False
        self.notes: list[str] = []
        self._k = 0

    # ---- plumbing
    def fresh(self, stem: str) -> str:
        self._k += 1
        return f"{stem}{self._k}"

    def input(self, *shape: int, name: str | None = None) -> str:
        name = name or self.fresh("x")
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape]))
        return name

    def const(self, arr, learned: bool = True, dtype=np.float32, stem: str = "c") -> str:
        name = self.fresh(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=dtype), name))
        if learned:
            self.params.append(name)
        return name

    def weight(self, *shape: int, scale: float | None = None, learned: bool = True) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = scale if scale is not None else 1.2 / np.sqrt(max(fan_in, 1))
        return self.const(self.rng.normal(0.0, scale, size=shape), learned, stem="w")

    def bias(self, n: int) -> str:
        return self.const(self.rng.normal(0.0, 0.3, size=n), stem="b")

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(f"{op_type}_"), **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, outputs: list[str] | str) -> onnx.ModelProto:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, self.family or "tiny", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        inferred = shape_inference.infer_shapes(model)
        for vi in inferred.graph.output:
            for o in model.graph.output:
                if o.name == vi.name:
                    o.CopyFrom(vi)
        onnx.checker.check_model(model)
        _check_ort_shapes(model)
        return model

    def spec(self, outputs) -> Spec:
        return Spec(self.model(outputs), list(self.params), self.fold, self.family, list(self.notes))

    def shape(self, name: str) -> tuple[int, ...]:
        """Static shape of a tensor without its batch dimension."""
        outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)]
        graph = helper.make_graph(self.nodes, "s", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        inferred = shape_inference.infer_shapes(model, strict_mode=True)
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.name == name:
                dims = vi.type.tensor_type.shape.dim
                return tuple(int(d.dim_value) for d in dims[1:])
        raise KeyError(name)

    # ---- layers
    def gemm(self, x: str, n_out: int, bias: bool = True, trans_b: int | None = None, alpha=None, beta=None) -> str:
        n_in = self.shape(x)[-1]
        trans_b = int(self.rng.integers(0, 2)) if trans_b is None else trans_b
        w = self.weight(n_out, n_in) if trans_b else self.weight(n_in, n_out, scale=1.2 / np.sqrt(n_in))
        attrs = {"transB": trans_b}
        if alpha is not None:
            attrs["alpha"] = float(alpha)
        inputs = [x, w]
        if bias:
            inputs.append(self.bias(n_out))
            if beta is not None:
                attrs["beta"] = float(beta)
        return self.op("Gemm", inputs, **attrs)

    def conv(self, x, c_out, kernel, bias=True, strides=None, pads=None, dilations=None, group=1) -> str:
        c_in = self.shape(x)[0]
        kernel = tuple(kernel)
        w = self.weight(c_out, c_in // group, *kernel)
        attrs = {"kernel_shape": list(kernel), "group": group}
        if strides:
            attrs["strides"] = list(strides)
        if pads:
            attrs["pads"] = list(pads)
        if dilations:
            attrs["dilations"] = list(dilations)
        inputs = [x, w] + ([self.bias(c_out)] if bias else [])
        return self.op("Conv", inputs, **attrs)

    def conv_transpose(self, x, c_out, kernel, bias=True, strides=None, pads=None, output_padding=None, group=1):
        c_in = self.shape(x)[0]
        kernel = tuple(kernel)
        w = self.weight(c_in, c_out // group, *kernel, scale=0.8)
        attrs = {"kernel_shape": list(kernel), "group": group}
        if strides:
            attrs["strides"] = list(strides)
        if pads:
            attrs["pads"] = list(pads)
        if output_padding:
            attrs["output_padding"] = list(output_padding)
        inputs = [x, w] + ([self.bias(c_out)] if bias else [])
        return self.op("ConvTranspose", inputs, **attrs)

    def batchnorm(self, x, follows_bias: bool) -> str:
        c = self.shape(x)[0]
        gamma = self.const(self.rng.uniform(0.5, 1.5, c) * self.rng.choice([-1, 1], c), learned=False)
        beta = self.const(self.rng.normal(0, 0.3, c), learned=False)
        mean = self.const(self.rng.normal(0, 0.3, c), learned=False)
        var = self.const(self.rng.uniform(0.3, 2.0, c), learned=False)
        if follows_bias:
            self.fold = True
        return self.op("BatchNormalization", [x, gamma, beta, mean, var], epsilon=1e-3)

    def relu(self, x):
        return self.op("Relu", [x])

    def flatten(self, x):
        return self.op("Flatten", [x], axis=1)

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64), learned=False, dtype=np.int64, stem="i")


def _check_ort_shapes(model: onnx.ModelProto) -> None:
    """onnxruntime must agree with ONNX shape inference on every output shape (batch 1); they disagree e.g. on
    ceil_mode pooling windows that start in the right padding, which the builders avoid (see `_ceil_ok`)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = np.zeros(dims, dtype=np.float32)
    for vi, out in zip(model.graph.output, sess.run(None, feeds)):
        dims = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
        if dims != out.shape:
            raise ValueError(f"onnxruntime gives shape {out.shape} for {vi.name}, shape inference {dims}")


def _ceil_ok(length: int, k: int, s: int, pb: int, pe: int, dil: int = 1) -> bool:
    """ceil_mode is unambiguous when the extra last window starts inside the input or the left padding."""
    span = dil * (k - 1) + 1
    ceil_out = -(-(length + pb + pe - span) // s) + 1
    return (ceil_out - 1) * s < length + pb


def _coin(rng, p=0.5) -> bool:
    return bool(rng.random() < p)


# ---- families -------------------------------------------------------------------------------------------------
def gemm_chain(rng) -> Spec:
    """Gemm -> Relu chains with transA / transB / alpha / beta variants (and a missing C)."""
    b = Builder(rng, "gemm")
    d0 = int(rng.integers(2, 5))
    x = b.input(d0)
    if _coin(rng):  # transA: feed op(A) = x through a Transpose
        xt = b.op("Transpose", [x], perm=[1, 0])
        n_out = int(rng.integers(2, 5))
        w = b.weight(d0, n_out, scale=0.8)
        h = b.op("Gemm", [xt, w, b.bias(n_out)], transA=1, alpha=float(rng.choice([0.5, 1.0, 2.0])))
    else:
        h = b.gemm(
            x, int(rng.integers(2, 5)), alpha=float(rng.choice([0.5, 1.0, 1.5])), beta=float(rng.choice([0.5, 2.0]))
        )
    for _ in range(int(rng.integers(1, 3))):
        h = b.relu(h)
        h = b.gemm(h, int(rng.integers(2, 5)), bias=_coin(rng, 0.7), alpha=0.75 if _coin(rng) else None)
    return b.spec(h)


def matmul_add(rng) -> Spec:
    """MatMul + Add on 2-D and 3-D inputs, a constant left operand, Transpose and Reshape."""
    b = Builder(rng, "matmul")
    t, f = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    x = b.input(t, f)
    h = b.op("MatMul", [x, b.weight(f, 3, scale=0.7)])
    h = b.op("Add", [h, b.bias(3)])
    h = b.relu(h)
    if _coin(rng):  # constant on the left: (t2, t) @ (N, t, 3)
        h = b.op("MatMul", [b.weight(2, t, scale=0.7), h])
    else:
        h = b.op("Transpose", [h], perm=[0, 2, 1])
        h = b.op("MatMul", [h, b.weight(t, 2, scale=0.7)])
    last = b.shape(h)[-1]
    h = b.op("Add", [h, b.bias(last)]) if _coin(rng) else b.op("Sub", [h, b.bias(last)])
    h = b.relu(h)
    h = b.op("Reshape", [h, b.ints([-1, int(np.prod(b.shape(h)))])])
    h = b.op("MatMul", [h, b.weight(b.shape(h)[0], 2, scale=0.7)])
    return b.spec(h)


def conv1d(rng) -> Spec:
    """1-D convolutions: strides, asymmetric pads, dilations, groups; LeakyRelu."""
    b = Builder(rng, "conv1d")
    c, length = int(rng.choice([2, 4])), int(rng.integers(5, 8))
    x = b.input(c, length)
    group = int(rng.choice([1, 2]))
    h = b.conv(
        x,
        4,
        (int(rng.integers(2, 4)),),
        strides=[int(rng.integers(1, 3))],
        pads=[int(rng.integers(0, 2)), int(rng.integers(0, 3))],
        dilations=[int(rng.integers(1, 3))],
        group=group,
        bias=_coin(rng, 0.8),
    )
    h = b.op("LeakyRelu", [h], alpha=float(rng.choice([0.1, 0.3]))) if _coin(rng) else b.relu(h)
    h = b.conv(h, 2, (2,), strides=[int(rng.integers(1, 3))], pads=[1, 0], group=2)
    h = b.relu(h)
    h = b.flatten(h)
    return b.spec(b.gemm(h, 2))


def conv2d(rng) -> Spec:
    """2-D convolutions: strides, pads, dilations, groups."""
    b = Builder(rng, "conv2d")
    x = b.input(2, 5, 5)
    h = b.conv(
        x,
        2,
        (int(rng.integers(2, 4)), int(rng.integers(1, 3))),
        strides=[int(rng.integers(1, 3)), int(rng.integers(1, 3))],
        pads=[int(v) for v in rng.integers(0, 2, size=4)],
        dilations=[int(rng.integers(1, 3)), 1],
        group=int(rng.choice([1, 2])),
    )
    h = b.relu(h)
    h = b.conv(h, 2, (2, 2), strides=[2, 1], pads=[1, 1, 0, 0], group=int(rng.choice([1, 2])))
    h = b.relu(h)
    h = b.flatten(h)
    return b.spec(b.gemm(h, 2, bias=_coin(rng)))


def conv_transpose(rng) -> Spec:
    """ConvTranspose 1-D / 2-D: strides, pads, output_padding, groups."""
    b = Builder(rng, "convtranspose")
    if _coin(rng):
        x = b.input(2, 3)
        stride = int(rng.integers(1, 3))
        h = b.conv_transpose(
            x,
            2,
            (int(rng.integers(2, 4)),),
            strides=[stride],
            pads=[int(rng.integers(0, 2)), 0],
            output_padding=[int(rng.integers(0, stride))] if stride > 1 else None,
            group=int(rng.choice([1, 2])),
        )
    else:
        x = b.input(2, 2, 3)
        h = b.conv_transpose(x, 2, (2, 2), strides=[2, 1], pads=[0, 1, 1, 0], group=int(rng.choice([1, 2])))
    h = b.relu(h)
    h = b.flatten(h)
    h = b.gemm(h, 2)
    return b.spec(h)


def maxpool(rng) -> Spec:
    """MaxPool 1-D / 2-D with pads, strides, ceil_mode, dilations; GlobalMaxPool."""
    b = Builder(rng, "maxpool")
    if _coin(rng):
        x = b.input(2, 7)
        h = b.relu(b.conv(x, 2, (2,), pads=[1, 0]))
        k, st, dil = int(rng.integers(2, 4)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
        pads = [int(rng.integers(0, k)), int(rng.integers(0, k))]
        ceil = int(rng.integers(0, 2)) if _ceil_ok(b.shape(h)[1], k, st, *pads, dil) else 0
        h = b.op("MaxPool", [h], kernel_shape=[k], strides=[st], pads=pads, ceil_mode=ceil, dilations=[dil])
    else:
        x = b.input(1, 5, 5)
        h = b.relu(b.conv(x, 2, (2, 2), pads=[0, 0, 1, 1]))
        st, pe = int(rng.integers(1, 3)), int(rng.integers(0, 3))
        hh, ww = b.shape(h)[1:]
        ceil = int(rng.integers(0, 2)) if _ceil_ok(hh, 2, 2, 1, 0) and _ceil_ok(ww, 3, st, 1, pe) else 0
        h = b.op("MaxPool", [h], kernel_shape=[2, 3], strides=[2, st], pads=[1, 1, 0, pe], ceil_mode=ceil)
    if _coin(rng, 0.3):
        h = b.op("GlobalMaxPool", [h])
    h = b.flatten(h)
    return b.spec(b.gemm(h, 2))


def avgpool(rng) -> Spec:
    """AveragePool with count_include_pad 0 / 1, pads, strides, ceil_mode; GlobalAveragePool."""
    b = Builder(rng, "avgpool")
    x = b.input(2, 5, 5)
    h = b.relu(b.conv(x, 3, (2, 2), pads=[1, 0, 0, 1]))
    k0, s0, p0, p2 = int(rng.integers(2, 4)), int(rng.integers(1, 3)), int(rng.integers(0, 2)), int(rng.integers(0, 2))
    hh, ww = b.shape(h)[1:]
    ceil = int(rng.integers(0, 2)) if _ceil_ok(hh, k0, s0, p0, p2) and _ceil_ok(ww, 2, 2, 1, 0) else 0
    h = b.op(
        "AveragePool",
        [h],
        kernel_shape=[k0, 2],
        strides=[s0, 2],
        pads=[p0, 1, p2, 0],
        count_include_pad=int(rng.integers(0, 2)),
        ceil_mode=ceil,
    )
    if _coin(rng):
        h = b.op("GlobalAveragePool", [b.relu(b.conv(h, 2, (1, 1)))])
    h = b.flatten(h)
    return b.spec(b.gemm(h, 2))


def global_pools(rng) -> Spec:
    """GlobalAveragePool, GlobalMaxPool, ReduceMean, ReduceSum."""
    b = Builder(rng, "global")
    x = b.input(2, 4, 3)
    h = b.relu(b.conv(x, 3, (2, 2), pads=[1, 1, 0, 0]))
    kind = int(rng.integers(0, 3))
    if kind == 0:
        avg = b.op("GlobalAveragePool", [h])
    elif kind == 1:
        avg = b.op("ReduceMean", [h], axes=[2, 3], keepdims=1)
    else:
        avg = b.op("ReduceSum", [h, b.ints([2, 3])], keepdims=1)
    top = b.op("GlobalMaxPool", [h])
    h = b.op("Concat", [avg, top], axis=1) if _coin(rng) else b.op("Add", [avg, top])
    if _coin(rng, 0.3):  # a partial reduction without keepdims
        h = b.op("ReduceSum", [b.relu(b.conv(x, 2, (1, 1))), b.ints([3])], keepdims=0)
    h = b.flatten(h)
    return b.spec(b.gemm(h, 2))


def residual(rng) -> Spec:
    """Residual Add and Sub (dense and convolutional skips), Neg, Mean of branches."""
    b = Builder(rng, "residual")
    if _coin(rng):
        x = b.input(3)
        h0 = b.relu(b.gemm(x, 3))
        h = b.relu(b.op("Neg", [b.gemm(h0, 3)]))  # ReLU(-z): a sign flip in front of the activation
        h = b.gemm(h, 3)
        h = b.op("Add", [h, h0]) if _coin(rng) else b.op("Sub", [h0, h])
        h = b.relu(h)
        h = b.op("Add", [h, x]) if _coin(rng) else b.op("Sub", [h, x])
        return b.spec(b.gemm(h, 2))
    x = b.input(2, 4)
    h = b.relu(b.conv(x, 2, (3,), pads=[1, 1]))
    h = b.conv(h, 2, (3,), pads=[1, 1])
    h = b.op("Add", [x, h]) if _coin(rng) else b.op("Sub", [h, x])
    h = b.relu(h)
    h = b.op("Mean", [h, b.relu(b.conv(h, 2, (1,))), x])  # an ensemble-style average of branches
    return b.spec(b.gemm(b.flatten(h), 2))


def concat_split(rng) -> Spec:
    """Concat of branches (and of two model inputs), Split, Gather."""
    b = Builder(rng, "concat")
    x = b.input(2, 4)
    left = b.relu(b.conv(x, 2, (2,), pads=[1, 0]))
    right = b.relu(b.conv(x, 1, (3,), pads=[1, 1]))
    h = b.op("Concat", [left, right], axis=1)
    if _coin(rng):
        y = b.input(1, 4)
        h = b.op("Concat", [h, y], axis=1)
    parts = b.op("Split", [h, b.ints([2, b.shape(h)[0] - 2])], n_out=2, axis=1)
    gathered = b.op("Gather", [parts[0], b.ints([1, 0])], axis=1)
    if b.shape(parts[1])[0] == 2:
        h = b.op("Add", [gathered, parts[1]])
    else:
        h = b.op("Concat", [parts[1], gathered], axis=1)
    h = b.relu(h)
    return b.spec(b.gemm(b.flatten(h), 2))


def batchnorm(rng) -> Spec:
    """BatchNormalization after a bias-free Conv / ConvTranspose / Gemm (folding it changes no path-norm) and
    after a Relu (a standalone diagonal affine map, never folded)."""
    b = Builder(rng, "batchnorm")
    x = b.input(2, 5)
    if _coin(rng):
        h = b.conv(x, 3, (2,), pads=[1, 0], bias=False)
    else:
        h = b.conv_transpose(x, 2, (2,), strides=[int(rng.integers(1, 3))], group=int(rng.choice([1, 2])), bias=False)
    h = b.relu(b.batchnorm(h, follows_bias=False))
    if _coin(rng):
        h = b.batchnorm(h, follows_bias=False)
    h = b.flatten(h)
    h = b.gemm(h, 3, bias=False, trans_b=int(rng.integers(0, 2)))
    h = b.relu(b.batchnorm(h, follows_bias=False))
    return b.spec(b.gemm(h, 2))


def batchnorm_bias(rng) -> Spec:
    """BatchNormalization after a Conv / ConvTranspose / Gemm WITH a bias: onnxlip folds it (W' = a W,
    b' = a b + c), which can lower the path-norm, so the oracle must run on `oracle.fold_batchnorm(model)`."""
    b = Builder(rng, "batchnorm_bias")
    x = b.input(2, 5)
    if _coin(rng):
        h = b.conv(x, 3, (2,), pads=[1, 0], bias=True)
    else:
        h = b.conv_transpose(x, 2, (2,), strides=[int(rng.integers(1, 3))], group=int(rng.choice([1, 2])), bias=True)
    h = b.relu(b.batchnorm(h, follows_bias=True))
    h = b.flatten(h)
    h = b.gemm(h, 4, trans_b=int(rng.integers(0, 2)), beta=float(rng.choice([1.0, 0.5])))
    h = b.relu(b.batchnorm(h, follows_bias=True))
    h = b.gemm(h, 3, trans_b=int(rng.integers(0, 2)))
    h = b.batchnorm(h, follows_bias=True)
    h = b.op("LeakyRelu", [h], alpha=0.1)
    return b.spec(b.gemm(h, 2))


def activations(rng) -> Spec:
    """LeakyRelu, PRelu, Clip(0, 6), elementwise Max / Min of two branches."""
    b = Builder(rng, "activations")
    x = b.input(3)
    h = b.gemm(x, 4)
    h1 = b.op("LeakyRelu", [h], alpha=float(rng.choice([0.05, 0.2, 0.5])))
    h2 = b.op("Clip", [b.gemm(x, 4), b.const(0.0, learned=False), b.const(6.0, learned=False)])
    h2 = b.op("Mul", [h2, b.const(rng.uniform(1.0, 4.0, size=4))])  # let the upper knee of Clip be reached
    h = b.op("Max" if _coin(rng) else "Min", [h1, h2])
    h = b.gemm(h, 3)
    # PRelu with fixed per-channel slopes (onnxlip pairs models only when their slopes agree: not perturbed)
    h = b.op("PRelu", [h, b.const(rng.uniform(0.0, 1.0, size=3), learned=False)])
    h = b.op("Clip", [h, b.const(0.0, learned=False), b.const(6.0, learned=False)])
    if _coin(rng):
        h = b.op("Max", [h, b.op("Relu", [b.gemm(x, 3)])])
    return b.spec(b.gemm(h, 2))


def signed_activations(rng) -> Spec:
    """LeakyRelu and PRelu with slopes below 0 and above 1 (read with a ReLU(-x) edge), Abs, HardSigmoid."""
    b = Builder(rng, "signed_activations")
    x = b.input(1, 3, 3)
    h = b.conv(x, 3, (2, 2), bias=True)
    # per-channel PRelu slopes, fixed (not perturbed: a pair must agree on them)
    h = b.op("PRelu", [h, b.const(rng.uniform(-1.0, 2.0, size=(3, 1, 1)), learned=False)])
    h = b.op("Abs", [b.conv(h, 2, (1, 1), bias=_coin(rng))]) if _coin(rng) else b.relu(b.conv(h, 2, (1, 1)))
    h = b.gemm(b.flatten(h), 3)
    h = b.op("LeakyRelu", [h], alpha=float(rng.choice([-0.5, 1.5, 2.5])))
    h = b.op("Abs", [b.gemm(h, 2)])
    h = b.op("HardSigmoid", [b.gemm(h, 2)], alpha=float(rng.choice([0.2, 0.7])), beta=float(rng.choice([0.5, 0.1])))
    return b.spec(b.gemm(h, 2))


def layout(rng) -> Spec:
    """Pad (zero, reflect or edge), Reshape, Transpose, Squeeze / Unsqueeze, Slice (negative steps too), Resize
    (nearest, linear or cubic), Div."""
    b = Builder(rng, "layout")
    x = b.input(2, 3, 3)
    h = b.op("Pad", [x, b.ints([0, 0, 1, 0, 0, 0, 0, 1])], mode="constant")
    h = b.relu(b.conv(h, 2, (2, 2)))
    h = b.op("Resize", [h, "", b.const([1.0, 1.0, 2.0, 1.0], learned=False)], mode="nearest")
    h = b.op("Slice", [h, b.ints([0, 1]), b.ints([1, 100]), b.ints([1, 2]), b.ints([1, 2])])
    h = b.op("Transpose", [h], perm=[0, 1, 3, 2])
    # negative steps, as torch exports flip: reversed to the front (ends below -dim), and every second entry
    h = b.op("Slice", [h, b.ints([-1, -1]), b.ints([-(2**63) + 1, -(2**63)]), b.ints([3, 2]), b.ints([-1, -2])])
    if _coin(rng):
        h = b.op("Pad", [h, b.ints([0, 0, 0, 1, 0, 0, 1, 0])])
    # a copying pad (every entry a copy of an input entry): before a conv, as in image-to-image networks
    mode = str(rng.choice(["reflect", "edge"]))
    h = b.op("Pad", [h, b.ints([0, 0, 1, 1, 0, 0, 1, 0])], mode=mode)
    h = b.relu(b.conv(h, 2, (2, 2)))
    # a linear or cubic Resize: fixed coefficients, negative ones for cubic (onnxlip/ops/interpolate.py)
    interp = str(rng.choice(["linear", "cubic"]))
    transform = str(rng.choice(["half_pixel", "align_corners", "asymmetric"]))
    scales = b.const([1.0, 1.0, 1.5, 2.0], learned=False)
    h = b.op("Resize", [h, "", scales], mode=interp, coordinate_transformation_mode=transform)
    divisor = rng.uniform(1.5, 3.0)
    h = b.op("Div", [h, b.const(divisor if _coin(rng) else [divisor], learned=False)])  # 0-d or (1,)-shaped
    s = b.shape(h)
    h = b.op("Reshape", [h, b.ints([0, s[0] * s[1], s[2]])])
    h = b.op("Unsqueeze", [h, b.ints([1])])
    h = b.op("Squeeze", [h, b.ints([1])])
    h = b.flatten(h)
    return b.spec(b.gemm(h, 2))


def mixed(rng) -> Spec:
    """A small model mixing residual, MaxPool, AveragePool, Concat, Clip and BatchNorm."""
    b = Builder(rng, "mixed")
    x = b.input(1, 4, 4)
    h = b.relu(b.batchnorm(b.conv(x, 2, (2, 2), pads=[1, 1, 0, 0], bias=False), follows_bias=False))
    p = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    a = b.op("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], count_include_pad=1)
    a = b.op("Slice", [a, b.ints([0, 0]), b.ints([2, 2]), b.ints([2, 3])])
    h = b.op("Concat", [p, a], axis=1)
    r = b.op("Clip", [b.conv(h, 4, (1, 1)), b.const(0.0, learned=False), b.const(6.0, learned=False)])
    h = b.op("Add", [h, r])
    h = b.flatten(h)
    return b.spec(b.gemm(b.relu(b.gemm(h, 3)), 2))


FAMILIES = {
    "gemm": gemm_chain,
    "matmul": matmul_add,
    "conv1d": conv1d,
    "conv2d": conv2d,
    "convtranspose": conv_transpose,
    "maxpool": maxpool,
    "avgpool": avgpool,
    "global": global_pools,
    "residual": residual,
    "concat": concat_split,
    "batchnorm": batchnorm,
    "batchnorm_bias": batchnorm_bias,
    "activations": activations,
    "layout": layout,
    "mixed": mixed,
    "signed_activations": signed_activations,
}


def build(family: str, seed: int) -> Spec:
    spec = FAMILIES[family](np.random.default_rng([seed, list(FAMILIES).index(family)]))
    spec.family = family
    return spec


# ---- chains for the rescaling invariants ------------------------------------------------------------------
def gemm_chain_weights(rng, dims=(3, 4, 4, 2)):
    """Weights W_i (in, out) and biases b_i of a Gemm -> Relu -> ... -> Gemm chain."""
    ws = [rng.normal(0, 1.0 / np.sqrt(i), size=(i, o)) for i, o in zip(dims[:-1], dims[1:])]
    bs = [rng.normal(0, 0.3, size=o) for o in dims[1:]]
    return ws, bs


def gemm_chain_model(ws, bs) -> onnx.ModelProto:
    b = Builder(np.random.default_rng(0), "chain")
    h = b.input(ws[0].shape[0])
    for i, (w, c) in enumerate(zip(ws, bs)):
        h = b.op("Gemm", [h, b.const(w), b.const(c)])
        if i < len(ws) - 1:
            h = b.relu(h)
    return b.model(h)


def conv_chain_weights(rng, channels=(2, 3, 3), kernel=2):
    ws = [rng.normal(0, 0.6, size=(o, i, kernel, kernel)) for i, o in zip(channels[:-1], channels[1:])]
    bs = [rng.normal(0, 0.3, size=o) for o in channels[1:]]
    head = rng.normal(0, 0.5, size=(channels[-1] * 9, 2))
    return ws, bs, head


def conv_chain_model(ws, bs, head) -> onnx.ModelProto:
    """x (N, C, 4, 4) -> [Conv 2x2 pad (1,1,0,0) -> Relu]* -> Flatten -> Gemm (no bias): spatial 4 -> 4 -> 4, then
    the last layer stride 1 without pads: 4 -> 3 (head has 9 * C rows)."""
    b = Builder(np.random.default_rng(0), "convchain")
    h = b.input(ws[0].shape[1], 4, 4)
    for i, (w, c) in enumerate(zip(ws, bs)):
        pads = [1, 1, 0, 0] if i < len(ws) - 1 else [0, 0, 0, 0]
        h = b.relu(b.op("Conv", [h, b.const(w), b.const(c)], kernel_shape=list(w.shape[2:]), pads=pads))
    h = b.flatten(h)
    return b.model(b.op("Gemm", [h, b.const(head)]))


# ---- perturbations of the learned parameters -----------------------------------------------------------------
def _replace_inits(model: onnx.ModelProto, new: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for init in out.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(np.asarray(new[init.name], dtype=np.float32), init.name))
    return out


def params_of(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    return {n: inits[n] for n in names}


def perturb(spec: Spec, kind: str, rng: np.random.Generator) -> onnx.ModelProto:
    """A same-architecture copy: 'prune' (random entries zeroed), 'quantize' (rounded to a grid), 'noise'
    (multiplied by 1 + u, |u| <= 0.3: no sign flip), 'flip' (a random subset negated, at least one)."""
    vals = params_of(spec.model, spec.params)
    new = {}
    for name, v in vals.items():
        if kind == "prune":
            new[name] = np.where(rng.random(v.shape) < 0.3, 0.0, v)
        elif kind == "quantize":
            step = max(float(np.abs(v).max()), 1e-12) / 4.0
            new[name] = np.round(v / step) * step
        elif kind == "noise":
            new[name] = v * (1.0 + rng.uniform(-0.3, 0.3, size=v.shape))
        elif kind == "flip":
            new[name] = np.where(rng.random(v.shape) < 0.2, -v, v)
        else:
            raise ValueError(kind)
    if kind == "flip" and all(np.array_equal(new[n], vals[n]) for n in vals):
        name = max(vals, key=lambda n: float(np.abs(vals[n]).max()))
        flat = new[name].reshape(-1)
        flat[int(np.argmax(np.abs(flat)))] *= -1.0
    return _replace_inits(spec.model, new)
