"""A ResNet-18-shaped ONNX model (random weights, BatchNorm with random statistics), built with onnx.helper
so the benchmarks need no training framework. Same layer shapes as torchvision's resnet18."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, hint):
        self.n += 1
        return f"{hint}{self.n}"

    def conv_bn(self, x, cin, cout, k, stride, relu=True):
        w = self.name("conv_w")
        std = np.sqrt(2.0 / (cin * k * k))
        self.inits.append(
            numpy_helper.from_array((self.rng.normal(size=(cout, cin, k, k)) * std).astype(np.float32), w)
        )
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w], [y], name=y, strides=[stride, stride], pads=[k // 2] * 4))
        bn = [self.name(p) for p in ("bn_scale", "bn_bias", "bn_mean", "bn_var")]
        vals = [
            self.rng.uniform(0.5, 1.5, cout),
            self.rng.uniform(-0.2, 0.2, cout),
            self.rng.normal(0, 0.1, cout),
            self.rng.uniform(0.5, 1.5, cout),
        ]
        self.inits += [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(vals, bn)]
        z = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [y, *bn], [z], name=z))
        if relu:
            r = self.name("relu")
            self.nodes.append(helper.make_node("Relu", [z], [r], name=r))
            return r
        return z

    def block(self, x, cin, cout, stride):
        h = self.conv_bn(x, cin, cout, 3, stride)
        h = self.conv_bn(h, cout, cout, 3, 1, relu=False)
        skip = x if stride == 1 and cin == cout else self.conv_bn(x, cin, cout, 1, stride, relu=False)
        s, r = self.name("add"), self.name("relu")
        self.nodes += [helper.make_node("Add", [h, skip], [s], name=s), helper.make_node("Relu", [s], [r], name=r)]
        return r


def resnet18(size: int = 224, classes: int = 1000, seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, 2)
    p = b.name("maxpool")
    b.nodes.append(
        helper.make_node("MaxPool", [x], [p], name=p, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    )
    x, cin = p, 64
    for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        x, cin = b.block(x, cin, cout, stride), cout
    g, f = b.name("gap"), b.name("flat")
    b.nodes += [helper.make_node("GlobalAveragePool", [x], [g], name=g), helper.make_node("Flatten", [g], [f], name=f)]
    b.inits += [
        numpy_helper.from_array((b.rng.normal(size=(classes, 512)) / np.sqrt(512)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(b.rng.normal(0, 0.01, classes).astype(np.float32), "fc_b"),
    ]
    b.nodes.append(helper.make_node("Gemm", [f, "fc_w", "fc_b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        b.nodes,
        "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def with_weights(model: onnx.ModelProto, fn) -> onnx.ModelProto:
    """A copy whose conv/fc weights (4-D and 2-D initializers) are replaced by fn(name, array)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim in (2, 4):
            init.CopyFrom(numpy_helper.from_array(fn(init.name, arr).astype(arr.dtype), init.name))
    return out
