"""A small builder of ONNX graphs: nodes, constants (large ones handed to onnxruntime in memory), inputs and
outputs. The companion emitters (companion.py) build on it."""

from __future__ import annotations

import itertools
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

COMPANION_OPSET = 17


class GraphBuilder:
    """A small helper that accumulates ONNX nodes, constants, inputs and outputs."""

    # constants above this many entries are handed to onnxruntime as in-memory OrtValues, not serialized
    EXTERNAL_MIN_SIZE = 4096

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.external: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._ids = itertools.count()
        self._scalar_cache: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        return f"{hint}__{next(self._ids)}"

    def const(self, array: np.ndarray, hint: str = "c", shared: bool = True) -> str:
        """An initializer holding `array`; one-entry constants are shared between calls unless `shared` is False."""
        array = np.asarray(array)
        key = None
        if shared and array.size == 1 and array.ndim <= 1:
            key = (array.dtype.str, array.shape, array.item())
            if key in self._scalar_cache:
                return self._scalar_cache[key]
        name = self.fresh(hint)
        if array.size >= self.EXTERNAL_MIN_SIZE:
            self.initializers.append(_external_placeholder(name, array))
            self.external[name] = np.ascontiguousarray(array)
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._scalar_cache[key] = name
        return name

    def f32(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32), "s")

    def i64(self, values: Iterable[int]) -> str:
        return self.const(np.array(list(values), dtype=np.int64), "i")

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, **attrs):
        outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def add_input(self, name: str, shape: tuple[int, ...], dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def add_output(self, name: str, dtype=TensorProto.FLOAT) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, None))

    def add_outputs(self, names: Iterable[str]) -> None:
        """Declare graph outputs in order; constants, graph inputs and repeats get their own Identity copy."""
        produced = {t for n in self.nodes for t in n.output}
        taken: set[str] = set()
        for t in names:
            if t not in produced or t in taken:
                t = self.op("Identity", [t], "out")
            taken.add(t)
            self.add_output(t)

    def add_fetches(self, names: Iterable[str]) -> list[str]:
        """Declare further outputs (see add_outputs); returns their output names, in order."""
        start = len(self.outputs)
        self.add_outputs(names)
        return [o.name for o in self.outputs[start:]]

    def drop_dead_nodes(self, probes: Iterable[str] = ()) -> None:
        """Remove the nodes and constants no graph output depends on. The nodes producing `probes` (measurements
        of other tensors) stay where everything they read stays."""
        live = {o.name for o in self.outputs}
        kept = []
        for node in reversed(self.nodes):  # emitted in topological order
            if any(t in live for t in node.output):
                kept.append(node)
                live.update(node.input)
        probes = set(probes)
        kept_ids = {id(n) for n in kept}
        for node in self.nodes:
            if id(node) not in kept_ids and probes.intersection(node.output) and all(t in live for t in node.input):
                kept.append(node)
                kept_ids.add(id(node))
        order = {id(n): i for i, n in enumerate(self.nodes)}
        self.nodes[:] = sorted(kept, key=lambda n: order[id(n)])
        self.initializers[:] = [t for t in self.initializers if t.name in live]
        self.external = {n: a for n, a in self.external.items() if n in live}
        self._scalar_cache = {k: n for k, n in self._scalar_cache.items() if n in live}  # later ops may reuse them

    def model(self, name: str = "onnxlip") -> onnx.ModelProto:
        """The model; constants in `self.external` are placeholders to pass to onnxruntime in memory."""
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", COMPANION_OPSET)], producer_name="onnxlip"
        )
        model.ir_version = 8
        return model


def _external_placeholder(name: str, array: np.ndarray) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "onnxlip-in-memory"), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
