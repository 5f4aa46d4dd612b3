"""ONNX -> ReLU-DAG IR: fix input shapes, fold constants and shape arithmetic, infer static shapes, then
hand every node to its op family's import rule. All problems are collected and reported together."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from .errors import ModelIssue, OnnxlipError, ShapeError, UnsupportedModelError
from .ir import Graph, Node, Param
from .loading import ModelLike, default_opset, load_model
from .ops import IMPORTERS, LIPSCHITZ_IMPORTERS, REJECTED
from .passes import run_passes

# nodes that are never constant-folded even when their inputs are constant
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
_FOLD_LIMIT = 64 * 2**20  # do not materialise constants above 64 MiB
_MAX_ENTRIES = 2**31  # a static tensor above this (8 GiB of float32 for one activation) is a damaged shape


@dataclass
class ImportOptions:
    """What part of the model to analyse and how to fill in unknown dimensions."""

    outputs: Sequence[str] | None = None
    input_shapes: Mapping[str, Sequence[int]] | None = None
    # accept the 1-Lipschitz / monotone activations that only the `lipschitz` command can treat
    lipschitz: bool = False


class RuleError(Exception):
    """Raised by an import rule: the node is not supported, for the given reason."""


class ImportContext:
    """What an import rule sees: constants, static shapes, and a place to put IR nodes."""

    def __init__(self, consts, shapes, opset: int, origins: dict[str, tuple[str, ...]]):
        self.consts = consts
        self.origins = origins
        self.shapes = shapes
        self.opset = opset
        self.nodes: list[Node] = []
        self.node: onnx.NodeProto | None = None
        self.used_initializers: set[str] = set()
        self.initializers: dict[str, np.ndarray] = {}  # the decoded initializers, before any folding

    def consumers_of(self, tensor: str) -> list[str]:
        """Names of the nodes (and graph outputs) that use a tensor."""
        return list(self.users.get(tensor, []))

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        return self.consts.get(name)

    def is_const(self, name: str) -> bool:
        return bool(name) and name in self.consts

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise RuleError(f"the shape of tensor {name!r} is unknown")
        return self.shapes[name]

    def param(
        self, tensor: str, value: np.ndarray | None = None, sources: Iterable[str] | None = None, transposed=False
    ) -> Param:
        """A learned parameter read from initializer `tensor` (or a value derived from it)."""
        arr = self.consts[tensor] if value is None else value
        src = tuple(sources) if sources is not None else self.origins.get(tensor, (tensor,))
        self.used_initializers.update(src)
        arr = np.asarray(arr)
        if arr.dtype not in (np.float32, np.float64):  # float16, int8 after folding, ...
            arr = arr.astype(np.float64)
        return Param(tensor, arr, src, transposed, origin=tensor if self._unchanged(tensor, arr, transposed) else None)

    def _unchanged(self, tensor: str, arr: np.ndarray, transposed: bool) -> bool:
        """Whether arr is initializer `tensor` itself (or, when transposed, its transposed view)."""
        init = self.initializers.get(tensor)
        if init is None:
            return False
        if not transposed:
            return arr is init
        same_memory = arr.__array_interface__["data"][0] == init.__array_interface__["data"][0]
        return (
            same_memory
            and arr.dtype == init.dtype
            and arr.shape == init.shape[::-1]
            and arr.strides == init.strides[::-1]
        )

    def attr(self, name: str, default=None):
        """The node's attribute `name`, or `default`; RuleError when its kind differs from the default's (a
        number, a list, a string), as in a damaged file."""
        assert self.node is not None
        for a in self.node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                if default is not None and not _same_kind(value, default):
                    raise RuleError(f"its attribute {name!r} is {_kind(value)}, not {_kind(default)}")
                return value
        return default

    def add(self, op: str, inputs: list[str], outputs: list[str] | None = None, attrs=None, params=None) -> Node:
        assert self.node is not None
        node = Node(
            name=self.node.name or (self.node.output[0] if self.node.output else op),
            op=op,
            inputs=list(inputs),
            outputs=list(outputs if outputs is not None else self.node.output),
            attrs=dict(attrs or {}),
            params=dict(params or {}),
            onnx_op=self.node.op_type,
        )
        if any(n.name == node.name for n in self.nodes[-4:]):
            node.name = f"{node.name}/{len(self.nodes)}"
        self.nodes.append(node)
        return node


def _type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:  # not an ONNX type at all
        return f"#{elem_type} (unknown)"


def _kind(value) -> str:
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (bytes, str)):
        return "a string"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return "a number"
    return type(value).__name__


def _same_kind(value, default) -> bool:
    return _kind(value) == _kind(default)


def import_model(
    model: ModelLike, options: ImportOptions | None = None, arrays: Mapping[str, np.ndarray] | None = None
) -> Graph:
    """Import an ONNX model (path or ModelProto) into the IR, raising OnnxlipError subclasses on bad input.
    `arrays`: values of initializers whose data the proto omits (loading.load_with_arrays)."""
    options = options or ImportOptions()
    proto = load_model(model)
    opset = default_opset(proto) or 7
    graph = proto.graph
    consts = _initial_constants(graph, arrays or {})
    initializers = dict(consts)
    origins = {n: (n,) for n, arr in consts.items() if arr.dtype.kind == "f" or arr.dtype in (np.int8, np.uint8)}
    inputs = _fixed_input_shapes(graph, consts, options.input_shapes)
    nodes = list(graph.node)
    issues = _check_node_names(nodes)
    outputs = list(options.outputs) if options.outputs else [o.name for o in graph.output]
    nodes = _needed_nodes(nodes, outputs, inputs, consts)
    for name in outputs:
        if name in consts:
            raise OnnxlipError(f"output {name!r} is a constant of the model, not a computed tensor; choose another")
    shapes = _infer_shapes(proto, nodes, inputs, consts)
    # folding can reveal new static shapes (a Shape after a folded Pad), which can enable more folding
    for _ in range(16):
        count = len(nodes)
        nodes = _fold_constants(proto, nodes, consts, shapes, origins)
        if len(nodes) == count:  # nothing folded: the shapes stand
            break
        shapes = _infer_shapes(proto, nodes, inputs, consts)

    ctx = ImportContext(consts, shapes, opset, origins)
    ctx.initializers = initializers
    ctx.users = {}
    for n in nodes:
        for t in n.input:
            ctx.users.setdefault(t, []).append(n.name or n.op_type)
    for t in outputs:
        ctx.users.setdefault(t, []).append("a graph output")
    for node in nodes:
        ctx.node = node
        rule = IMPORTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if options.lipschitz and node.domain in ("", "ai.onnx") and node.op_type in LIPSCHITZ_IMPORTERS:
            rule = LIPSCHITZ_IMPORTERS[node.op_type]
        where = node.name or (node.output[0] if node.output else "?")
        if rule is None:
            issues.append(ModelIssue(where, node.op_type, _unsupported_reason(node)))
            continue
        try:
            for out in node.output:
                if out and out not in shapes:
                    raise RuleError(f"the shape of its output {out!r} could not be inferred")
            rule(node, ctx)
        except RuleError as exc:
            issues.append(ModelIssue(where, node.op_type, str(exc)))
        except OnnxlipError:
            raise
        except Exception as exc:  # noqa: BLE001 - attributes or shapes no rule expects (a damaged file)
            issues.append(ModelIssue(where, node.op_type, f"cannot be read ({type(exc).__name__}: {exc})"))
    for name in outputs:
        if name not in shapes and name not in inputs:
            issues.append(ModelIssue(name, "-", "requested output tensor has no inferable static shape"))
    if issues:
        raise UnsupportedModelError(issues, _output_hint(nodes, issues, shapes, outputs, consts))
    ir = Graph(inputs=inputs, nodes=ctx.nodes, outputs=outputs, shapes=dict(shapes))
    for name, shape in inputs.items():
        ir.shapes[name] = shape
    ir.source_sizes = {n: int(consts[n].size) for n in ctx.used_initializers if n in consts}
    ir = run_passes(ir, lipschitz=options.lipschitz)
    _check_finite(ir)
    return ir


# ---- constants and inputs -------------------------------------------------------------------------------
def _initial_constants(graph: onnx.GraphProto, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    consts: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        given = arrays.get(init.name)
        if given is not None:
            if tuple(init.dims) != given.shape or helper.tensor_dtype_to_np_dtype(init.data_type) != given.dtype:
                raise OnnxlipError(f"initializer {init.name!r}: its values do not match its dims and type")
            consts[init.name] = given
            continue
        try:
            consts[init.name] = numpy_helper.to_array(init)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt tensor
            raise OnnxlipError(
                f"initializer {init.name!r} cannot be decoded (corrupt or truncated file?): {exc}"
            ) from None
    for sparse in graph.sparse_initializer:
        raise OnnxlipError(f"sparse initializer {sparse.values.name!r} is not supported; densify the model first")
    return consts


def _fixed_input_shapes(graph, consts, user_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    user_shapes = dict(user_shapes or {})
    real_inputs = [i for i in graph.input if i.name not in consts]
    known = {i.name for i in real_inputs}
    for name in user_shapes:
        if name not in known:
            raise ShapeError(f"--input-shape names {name!r}, but the model's inputs are {sorted(known)}")
    out: dict[str, tuple[int, ...]] = {}
    problems = []
    for inp in real_inputs:
        ttype = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise OnnxlipError(f"input {inp.name!r} is not a tensor (sequences and maps are not supported)")
        if ttype.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            raise OnnxlipError(
                f"input {inp.name!r} has element type {_type_name(ttype.elem_type)}; "
                "only floating-point inputs can be analysed"
            )
        if inp.name in user_shapes:
            shape = tuple(int(d) for d in user_shapes[inp.name])
            if ttype.HasField("shape") and len(ttype.shape.dim) != len(shape):
                raise ShapeError(
                    f"input {inp.name!r} has rank {len(ttype.shape.dim)}, --input-shape gives {len(shape)}"
                )
            if any(d <= 0 for d in shape):
                raise ShapeError(f"--input-shape for {inp.name!r} must be positive, got {shape}")
            out[inp.name] = shape
            continue
        if not ttype.HasField("shape"):
            problems.append(f"{inp.name} (rank unknown)")
            continue
        dims = []
        for axis, dim in enumerate(ttype.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif axis == 0:
                dims.append(1)  # the batch dimension
            else:
                dims.append(None)
        if None in dims:
            shown = "x".join("?" if d is None else str(d) for d in dims)
            problems.append(f"{inp.name} ({shown})")
        else:
            out[inp.name] = tuple(dims)
    if problems:
        example = real_inputs[0].name
        raise ShapeError(
            "unknown non-batch dimensions in input(s) "
            + ", ".join(problems)
            + f"; give them with --input-shape, e.g. --input-shape {example}=1x3x224x224"
        )
    if not out:
        raise OnnxlipError("the model has no non-constant input")
    return out


def _check_node_names(nodes: list[onnx.NodeProto]) -> list[ModelIssue]:
    seen: set[str] = set()
    issues = []
    for node in nodes:
        for out in node.output:
            if out and out in seen:
                issues.append(ModelIssue(node.name or out, node.op_type, f"tensor {out!r} is produced twice"))
            seen.add(out)
    return issues


def _needed_nodes(nodes, outputs, inputs, consts) -> list[onnx.NodeProto]:
    """The nodes the chosen outputs depend on, in the file's order (which ONNX requires topological)."""
    producer = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = i
    available = set(inputs) | set(consts)
    for name in outputs:
        if name not in producer and name not in available:
            raise OnnxlipError(f"output tensor {name!r} is not produced by any node of the model")
    needed: set[int] = set()
    stack = [producer[n] for n in outputs if n in producer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        for name in _node_inputs(nodes[i]):
            if name in producer:
                if producer[name] >= i:
                    raise OnnxlipError(f"the graph is not topologically sorted or has a cycle at tensor {name!r}")
                stack.append(producer[name])
            elif name not in available:
                raise OnnxlipError(
                    f"tensor {name!r} (input of node {nodes[i].name or nodes[i].op_type!r}) is never produced: "
                    "the file is truncated or the graph is broken"
                )
    return [nodes[i] for i in sorted(needed)]


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    names = [n for n in node.input if n]
    for attr in node.attribute:  # outer-scope names used inside subgraphs (If/Loop)
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
            names += [n for sub in g.node for n in sub.input if n and n not in inner]
    return names


# ---- shape inference ----------------------------------------------------------------------------------
def _infer_shapes(proto, nodes, inputs, consts) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor, by onnx shape inference on a light copy (big weights as typed inputs)."""
    used = {n for node in nodes for n in _node_inputs(node)}
    graph_inputs, initializers = [], []
    for name, shape in inputs.items():
        graph_inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
    for name in sorted(used & set(consts)):
        arr = consts[name]
        if arr.size <= 4096 or arr.dtype.kind in "iub":
            initializers.append(numpy_helper.from_array(arr, name))
        else:
            dtype = helper.np_dtype_to_tensor_dtype(arr.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, dtype, list(arr.shape)))
    g = helper.make_graph(nodes, "shapes", graph_inputs, [], initializers)
    light = helper.make_model(g, opset_imports=list(proto.opset_import))
    light.ir_version = 8  # our own copy: IR 3 rules (initializers must be inputs) would defeat inference
    try:
        inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; all mean the same to the user
        raise ShapeError(f"shape inference failed: {exc}") from None
    shapes: dict[str, tuple[int, ...]] = {name: tuple(shape) for name, shape in inputs.items()}
    for name, arr in consts.items():
        shapes[name] = tuple(arr.shape)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if all(d is not None for d in dims):
            shapes[vi.name] = tuple(int(d) for d in dims)
    for name, shape in shapes.items():
        if any(d < 0 for d in shape) or math.prod(shape) > _MAX_ENTRIES:
            raise ShapeError(f"tensor {name!r} would have shape {shape}: not a plausible static shape (damaged file?)")
    return shapes


# ---- constant folding -----------------------------------------------------------------------------------
def _fold_constants(proto, nodes, consts, shapes, origins) -> list[onnx.NodeProto]:
    """Evaluate Constant nodes, Shape/Size of statically shaped tensors and every node whose inputs are
    all constant (the Shape/Gather/Unsqueeze/Concat chains of torch exports, DequantizeLinear of weights)."""
    remaining = []
    for node in nodes:
        try:
            values = _fold_one(proto, node, consts, shapes)
        except OnnxlipError:
            raise
        except Exception:  # noqa: BLE001 - leave the node to its import rule, which will explain
            values = None
        if values is None:
            remaining.append(node)
            continue
        # a folded float tensor derives from the original float initializers it was computed from
        sources = tuple(sorted({s for n in node.input if n in origins for s in origins[n]}))
        for name, value in zip(node.output, values):
            if name:
                consts[name] = value
                shapes[name] = tuple(value.shape)
                if sources and value.dtype.kind == "f":
                    origins[name] = sources
    return remaining


def _fold_one(proto, node, consts, shapes):
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        return _constant_value(node)
    if node.op_type in ("Shape", "Size") and node.input[0] in shapes and node.input[0] not in consts:
        shape = shapes[node.input[0]]
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape)), dtype=np.int64)]
        start = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "start"), 0)
        end = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "end"), None)
        return [np.array(shape[start:end], dtype=np.int64)]
    names = [n for n in node.input if n]
    if node.op_type in _NONDETERMINISTIC or not all(n in consts for n in names):
        return None
    if node.attribute and any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    ):
        return None
    if sum(consts[n].nbytes for n in names) > _FOLD_LIMIT:
        return None
    from onnx.reference import ReferenceEvaluator

    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(consts[n].dtype), list(consts[n].shape))
        for n in names
    ]
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.output if n]
    g = helper.make_graph([node], "fold", inputs, outputs)
    m = helper.make_model(g, opset_imports=list(proto.opset_import))
    m.ir_version = 8
    results = ReferenceEvaluator(m).run(None, {n: consts[n] for n in names})
    return [np.asarray(r) for r in results]


def _constant_value(node) -> list[np.ndarray]:
    attr = node.attribute[0]
    value = helper.get_attribute_value(attr)
    if attr.name == "value":
        return [numpy_helper.to_array(value)]
    if attr.name == "value_float":
        return [np.array(value, dtype=np.float32)]
    if attr.name == "value_floats":
        return [np.array(value, dtype=np.float32)]
    if attr.name == "value_int":
        return [np.array(value, dtype=np.int64)]
    if attr.name == "value_ints":
        return [np.array(value, dtype=np.int64)]
    raise OnnxlipError(f"Constant node {node.name!r} uses unsupported attribute {attr.name!r}")


# ---- messages and checks ----------------------------------------------------------------------------------
def _unsupported_reason(node: onnx.NodeProto) -> str:
    if node.op_type in REJECTED:
        return REJECTED[node.op_type]
    if node.domain not in ("", "ai.onnx"):
        return f"op from domain {node.domain!r} is not a ReLU-network op"
    return f"{node.op_type} is not supported by onnxlip (not a known piecewise-linear op)"


def _output_hint(nodes, issues, shapes, outputs, consts) -> str | None:
    """Suggest --output TENSOR: run-time inputs of the unsupported nodes that do not themselves depend on an
    unsupported node."""
    bad = {i.node for i in issues}
    name_of = {id(n): n.name or (n.output[0] if n.output else "?") for n in nodes}
    tainted: set[str] = set()
    for n in nodes:  # topological order: taint everything downstream of an unsupported node
        if name_of[id(n)] in bad or any(t in tainted for t in n.input):
            tainted.update(o for o in n.output if o)
    candidates = []
    for n in nodes:
        if name_of[id(n)] not in bad:
            continue
        for t in n.input:
            if t and t not in tainted and t not in consts and t in shapes and t not in candidates:
                candidates.append(t)
    if not candidates:
        return None
    flags = " ".join(f"--output {c}" for c in candidates[:4])
    return f"hint: to analyse the network up to the unsupported tail (e.g. the logits before a Softmax), use {flags}"


def _check_finite(ir: Graph) -> None:
    bad = [p.name for p in ir.params() if not p.all_finite()]
    if bad:
        raise OnnxlipError(f"parameter(s) {', '.join(sorted(set(bad))[:8])} contain NaN or Inf values")
