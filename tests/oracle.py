"""Brute-force path-lifting oracle, independent of onnxlip's code (theory.md sections 1 and 6).

A tiny ONNX model is expanded into an explicit neuron-level ReLU-DAG by PROBING onnxruntime one ONNX node at a
time (a one-node model per node, its constant inputs as initializers):

* linear / affine nodes: the zero input gives the bias vector, a basis vector e_i the i-th column of the weight
  matrix; every output element becomes an identity neuron with an edge for every non-zero weight (fixed weights,
  e.g. the 1/K of an average pool, are edges too);
* Relu: a ReLU neuron (edge weight 1, bias 0); LeakyRelu(alpha) and PRelu = (1 - c) ReLU(x) + (c - alpha) ReLU(-x)
  + c x with c = alpha clipped to [0, 1] (ReLU(-x): a ReLU neuron whose edge weight is -1); Abs = LeakyRelu(-1);
  HardSigmoid = ReLU(alpha x + beta) - ReLU(alpha x + beta - 1);
  Clip(lo, hi) = lo + ReLU(x - lo) - ReLU(x - hi);
* Max / MaxPool / GlobalMaxPool / ReduceMax: max neurons whose candidates are found by probing (-1 everywhere,
  +1 at input i: output j selects i when it reads +1); Min(a, b) = -Max(-a, -b).

Every path (from an input neuron, or from a neuron with a non-zero bias, to an output neuron) is then enumerated
explicitly; Phi_p is the product of its edge weights (times the starting bias for a bias path). Paths are keyed
by their neuron sequences, which coincide for two models of one architecture (neurons are numbered in the order
the expansion creates them, which depends on the graph only, not on the weights).

`check_forward` validates an expansion: a float64 numpy forward pass of the DAG must match onnxruntime's output
of the original model on random inputs.

BatchNormalization: onnxlip folds an inference BatchNormalization into a preceding Conv / ConvTranspose / Gemm
(W' = a W, b' = a b + c), which can LOWER the path-norm when that op has a bias. `fold_batchnorm` does the same
fold, independently, in numpy on the ONNX model; tests of such models build the oracle on the folded model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ort.set_default_logger_severity(3)

OPSET = 17
IR_VERSION = 10

LINEAR_OPS = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sum",
    "Mean",
    "Neg",
    "BatchNormalization",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "ReduceSum",
    "Pad",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Gather",
    "Split",
    "Concat",
    "Resize",
    "Identity",
    "Dropout",
    "Expand",
    "Tile",
    "Einsum",
}
MAX_OPS = {"Max", "MaxPool", "GlobalMaxPool", "ReduceMax"}
MIN_OPS = {"Min", "ReduceMin"}
# ops that are linear only when at most one of their inputs is a run-time tensor
ONE_DYNAMIC = {"Mul", "Div", "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"}

INPUT, IDENT, RELU, MAX = 0, 1, 2, 3
_FLOAT32_PROBE_SCALE = 2.0**64


class OracleError(Exception):
    pass


def load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model) if isinstance(model, Path) else model)


# ---- the explicit DAG ---------------------------------------------------------------------------------
@dataclass
class Dag:
    kinds: list[int] = field(default_factory=list)
    biases: list[float] = field(default_factory=list)
    srcs: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # input name -> neuron ids (tensor shape)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # output name -> neuron ids (tensor shape)
    _phi: dict | None = field(default=None, repr=False)  # cached path enumeration (a Dag is never mutated after)

    def new(self, kind: int, bias: float = 0.0, srcs=(), weights=()) -> int:
        self._phi = None
        self.kinds.append(kind)
        self.biases.append(float(bias))
        self.srcs.append(np.asarray(srcs, dtype=np.int64))
        self.weights.append(np.asarray(weights, dtype=np.float64))
        return len(self.kinds) - 1

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def num_edges(self) -> int:
        return int(sum(len(s) for s in self.srcs))

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """float64 forward pass; feeds[name] has shape (B,) + the input's (batch-1) shape."""
        batch = next(iter(feeds.values())).shape[0]
        vals = np.zeros((len(self), batch))
        for name, ids in self.inputs.items():
            vals[ids.reshape(-1)] = np.asarray(feeds[name], dtype=np.float64).reshape(batch, -1).T
        for n, kind in enumerate(self.kinds):
            if kind == INPUT:
                continue
            s, w = self.srcs[n], self.weights[n]
            if kind == MAX:
                vals[n] = self.biases[n] + np.max(w[:, None] * vals[s], axis=0)
                continue
            z = self.biases[n] + (w @ vals[s] if len(s) else 0.0)
            vals[n] = np.maximum(z, 0.0) if kind == RELU else z
        return {name: vals[ids.reshape(-1)].T.reshape((batch,) + ids.shape) for name, ids in self.outputs.items()}

    def _successors(self) -> list[list[tuple[int, float]]]:
        succ: list[list[tuple[int, float]]] = [[] for _ in range(len(self))]
        for n in range(len(self)):
            for s, w in zip(self.srcs[n].tolist(), self.weights[n].tolist()):
                succ[s].append((n, w))
        return succ

    def _output_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for ids in self.outputs.values():
            for n in ids.reshape(-1).tolist():
                counts[n] = counts.get(n, 0) + 1
        return counts

    def _starts(self) -> list[int]:
        return [n for n in range(len(self)) if self.kinds[n] == INPUT or self.biases[n] != 0.0]

    def num_paths(self) -> int:
        """Number of paths with a non-zero start (DP count, used to refuse too large models)."""
        succ, outs = self._successors(), self._output_counts()
        count = [0] * len(self)
        for n in range(len(self) - 1, -1, -1):
            count[n] = outs.get(n, 0) + sum(count[m] for m, _ in succ[n])
        return sum(count[n] for n in self._starts())

    def paths(self, max_paths: int = 300_000) -> dict[tuple, float]:
        """Every path with its Phi_p, by explicit depth-first enumeration. Key: the neuron sequence."""
        if self._phi is not None:
            return self._phi
        total = self.num_paths()
        if total > max_paths:
            raise OracleError(f"{total} paths: too many for brute-force enumeration (limit {max_paths})")
        succ, outs = self._successors(), self._output_counts()
        # neurons from which an output can be reached
        reach = [False] * len(self)
        for n in range(len(self) - 1, -1, -1):
            reach[n] = n in outs or any(reach[m] for m, _ in succ[n])
        succ = [[(m, w) for m, w in lst if reach[m]] for lst in succ]
        phi: dict[tuple, float] = {}
        for start in self._starts():
            if not reach[start]:
                continue
            value0 = 1.0 if self.kinds[start] == INPUT else self.biases[start]
            stack = [((start,), value0)]
            while stack:
                path, value = stack.pop()
                last = path[-1]
                k = outs.get(last, 0)
                if k:
                    phi[path] = value
                    for extra in range(1, k):  # one neuron listed twice among the outputs: two paths
                        phi[path + (-extra,)] = value
                for m, w in succ[last]:
                    stack.append((path + (m,), value * w))
        assert len(phi) == total, (len(phi), total)
        self._phi = phi
        return phi

    def params_by_position(self) -> dict[tuple, float]:
        """Every edge weight and non-zero bias, keyed by position (for sign / dominance comparisons)."""
        out: dict[tuple, float] = {}
        for n in range(len(self)):
            if self.biases[n] != 0.0:
                out[("b", n)] = self.biases[n]
            for s, w in zip(self.srcs[n].tolist(), self.weights[n].tolist()):
                out[("w", s, n)] = out.get(("w", s, n), 0.0) + w
        return out


# ---- probing one node -------------------------------------------------------------------------------------
def _value_info(name: str, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


class _Probe:
    """A one-node model around `node`: run-time inputs are fed, constant inputs are initializers."""

    def __init__(self, node: onnx.NodeProto, dyn_shapes: dict[str, tuple[int, ...]], consts: dict[str, np.ndarray]):
        self.node = node
        self.slots = [i for i in dict.fromkeys(node.input) if i in dyn_shapes]  # unique run-time inputs, in order
        self.shapes = [tuple(dyn_shapes[i]) for i in self.slots]
        self.session = None
        self.np_dtype = None
        errors = []
        for np_dtype, onnx_dtype in ((np.float64, TensorProto.DOUBLE), (np.float32, TensorProto.FLOAT)):
            try:
                self.session = self._build(np_dtype, onnx_dtype, consts)
                self.np_dtype = np_dtype
                break
            except Exception as exc:  # noqa: BLE001 - float64 kernels are missing for many ops; fall back
                errors.append(str(exc).splitlines()[0])
        if self.session is None:
            raise OracleError(f"cannot probe {node.op_type}: {errors}")

    def _build(self, np_dtype, onnx_dtype, consts):
        inits = []
        for name in dict.fromkeys(self.node.input):
            if name and name not in self.slots:
                arr = consts[name]
                if arr.dtype.kind == "f":
                    arr = arr.astype(np_dtype)
                inits.append(numpy_helper.from_array(arr, name))
        inputs = [_value_info(n, onnx_dtype, s) for n, s in zip(self.slots, self.shapes)]
        outputs = [_value_info(o, onnx_dtype, None) for o in self.node.output if o]
        graph = helper.make_graph([self.node], "probe", inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    @property
    def num_in(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)

    def run(self, flat: np.ndarray) -> list[np.ndarray]:
        """Outputs (float64) for the concatenated flat run-time input vector `flat`."""
        feeds, k = {}, 0
        for name, shape in zip(self.slots, self.shapes):
            size = int(np.prod(shape))
            feeds[name] = flat[k : k + size].reshape(shape).astype(self.np_dtype)
            k += size
        return [np.asarray(o, dtype=np.float64) for o in self.session.run(None, feeds)]


# ---- the expansion ------------------------------------------------------------------------------------------
def _input_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else 1)  # symbolic -> 1
    return tuple(dims)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _const_eval(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[np.ndarray]:
    inits = [numpy_helper.from_array(consts[i], i) for i in dict.fromkeys(node.input) if i]
    outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "const", [], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {})


def expand(model) -> Dag:
    """The explicit neuron-level DAG of a tiny ONNX model (every symbolic dimension set to 1)."""
    model = load(model)
    graph = model.graph
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    dag = Dag()
    tensors: dict[str, np.ndarray] = {}  # tensor name -> neuron ids
    for vi in graph.input:
        if vi.name in consts:
            continue
        shape = _input_shape(vi)
        ids = np.array([dag.new(INPUT) for _ in range(int(np.prod(shape)))], dtype=np.int64).reshape(shape)
        tensors[vi.name] = ids
        dag.inputs[vi.name] = ids
    for node in graph.node:
        dyn = [i for i in node.input if i in tensors]
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(_attr(node, "value"))
            continue
        if node.op_type == "Shape":
            consts[node.output[0]] = np.array(tensors[node.input[0]].shape, dtype=np.int64)[
                _attr(node, "start", 0) : _attr(node, "end", None)
            ]
            continue
        if not dyn:
            for o, v in zip([o for o in node.output if o], _const_eval(node, consts)):
                consts[o] = v
            continue
        for i in node.input:
            if i and i not in tensors and i not in consts:
                raise OracleError(f"{node.op_type}: input {i!r} is neither a run-time tensor nor a constant")
        op = node.op_type
        if op in ONE_DYNAMIC and len(set(dyn)) > 1:
            raise OracleError(f"{op} of two run-time tensors is not linear")
        if op in LINEAR_OPS:
            _expand_linear(dag, node, tensors, consts)
        elif op == "Relu":
            _expand_elementwise_relu(dag, node, tensors, lo=0.0, hi=None, alpha=0.0)
        elif op == "PRelu":
            slope = np.broadcast_to(consts[node.input[1]].astype(np.float64), tensors[node.input[0]].shape)
            _expand_elementwise_relu(dag, node, tensors, lo=0.0, hi=None, alpha=slope.reshape(-1))
        elif op == "LeakyRelu":
            _expand_elementwise_relu(dag, node, tensors, lo=0.0, hi=None, alpha=float(_attr(node, "alpha", 0.01)))
        elif op == "Abs":
            _expand_elementwise_relu(dag, node, tensors, lo=0.0, hi=None, alpha=-1.0)
        elif op == "HardSigmoid":  # ReLU(alpha x + beta) - ReLU(alpha x + beta - 1)
            alpha, beta = float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))
            x = tensors[node.input[0]]
            out = [
                dag.new(
                    IDENT, 0.0, [dag.new(RELU, beta, [n], [alpha]), dag.new(RELU, beta - 1.0, [n], [alpha])], [1, -1]
                )
                for n in x.reshape(-1).tolist()
            ]
            tensors[node.output[0]] = np.array(out, dtype=np.int64).reshape(x.shape)
        elif op == "Clip":
            lo = float(consts[node.input[1]]) if len(node.input) > 1 and node.input[1] else None
            hi = float(consts[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
            _expand_elementwise_relu(dag, node, tensors, lo=lo, hi=hi, alpha=0.0)
        elif op in MAX_OPS or op in MIN_OPS:
            if any(i and i not in tensors for i in node.input[:1]) or (
                op in ("Max", "Min") and any(i not in tensors for i in node.input)
            ):
                raise OracleError(f"{op} with a constant operand is not supported by the oracle")
            _expand_max(dag, node, tensors, consts, sign=1.0 if op in MAX_OPS else -1.0)
        else:
            raise OracleError(f"op {op} is not supported by the oracle")
    for vi in graph.output:
        if vi.name not in tensors:
            raise OracleError(f"output {vi.name!r} is not a run-time tensor")
        dag.outputs[vi.name] = tensors[vi.name]
    return dag


def _expand_linear(dag: Dag, node, tensors, consts) -> None:
    probe = _Probe(node, {i: tensors[i].shape for i in node.input if i in tensors}, consts)
    src = np.concatenate([tensors[name].reshape(-1) for name in probe.slots])
    n_in = probe.num_in
    zero = probe.run(np.zeros(n_in))
    bias = np.concatenate([z.reshape(-1) for z in zero])
    cols = np.zeros((bias.size, n_in))
    scale = 1.0 if probe.np_dtype == np.float64 else _FLOAT32_PROBE_SCALE
    for i in range(n_in):
        e = np.zeros(n_in)
        e[i] = scale
        out = np.concatenate([o.reshape(-1) for o in probe.run(e)])
        cols[:, i] = (out - bias) / scale
    if probe.np_dtype == np.float32:
        # f(s e_i) = fl32(s w + b) = s w exactly when |b| is below half an ulp of s w: round back to float32
        cols = cols.astype(np.float32).astype(np.float64)
    if not np.all(np.isfinite(cols)) or not np.all(np.isfinite(bias)):
        raise OracleError(f"{node.op_type}: non-finite probe result")
    k = 0
    for o, z in zip([o for o in node.output if o], zero):
        ids = np.empty(z.size, dtype=np.int64)
        for j in range(z.size):
            row = cols[k + j]
            nz = np.flatnonzero(row)
            # a run-time input listed twice among the slots never happens (slots are unique names)
            ids[j] = dag.new(IDENT, bias[k + j], src[nz], row[nz])
        tensors[o] = ids.reshape(z.shape)
        k += z.size


def _expand_elementwise_relu(dag: Dag, node, tensors, lo, hi, alpha) -> None:
    x = tensors[node.input[0]]
    out = np.empty(x.size, dtype=np.int64)
    for j, n in enumerate(x.reshape(-1).tolist()):
        if node.op_type == "Clip":
            if lo is not None and hi is not None:  # lo + ReLU(x - lo) - ReLU(x - hi)
                r1 = dag.new(RELU, -lo, [n], [1.0])
                r2 = dag.new(RELU, -hi, [n], [1.0])
                out[j] = dag.new(IDENT, lo, [r1, r2], [1.0, -1.0])
            elif lo is not None:  # lo + ReLU(x - lo)
                r1 = dag.new(RELU, -lo, [n], [1.0])
                out[j] = dag.new(IDENT, lo, [r1], [1.0])
            elif hi is not None:  # x - ReLU(x - hi)
                r2 = dag.new(RELU, -hi, [n], [1.0])
                out[j] = dag.new(IDENT, 0.0, [n, r2], [1.0, -1.0])
            else:
                out[j] = dag.new(IDENT, 0.0, [n], [1.0])
        else:
            a = float(alpha[j]) if np.ndim(alpha) else alpha  # (PRelu: one slope per entry)
            if a == 0.0:
                out[j] = dag.new(RELU, 0.0, [n], [1.0])
                continue
            c = min(max(a, 0.0), 1.0)  # (1 - c) ReLU(x) + (c - a) ReLU(-x) + c x
            srcs, weights = [dag.new(RELU, 0.0, [n], [1.0]), n], [1.0 - c, c]
            if c != a:
                srcs.append(dag.new(RELU, 0.0, [n], [-1.0]))
                weights.append(c - a)
            keep = [k for k, w in enumerate(weights) if w != 0.0]
            out[j] = dag.new(IDENT, 0.0, [srcs[k] for k in keep], [weights[k] for k in keep])
    tensors[node.output[0]] = out.reshape(x.shape)


def _expand_max(dag: Dag, node, tensors, consts, sign: float) -> None:
    """Max neurons (sign=+1) or Min = -Max(-.) neurons (sign=-1); candidates found by probing."""
    if len([o for o in node.output if o]) != 1:
        raise OracleError(f"{node.op_type} with several outputs (indices) is not supported")
    probe = _Probe(node, {i: tensors[i].shape for i in node.input if i in tensors}, consts)
    src = np.concatenate([tensors[name].reshape(-1) for name in probe.slots])
    n_in = probe.num_in
    base = -sign * np.ones(n_in)
    (ref,) = probe.run(base)
    if not np.all(ref == -sign):
        raise OracleError(f"{node.op_type}: an output does not select any input (padding-only window?)")
    select = np.zeros((ref.size, n_in), dtype=bool)
    for i in range(n_in):
        e = base.copy()
        e[i] = sign
        (out,) = probe.run(e)
        select[:, i] = out.reshape(-1) == sign
    if not np.all(select.any(axis=1)):
        raise OracleError(f"{node.op_type}: an output selects no input")
    ids = np.empty(ref.size, dtype=np.int64)
    for j in range(ref.size):
        cand = src[np.flatnonzero(select[j])]
        if sign > 0:
            ids[j] = dag.new(MAX, 0.0, cand, np.ones(len(cand)))
        else:
            m = dag.new(MAX, 0.0, cand, -np.ones(len(cand)))
            ids[j] = dag.new(IDENT, 0.0, [m], [-1.0])
    tensors[node.output[0]] = ids.reshape(ref.shape)


# ---- BatchNormalization folding (numpy, on the ONNX model) ---------------------------------------------------
def fold_batchnorm(model) -> onnx.ModelProto:
    """Fold every inference BatchNormalization whose input comes from a Conv / ConvTranspose / Gemm (constant
    weight, output used by the BN only) into that op: W' = a W, b' = a b + c with a = gamma / sqrt(var + eps),
    c = beta - a mean. Folded parameters are computed in float64 and stored as float32."""
    model = onnx.ModelProto.FromString(load(model).SerializeToString())
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in g.initializer}
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    new_inits: dict[str, np.ndarray] = {}
    removed = []
    for bn in g.node:
        if bn.op_type != "BatchNormalization":
            continue
        x = bn.input[0]
        src = producer.get(x)
        if src is None or src.op_type not in ("Conv", "ConvTranspose", "Gemm") or users.get(x) != 1 or x in outputs:
            continue
        if src.input[1] not in inits or (len(src.input) > 2 and src.input[2] and src.input[2] not in inits):
            continue
        gamma, beta, mean, var = (inits[t] for t in bn.input[1:5])
        eps = float(_attr(bn, "epsilon", 1e-5))
        a = gamma / np.sqrt(var + eps)
        c = beta - a * mean
        w = new_inits.get(src.input[1], inits[src.input[1]])
        has_bias = len(src.input) > 2 and bool(src.input[2])
        if src.op_type == "Conv":
            w2 = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
            b = inits[src.input[2]] if has_bias else np.zeros(len(a))
            b2 = a * b + c
        elif src.op_type == "ConvTranspose":
            group = int(_attr(src, "group", 1))
            cin_g, cout_g = w.shape[0] // group, w.shape[1]
            out_ch = (np.arange(w.shape[0])[:, None] // cin_g) * cout_g + np.arange(cout_g)[None, :]
            w2 = w * a[out_ch].reshape(out_ch.shape + (1,) * (w.ndim - 2))
            b = inits[src.input[2]] if has_bias else np.zeros(len(a))
            b2 = a * b + c
        else:  # Gemm: Y = alpha op(A) op(B) + beta C, output channels on the last axis
            if _attr(src, "transB", 0):
                w2 = w * a[:, None]
            else:
                w2 = w * a[None, :]
            beta_g = float(_attr(src, "beta", 1.0))
            b = beta_g * np.broadcast_to(inits[src.input[2]], (len(a),)) if has_bias else np.zeros(len(a))
            b2 = a * b + c
            _set_attr(src, "beta", 1.0)
        bname = f"{src.name or src.output[0]}__folded_bias"
        new_inits[src.input[1]] = w2
        new_inits[bname] = b2
        if has_bias:
            src.input[2] = bname
        else:
            src.input.append(bname)
        src.output[0] = bn.output[0]
        removed.append(bn)
    for bn in removed:
        g.node.remove(bn)
    for name, arr in new_inits.items():
        for i, init in enumerate(g.initializer):
            if init.name == name:
                g.initializer[i].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
                break
        else:
            g.initializer.append(numpy_helper.from_array(arr.astype(np.float32), name))
    return model


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


# ---- quantities --------------------------------------------------------------------------------------------
def _dag(model_or_dag) -> Dag:
    return model_or_dag if isinstance(model_or_dag, Dag) else expand(model_or_dag)


def path_norm(model_or_dag, q: float = 1.0) -> float:
    """||Phi||_q by explicit enumeration of every path."""
    phi = np.fromiter(_dag(model_or_dag).paths().values(), dtype=np.float64)
    return float(np.sum(np.abs(phi) ** q) ** (1.0 / q))


def path_metric(a, b) -> float:
    """sum_p |Phi_p(a) - Phi_p(b)| over the union of the two models' paths."""
    pa, pb = _dag(a).paths(), _dag(b).paths()
    keys = set(pa) | set(pb)
    return float(math.fsum(abs(pa.get(k, 0.0) - pb.get(k, 0.0)) for k in keys))


def companion_dp(model_or_dag, q: float = 1.0) -> float:
    """Self-check of the enumeration: ||Phi||_q^q by dynamic programming on the same explicit DAG."""
    dag = _dag(model_or_dag)
    succ, outs = dag._successors(), dag._output_counts()
    mass = np.zeros(len(dag))  # sum over paths from n to the outputs of prod |w|^q
    for n in range(len(dag) - 1, -1, -1):
        mass[n] = outs.get(n, 0) + sum(abs(w) ** q * mass[m] for m, w in succ[n])
    total = sum(mass[n] * (1.0 if dag.kinds[n] == INPUT else abs(dag.biases[n]) ** q) for n in dag._starts())
    return float(total ** (1.0 / q))


def compare_params(a, b) -> tuple[int, bool]:
    """(number of edge weights / biases with opposite signs, whether one model dominates the other in
    absolute value at every position) on the explicit DAGs of a same-architecture pair."""
    pa, pb = _dag(a).params_by_position(), _dag(b).params_by_position()
    keys = set(pa) | set(pb)
    va = np.array([pa.get(k, 0.0) for k in keys])
    vb = np.array([pb.get(k, 0.0) for k in keys])
    flips = int(np.count_nonzero(va * vb < 0))
    dominated = bool(np.all(np.abs(va) >= np.abs(vb)) or np.all(np.abs(va) <= np.abs(vb)))
    return flips, dominated


# ---- validation of an expansion against onnxruntime ----------------------------------------------------------
def session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(load(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_model(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of `sess` for a batch of samples fed ONE AT A TIME (feeds[name] has shape (B,) + input shape)."""
    batch = next(iter(feeds.values())).shape[0]
    rows = []
    for k in range(batch):
        rows.append(sess.run(None, {n: v[k].astype(np.float32) for n, v in feeds.items()}))
    return [np.stack([np.asarray(r[i], dtype=np.float64) for r in rows]) for i in range(len(rows[0]))]


def check_forward(model, dag: Dag | None = None, samples: int = 6, seed: int = 0, scale: float = 1.0) -> float:
    """Assert the DAG's float64 forward pass matches onnxruntime on random inputs; return the max relative error."""
    model = load(model)
    dag = dag or expand(model)
    rng = np.random.default_rng(seed)
    feeds = {n: rng.uniform(-scale, scale, size=(samples,) + ids.shape) for n, ids in dag.inputs.items()}
    feeds = {n: v.astype(np.float32).astype(np.float64) for n, v in feeds.items()}
    got = dag.forward(feeds)
    ref = run_model(session(model), feeds)
    worst = 0.0
    for (name, g), r in zip(got.items(), ref):
        r = r.reshape(g.shape)
        tol = 1e-4 * (np.abs(r).max() + 1.0)
        err = float(np.abs(g - r).max())
        if err > tol:
            raise AssertionError(f"explicit DAG disagrees with onnxruntime on output {name}: {err} > {tol}")
        worst = max(worst, err / (np.abs(r).max() + 1.0))
    return worst
