"""ONNX -> ReLU-DAG IR: fix input shapes, fold constants and shape arithmetic, infer static shapes, then
hand every node to its op family's import rule. All problems are collected and reported together."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from .errors import ModelIssue, OnnxlipError, ShapeError, UnsupportedModelError
from .graph_prep import (
    FOLD_LIMIT,
    FoldBudget,
    check_node_names,
    fixed_input_shapes,
    fold_constants,
    initial_constants,
    needed_nodes,
    too_large_to_fold,
)
from .import_notes import batch_notes, output_hint, precision_notes, unsupported_reason
from .ir import Graph, Node, Param
from .loading import ModelLike, default_opset, load_model
from .ops import IMPORTERS, LIPSCHITZ_IMPORTERS
from .passes import run_passes
from .shapes import infer_shapes, why_not_inferred


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
        # initializers whose values a rule read into something other than a parameter (a PRelu slope, a Max
        # constant, a Clip bound): a variant that changes one is not the base's IR with other parameter values
        self.fixed_sources: set[str] = set()
        self._reads: set[str] = set()  # this node's: the sources of the constants its rule read
        self._param_sources: set[str] = set()  # this node's: the sources of the parameters its rule made

    def consumers_of(self, tensor: str) -> list[str]:
        """Names of the nodes (and graph outputs) that use a tensor."""
        return list(self.users.get(tensor, []))

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        value = self.consts.get(name)
        if value is not None:
            self._reads.update(self.origins.get(name, (name,)))
        return value

    def begin_node(self, node: onnx.NodeProto) -> None:
        self.node, self._reads, self._param_sources = node, set(), set()

    def end_node(self) -> None:
        """Constants the node's rule read but made no parameter of are fixed (see fixed_sources)."""
        self.fixed_sources.update(t for t in self._reads - self._param_sources if t in self.initializers)

    def is_const(self, name: str) -> bool:
        return bool(name) and name in self.consts

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise RuleError(f"the shape of tensor {name!r} is unknown")
        return self.shapes[name]

    def param(
        self,
        tensor: str,
        value: np.ndarray | None = None,
        sources: Iterable[str] | None = None,
        transposed=False,
        reshaped: bool = False,
    ) -> Param:
        """A learned parameter read from initializer `tensor` (or a value derived from it). `reshaped`: the value
        is the initializer reshaped in C order (transposed after that when `transposed`)."""
        arr = self.consts[tensor] if value is None else value
        src = tuple(sources) if sources is not None else self.origins.get(tensor, (tensor,))
        self.used_initializers.update(src)
        self._param_sources.update(src)
        self._param_sources.update(self.origins.get(tensor, (tensor,)))  # (also when `sources` narrows them)
        arr = np.asarray(arr)
        if arr.dtype not in (np.float32, np.float64):  # float16, int8 after folding, ...
            arr = arr.astype(np.float64)
        origin = tensor if self._unchanged(tensor, arr, transposed) else None
        file_shape = tuple(self.consts[tensor].shape) if reshaped else None
        return Param(tensor, arr, src, transposed, origin=origin, file_shape=file_shape)

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
    consts = initial_constants(graph, arrays or {})
    initializers = dict(consts)
    origins = {n: (n,) for n, arr in consts.items() if arr.dtype.kind == "f" or arr.dtype in (np.int8, np.uint8)}
    inputs = fixed_input_shapes(graph, consts, options.input_shapes)
    nodes = list(graph.node)
    issues = check_node_names(nodes, [*consts, *(i.name for i in graph.input)])
    outputs = list(options.outputs) if options.outputs else [o.name for o in graph.output]
    if not outputs:
        raise OnnxlipError("the model declares no outputs: name the tensor to analyse with --output")
    nodes = needed_nodes(nodes, outputs, inputs, consts)
    for name in outputs:
        if name in consts:
            raise OnnxlipError(f"output {name!r} is a constant of the model, not a computed tensor; choose another")
    type_issues: list[ModelIssue] = []
    shapes = infer_shapes(proto, nodes, inputs, consts, type_issues)
    # folding can reveal new static shapes (a Shape after a folded Pad), which can enable more folding
    budget = FoldBudget(consts)
    for _ in range(16):
        count = len(nodes)
        nodes = fold_constants(proto, nodes, consts, shapes, origins, budget)
        if len(nodes) == count:  # nothing folded: the shapes stand
            break
        shapes = infer_shapes(proto, nodes, inputs, consts, [])  # (type issues: reported from the first pass)
    for name in outputs:  # (folding may have made one a constant: a Transpose of a weight)
        if name in consts:
            raise OnnxlipError(f"output {name!r} is computed from constants only, not from the model's inputs")

    ctx = ImportContext(consts, shapes, opset, origins)
    ctx.initializers = initializers
    ctx.users = {}
    for n in nodes:
        for t in n.input:
            ctx.users.setdefault(t, []).append(n.name or n.op_type)
    for t in outputs:
        ctx.users.setdefault(t, []).append("a graph output")
    failed: set[str] = set()  # outputs of nodes with an issue: shapes downstream of them are not reported again
    unformed: set[str] = set()  # constants too large to form (FoldBudget) and what is computed from them
    # before any import rule runs: a rule may form arrays of an activation's size (copy maps, masks)
    _check_activation_entries(_activations(nodes, inputs, ctx.users), shapes)
    for node in nodes:
        ctx.begin_node(node)
        rule = IMPORTERS.get(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}")
        if options.lipschitz and node.domain in ("", "ai.onnx") and node.op_type in LIPSCHITZ_IMPORTERS:
            rule = LIPSCHITZ_IMPORTERS[node.op_type]
        where = node.name or (node.output[0] if node.output else "?")
        if any(o in budget.refused for o in node.output):  # a constant too large to form: not run either
            issues.append(ModelIssue(where, node.op_type, _BUDGET_SPENT))
            unformed.update(node.output)
            failed.update(node.output)
            continue
        if rule is None:
            reason = unsupported_reason(node)
            if too_large_to_fold(node, consts, shapes):
                reason = (
                    "computes a constant from constants, which onnxlip does not fold: its result would be too large "
                    f"(over {FOLD_LIMIT >> 20} MiB at 8 bytes an entry, and over 4 times its inputs' entries)"
                )
            issues.append(ModelIssue(where, node.op_type, reason))
            failed.update(node.output)
            continue
        if any(t in unformed for t in node.input):  # reads a constant never formed (its rule could be costly)
            unformed.update(node.output)
            failed.update(node.output)
            continue
        try:
            for out in node.output:  # (an output nothing reads, as Dropout's mask often is, needs no shape)
                if out and out not in shapes and out in ctx.users:
                    if any(t in failed for t in node.input):  # unknown because of a node already reported
                        failed.update(node.output)
                        break
                    reason = why_not_inferred(proto, node, shapes, consts)
                    raise RuleError(
                        f"the shape of its output {out!r} could not be inferred" + (f": {reason}" if reason else "")
                    )
            else:
                rule(node, ctx)
                ctx.end_node()
                empty = [o for o in node.output if o in shapes and o in ctx.users and 0 in shapes[o]]
                if empty and any(t in failed for t in node.input):  # empty because of a node already reported
                    failed.update(node.output)
                elif empty:  # (onnxruntime refuses to run it; a kernel larger than its padded input, a scale of 0)
                    raise RuleError(f"its output {empty[0]!r} would have shape {shapes[empty[0]]}: no entries")
        except RuleError as exc:
            issues.append(ModelIssue(where, node.op_type, str(exc)))
            failed.update(node.output)
        except OnnxlipError:
            raise
        except Exception as exc:  # noqa: BLE001 - attributes or shapes no rule expects (a damaged file)
            issues.append(ModelIssue(where, node.op_type, f"cannot be read ({type(exc).__name__}: {exc})"))
            failed.update(node.output)
    for name in outputs:
        if name not in shapes and name not in inputs and name not in failed:
            issues.append(ModelIssue(name, "-", "requested output tensor has no inferable static shape"))
    issues.extend(type_issues)
    if issues:
        raise UnsupportedModelError(issues, output_hint(nodes, issues, shapes, inputs, consts))
    _check_activation_entries((o for n in ctx.nodes for o in n.outputs), shapes)  # (with the rules' own tensors)
    ir = Graph(inputs=inputs, nodes=ctx.nodes, outputs=outputs, shapes=dict(shapes))
    for name, shape in inputs.items():
        ir.shapes[name] = shape
    ir.source_sizes = {n: int(consts[n].size) for n in ctx.used_initializers if n in consts}
    ir.fixed_sources = set(ctx.fixed_sources)
    ir.warnings.extend(precision_notes(graph, nodes, inputs))
    ir.warnings.extend(batch_notes(graph, inputs, options.input_shapes or {}))
    twice = [t for t in dict.fromkeys(outputs) if outputs.count(t) > 1]
    if twice:  # (--output names tensors, each once: args.output_names)
        ir.warnings.append(
            f"the model lists output(s) {', '.join(map(repr, twice))} more than once: its output vector holds each "
            f"copy, and every norm and bound counts them all; name the tensor with --output to count it once"
        )
    ir = run_passes(ir, lipschitz=options.lipschitz)
    _check_finite(ir)
    return ir


# ---- messages and checks ----------------------------------------------------------------------------------
_BUDGET_SPENT = (
    "computes a constant from constants, which onnxlip did not fold: the constants folded before it already hold "
    f"{FoldBudget.LIMIT_TEXT}, the most folding may create in one model"
)
MAX_ACTIVATION_ENTRIES = 2**27  # all activations together; onnxlip's sessions hold 25-60 bytes per entry


def _activations(nodes, inputs, users) -> list[str]:
    """The tensors computed from the model's inputs that something reads (nodes in topological order)."""
    found = set(inputs)
    for node in nodes:
        if any(t in found for t in node.input):
            found.update(node.output)
    return [t for t in found if t in users and t not in inputs]


def _check_activation_entries(tensors: Iterable[str], shapes) -> None:
    """Refuse a network whose activations (`tensors`) hold more than MAX_ACTIVATION_ENTRIES entries in all: its
    sessions would need tens of GB (a 1 KB Conv with pads of 3000 asked for 8 GB)."""
    sizes = {o: math.prod(shapes[o]) for o in tensors if o in shapes}
    total = sum(sizes.values())
    if total > MAX_ACTIVATION_ENTRIES:
        big = max(sizes, key=sizes.get)
        raise ShapeError(
            f"the network's activations hold {total:,} entries in all (the largest, {big!r}, has shape "
            f"{tuple(shapes[big])}), more than onnxlip analyses ({MAX_ACTIVATION_ENTRIES:,}: its sessions would need "
            "tens of GB); analyse the model on a smaller input (--input-shape where its size is free)"
        )


def _check_finite(ir: Graph) -> None:
    bad = [p for p in ir.params() if not p.all_finite()]
    if bad:
        names = sorted({p.name for p in bad})
        # a folded parameter's NaN may come from any initializer folded into it (a Mul constant after a MatMul)
        folded = sorted({s for p in bad for s in p.sources if s != p.name})
        also = f" (formed from initializers {', '.join(folded[:8])})" if folded else ""
        raise OnnxlipError(f"parameter(s) {', '.join(names[:8])}{also} contain NaN or Inf values")
