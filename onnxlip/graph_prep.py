"""Preparing an ONNX graph for the import rules (importer.py): the constants, fixed input shapes, the nodes the
analysed outputs need, static shapes by ONNX shape inference, and constant folding of shape arithmetic."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .dequantize import fold_dequantize
from .errors import ModelIssue, OnnxlipError, ShapeError

# nodes that are never constant-folded even when their inputs are constant
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
FOLD_LIMIT = 64 * 2**20  # do not materialise constants above 64 MiB, unless the inputs were nearly as large
_GROWTH = 4  # (see _fold_fits)
_TOTAL_GROWTH = 6  # (see FoldBudget)
MAX_RANK = 64  # onnxruntime's (and numpy's) limit


# ---- constants and inputs -------------------------------------------------------------------------------
def initial_constants(graph: onnx.GraphProto, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    consts: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if any(d < 0 for d in init.dims):  # numpy would read a negative dim as "infer this one"
            raise OnnxlipError(
                f"initializer {init.name!r} has negative dimensions {tuple(init.dims)} (corrupt or damaged file?)"
            )
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


def user_input_shapes(user_shapes) -> dict[str, tuple[int, ...]]:
    """input_shapes as {name: tuple of positive ints}; ShapeError for anything else (a string "1x3x8x8", floats,
    bools, None, a list of pairs instead of a mapping)."""
    if user_shapes is None:
        return {}
    if not isinstance(user_shapes, Mapping):
        raise ShapeError(
            f"input_shapes must map input names to shapes, e.g. {{'x': [1, 3, 224, 224]}}, got {user_shapes!r}"
        )
    out = {}
    for name, dims in user_shapes.items():
        if not isinstance(name, str):
            raise ShapeError(f"input_shapes must be keyed by input names (strings), got {name!r}")
        if isinstance(dims, (str, bytes)) or not isinstance(dims, (Sequence, np.ndarray)):
            raise ShapeError(f"input_shapes[{name!r}] must be a list of positive integers, got {dims!r}")
        shape = []
        for d in dims:
            if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d <= 0:
                raise ShapeError(f"input_shapes[{name!r}] must be a list of positive integers, got {list(dims)!r}")
            shape.append(int(d))
        out[name] = tuple(shape)
    return out


def fixed_input_shapes(graph, consts, user_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    user_shapes = user_input_shapes(user_shapes)
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
                f"input {inp.name!r} has element type {type_name(ttype.elem_type)}; "
                "only floating-point inputs can be analysed"
            )
        if ttype.HasField("shape") and len(ttype.shape.dim) > MAX_RANK:
            rank = len(ttype.shape.dim)
            raise ShapeError(f"input {inp.name!r} has rank {rank}: onnxruntime runs tensors of rank {MAX_RANK} at most")
        if inp.name in user_shapes:
            shape = user_shapes[inp.name]
            if ttype.HasField("shape") and len(ttype.shape.dim) != len(shape):
                raise ShapeError(
                    f"input {inp.name!r} has rank {len(ttype.shape.dim)}, --input-shape gives {len(shape)}"
                )
            if any(d <= 0 for d in shape):
                raise ShapeError(f"--input-shape for {inp.name!r} must be positive, got {shape}")
            declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim]
            # a fixed batch may be overridden (batch 1 analyses one sample: batch_notes); any other fixed axis not:
            # the model would not run, and its bound would be the one of another model
            batch = 1 if len(shape) > 1 else 0  # a 1-D input has no batch axis
            clash = [a for a, d in enumerate(declared) if a >= batch and d is not None and d != shape[a]]
            if ttype.HasField("shape") and clash:
                fixed = "x".join("?" if d is None else str(d) for d in declared)
                raise ShapeError(
                    f"--input-shape {inp.name}={'x'.join(map(str, shape))} contradicts the model's fixed shape "
                    f"{fixed} (axis {', '.join(map(str, clash))}); --input-shape only fills in unknown dimensions"
                )
            out[inp.name] = shape
            continue
        if not ttype.HasField("shape"):
            problems.append((f"{inp.name} (rank unknown)", f"--input-shape {inp.name}=<its full shape>", None, []))
            continue
        dims = []
        symbols = []
        for axis, dim in enumerate(ttype.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif axis == 0:
                dims.append(1)  # the batch dimension
            else:
                dims.append(None)
                param = dim.dim_param if dim.HasField("dim_param") else ""
                symbols.append(param if param.isidentifier() and param.upper() != "X" else f"D{axis}")
        if None in dims:
            shown = "x".join("?" if d is None else str(d) for d in dims)
            it = iter(symbols)
            example = "x".join(next(it) if d is None else str(d) for d in dims)
            filled = "x".join("224" if d is None else str(d) for d in dims)
            problems.append(
                (f"{inp.name} ({shown})", f"--input-shape {inp.name}={example}", f"{inp.name}={filled}", symbols)
            )
        else:
            out[inp.name] = tuple(dims)
    if problems:
        unknown = list(dict.fromkeys(s for *_, syms in problems for s in syms))
        filled = [f for _, _, f, _ in problems if f]
        sizes = "its size" if len(unknown) == 1 else "their sizes"
        raise ShapeError(
            "unknown non-batch dimensions in input(s) "
            + ", ".join(p for p, _, _, _ in problems)
            + "; give them with --input-shape (input_shapes in Python): "
            + " ".join(e for _, e, _, _ in problems)
            + (f" with {', '.join(unknown)} replaced by {sizes}" if unknown else "")
            + (", e.g. --input-shape " + " --input-shape ".join(filled) if filled else "")
        )
    if not out:
        raise OnnxlipError("the model has no non-constant input")
    return out


def check_node_names(nodes: list[onnx.NodeProto], defined: Sequence[str] = ()) -> list[ModelIssue]:
    """A tensor is defined once: by one node, or as an initializer or graph input (`defined`)."""
    given = set(defined)
    seen: set[str] = set()
    issues = []
    for node in nodes:
        for out in node.output:
            if out and out in seen:
                issues.append(ModelIssue(node.name or out, node.op_type, f"tensor {out!r} is produced twice"))
            elif out and out in given:
                why = f"its output {out!r} is also an initializer or input of the graph (defined twice)"
                issues.append(ModelIssue(node.name or out, node.op_type, why))
            seen.add(out)
    return issues


def needed_nodes(nodes, outputs, inputs, consts) -> list[onnx.NodeProto]:
    """The nodes the chosen outputs depend on, in the file's order (which ONNX requires topological)."""
    producer = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = i
    available = set(inputs) | set(consts)
    for name in outputs:
        if name not in producer and name not in available:
            import difflib

            close = difflib.get_close_matches(name, list(producer), n=4, cutoff=0.5)
            if not close:  # the last tensors computed: where the logits usually are
                close = [t for t in list(producer)[-4:]][::-1]
            hint = f"; tensors it computes include {', '.join(repr(t) for t in close)}" if close else ""
            if name.endswith(".onnx"):
                hint += " (--output names a tensor to analyse up to; -o/--out names the file to write)"
            raise OnnxlipError(f"output tensor {name!r} is not produced by any node of the model{hint}")
    needed: set[int] = set()
    stack = [producer[n] for n in outputs if n in producer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        for name in node_inputs(nodes[i]):
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


def node_inputs(node: onnx.NodeProto) -> list[str]:
    names = [n for n in node.input if n]
    for attr in node.attribute:  # outer-scope names used inside subgraphs (If/Loop)
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
            names += [n for sub in g.node for n in sub.input if n and n not in inner]
    return names


# ---- constant folding -----------------------------------------------------------------------------------
class FoldBudget:
    """The entries all folded results may hold together: _TOTAL_GROWTH times the model's own constant entries plus
    FOLD_LIMIT bytes at 8 bytes an entry. Each node is bounded by _fold_fits, but a chain is not: ConstantOfShape
    then three Tiles, each within its own limit, formed 2.5 GiB from a 206-byte file. `refused`: the outputs of
    nodes left unfolded because the budget was spent (the importer explains them)."""

    LIMIT_TEXT = f"{_TOTAL_GROWTH} times the model's own constant entries plus {FOLD_LIMIT >> 23} Mi entries"

    def __init__(self, consts: Mapping[str, np.ndarray]):
        self.left = _TOTAL_GROWTH * sum(int(np.size(a)) for a in consts.values()) + FOLD_LIMIT // 8
        self.refused: set[str] = set()

    def refuse(self, node: onnx.NodeProto) -> None:
        self.refused.update(o for o in node.output if o)


def fold_constants(proto, nodes, consts, shapes, origins, budget: FoldBudget | None = None) -> list[onnx.NodeProto]:
    """Evaluate Constant nodes, Shape/Size of statically shaped tensors and every node whose inputs are
    all constant (the Shape/Gather/Unsqueeze/Concat chains of torch exports, DequantizeLinear of weights).
    `budget`: shared by every call on one model (FoldBudget)."""
    budget = budget or FoldBudget(consts)
    remaining = []
    for node in nodes:
        try:
            values = _fold_one(proto, node, consts, shapes, budget)
        except OnnxlipError:
            raise
        except Exception:  # noqa: BLE001 - leave the node to its import rule, which will explain
            values = None
        if values is not None and node.op_type != "Constant":
            size = sum(int(np.size(v)) for v in values)
            if size > budget.left:  # (the node's own limit kept this one allocation bounded)
                budget.refuse(node)
                values = None
            else:
                budget.left -= size
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


def _fold_one(proto, node, consts, shapes, budget: FoldBudget):
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        try:
            return _constant_value(node)
        except OnnxlipError:
            raise
        except Exception as exc:  # noqa: BLE001 - a value that does not decode (its data do not match its dims)
            where = node.name or (node.output[0] if node.output else "?")
            raise OnnxlipError(f"Constant node {where!r}: its value cannot be read: {exc}") from None
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
    if not _fold_fits(node, consts, shapes, names):
        return None
    if _out_entries(node, consts, shapes, names) > budget.left:
        budget.refuse(node)
        return None
    if node.op_type == "DequantizeLinear":  # onnxruntime's arithmetic, at every opset (onnxlip/dequantize.py)
        folded = fold_dequantize(node, consts)
        if folded is not None:
            return folded
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


def too_large_to_fold(node, consts, shapes) -> bool:
    """A node of constant inputs that folding leaves because of its result's size (_fold_fits)."""
    names = [n for n in node.input if n]
    if not names or not all(n in consts for n in names):
        return False
    return not _fold_fits(node, consts, shapes, names)


def _fold_fits(node, consts, shapes, names) -> bool:
    """Whether folding the node keeps memory bounded: its outputs may hold up to _GROWTH times as many entries as
    its inputs (a big weight read through Transpose, Cast or DequantizeLinear: int8 entries become float32), but
    no more than FOLD_LIMIT bytes beyond that (a ConstantOfShape, Expand or Tile of a few bytes can ask for
    gigabytes). Outputs of unknown shape: inputs up to FOLD_LIMIT only. Entries count 8 bytes (the widest type
    folded here)."""
    in_bytes = sum(consts[n].nbytes for n in names)
    in_entries = sum(consts[n].size for n in names)
    out_entries = _out_entries(node, consts, shapes, names)
    if out_entries < 0:
        return in_bytes <= FOLD_LIMIT
    return 8 * out_entries <= FOLD_LIMIT or out_entries <= _GROWTH * in_entries


def _out_entries(node, consts, shapes, names) -> int:
    """The entries of the node's outputs by their static shapes; -1 where one is not known."""
    out_entries = 0
    for i, name in enumerate(o for o in node.output if o):
        shape = shapes.get(name)
        if node.op_type == "ConstantOfShape" and i == 0 and names:
            shape = tuple(int(d) for d in np.asarray(consts[names[0]]).reshape(-1))
        if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            return -1
        out_entries += math.prod(int(d) for d in shape)
    return out_entries


def _constant_value(node) -> list[np.ndarray]:
    if len(node.attribute) != 1:  # (onnxruntime picks one of several; ONNX allows exactly one)
        names = [a.name for a in node.attribute]
        raise OnnxlipError(f"Constant node {node.name or node.output[0]!r} has {len(names)} value attributes {names}")
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


def type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:  # not an ONNX type at all
        return f"#{elem_type} (unknown)"
