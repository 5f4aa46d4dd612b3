"""Input-space Lipschitz bounds from the companion graph (theory.md section 5). With every bias and fixed
constant set to zero, only paths that start at an input remain, and for a ReLU network the Jacobian at almost
every x is a sum of some of those paths' products, so (all certified, float32 rounding margin included):

- ||R(x) - R(x')||_1   <= L_inf_1   * ||x - x'||_inf,  L_inf_1   = sum of all input paths;
- ||R(x) - R(x')||_inf <= L_inf_inf * ||x - x'||_inf,  L_inf_inf = max over outputs of the path mass reaching it;
- ||R(x) - R(x')||_1   <= L_1_1     * ||x - x'||_1,    L_1_1     = max over inputs of the path mass leaving it;
- ||R(x) - R(x')||_2   <= sqrt(L_1_1 * L_inf_inf) * ||x - x'||_2 (Riesz-Thorin / Schur test).

One forward and one adjoint run of the companion."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .adjoint import emit_scores
from .api import analyse, log10_rounded_up
from .args import check_seed, int_arg, seconds_arg
from .companion import LOG10_2, CompanionEmitter, log10_total, ones_feeds, plain_value
from .compiled import RAISE_FLOORS, Raised, certify, raised_note
from .errors import RuntimeFailure, UnderflowError, public
from .loading import ModelLike
from .range_guard import guard_program, log2_min_nonzero
from .results import jsonable
from .rounding import relative_error_bound
from .runtime import cuda_possible, make_session, no_reuse_planning, run


@dataclass
class Bound:
    """One upper bound on a Lipschitz constant."""

    norm: str  # "inf->1", "inf->inf", "1->1", "2->2"
    value: float | None
    log10: float
    method: str
    certified: bool

    def to_json(self) -> dict:
        return jsonable(asdict(self))


def _log10_max(m: np.ndarray, e: float) -> float:
    top = float(np.max(m)) if np.size(m) else 0.0
    return math.log10(top) + e * LOG10_2 if top > 0 else -math.inf


def pathnorm_bounds(
    model: ModelLike,
    *,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
    notes: list[str] | None = None,
) -> list[Bound]:
    """The four path-norm Lipschitz bounds of the model (certified upper bounds). Where float32 cannot hold the
    companion values closely enough (range_guard), tiny weights are raised (see _raised_values) and a note is
    appended to `notes`."""
    m = analyse(model, output, input_shapes, keep_proto=False)
    graph = m.graph
    values = {}
    for node in graph.nodes:
        for role, p in node.params.items():
            values[p.name] = np.zeros(p.shape) if role == "bias" else p  # a Param: read without forming it
    plain, certified = _pathnorm_bounds(graph, values, device)
    if certified:
        return _bounds(plain, "")
    for floor in RAISE_FLOORS:
        raised, certified = _pathnorm_bounds(graph, _raised_values(graph, floor), device)
        if not certified:
            continue
        if notes is not None:  # inf->1, the sum of all paths, tells how much the raising added
            notes.append(raised_note("each path-norm bound", Raised(floor, raised[0], plain[0])))
        return _bounds(raised, f" (weights raised to 2**{floor})")
    raise UnderflowError(
        "float32 cannot hold this model's companion values closely enough to certify the path-norm bounds, even "
        f"with tiny weights raised to 2**{RAISE_FLOORS[-1]} of their tensor's largest (range_guard)"
    )


def _raised_values(graph, floor: int) -> dict:
    """Zero biases, and each weight's float32 mantissas with every nonzero entry below 2**floor raised to it, as
    ready (mantissas, exponent, lam) triples. Path masses are monotone in |w|, so every path-norm bound of the
    raised network bounds the original's. An entry whose true mantissa is below 2**floor is raised above it; one
    at or above it rounds to at least 2**floor (a power of two), so the rounding margin covers it as before."""
    values = {}
    for node in graph.nodes:
        for role, p in node.params.items():
            if role == "bias":
                values[p.name] = np.zeros(p.shape)
                continue
            m, e = p.mantissas(1.0)
            raised = np.where(p.value != 0, np.maximum(m, np.float32(2.0**floor)), np.float32(0.0))
            values[p.name] = (raised, e, log2_min_nonzero(raised))
    return values


def _pathnorm_bounds(graph, values: dict, device: str) -> tuple[tuple[float, float, float, float], bool]:
    """log10 of the four bounds (inf->1, inf->inf, 1->1, 2->2) with the given weights, and whether range_guard
    certified the run."""
    em = CompanionEmitter(1.0, {"value": values}, "value", guarded=True)
    outs, _, b_inputs = emit_scores(graph, em, input_paths_only=True)
    pieces = [outs[i] for i in range(len(outs))] + [b_inputs[t] for t in graph.inputs if t in b_inputs]
    em.add_outputs(t for s in pieces for t in (s.m, s.e))
    # the score nodes: only the forward and the adjoint at the inputs are read (and range_guard's measurements)
    em.drop_dead_nodes(probes=[smallest for smallest, *_ in em.measured.values()])
    guard = guard_program(em, {}, [s.m for s in pieces], thorough=True)  # read entry by entry (maxima); one run
    n_values = len(em.outputs)
    em.add_outputs(guard.emit_fetch(em, cuda_possible(device)))
    model = em.model()
    reuse = not no_reuse_planning(graph, len(model.graph.node))
    session, _ = make_session(model, device, em.external, mem_reuse=reuse)
    feeds = ones_feeds(graph)
    vals = run(session, None, feeds)
    try:
        certify(guard, vals[n_values:], feeds, {})
        certified = True
    except UnderflowError:
        certified = False
    vals = vals[:n_values]
    pairs = [(vals[i], float(vals[i + 1])) for i in range(0, len(vals), 2)]
    fwd, adj = pairs[: len(outs)], pairs[len(outs) :]
    # rounding margins: the forward stream, and the adjoint (same ops, transposed) bounded the same way
    margin = math.log10(1.0 / (1.0 - relative_error_bound(graph))) if graph.nodes else 0.0
    inf_1 = log10_total(fwd) + margin
    inf_inf = max((_log10_max(mm, e) for mm, e in fwd), default=-math.inf) + margin
    one_one = max((_log10_max(mm, e) for mm, e in adj), default=-math.inf) + 2 * margin
    two_two = (inf_inf + one_one) / 2 if math.isfinite(inf_inf) and math.isfinite(one_one) else -math.inf
    return tuple(log10_rounded_up(v) for v in (inf_1, inf_inf, one_one, two_two)), certified


def _bounds(log10s: tuple[float, float, float, float], raised: str) -> list[Bound]:
    methods = (
        "path-norm: sum of all input paths",
        "path-norm: largest path mass reaching one output",
        "path-norm: largest path mass leaving one input (adjoint)",
        "path-norm: sqrt(L_1->1 * L_inf->inf)",
    )
    return [
        Bound(norm, plain_value(v), v, method + raised, True)
        for norm, v, method in zip(("inf->1", "inf->inf", "1->1", "2->2"), log10s, methods)
    ]


# ---- AutoLip with certified operator norms, lower bounds, and the report ------------------------------------
@dataclass
class LayerNorm:
    node: str
    op: str
    estimate: float | None
    certified: float


@dataclass
class LipschitzResult:
    norm: str
    upper: Bound
    lower: dict
    bounds: list[Bound]
    layers: list[LayerNorm]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return jsonable(
            {
                "norm": self.norm,
                "upper": self.upper.to_json(),
                "lower": self.lower,
                "bounds": [b.to_json() for b in self.bounds],
                "layers": [asdict(x) for x in self.layers],
                "notes": self.notes,
            }
        )


_NORMED_OPS = ("conv", "conv_transpose", "dense")
_NON_RELU_OPS = ("unary_lipschitz", "group_sort")


def layer_norms(
    graph, estimate: bool = False, iters: int = 50, progress: Callable[[], None] | None = None
) -> dict[str, LayerNorm]:
    """Certified l2 operator norm of every conv/dense op (opnorm: circular embedding, Gram + Cholesky), and with
    `estimate` a power-iteration estimate (all convs batched in one onnxruntime session)."""
    from . import opnorm

    out: dict[str, LayerNorm] = {}
    conv_layers, conv_nodes = [], []
    for node in graph.nodes:
        if node.op not in _NORMED_OPS:
            continue
        w = node.params["weight"].value
        if node.op == "dense":
            cert = opnorm.dense_norm(w)
            est = opnorm.dense_norm_estimate_power(w).sigma if estimate else None
        else:
            a = node.attrs
            layer = opnorm.ConvLayer(
                w,
                tuple(graph.shapes[node.inputs[0]][2:]),
                tuple(a["strides"]),
                tuple(a["pads"]),
                tuple(a["dilations"]),
                a["group"],
                node.op == "conv_transpose",
                tuple(a.get("output_padding", [0] * len(a["strides"]))),
            )
            (cert,) = opnorm.conv_norms_certified([layer])
            est = None
            conv_layers.append(layer)
            conv_nodes.append(node)
        out[node.name] = LayerNorm(node.name, node.onnx_op, est, cert)
        if progress is not None:
            progress()
    if estimate and conv_layers:
        for node, e in zip(conv_nodes, opnorm.conv_norms_estimate_power(conv_layers, max_iters=iters, tol=1e-6)):
            out[node.name].estimate = e.sigma
    return out


def autolip(graph, norms: Mapping[str, float]) -> float:
    """AutoLip (seed 001): compose each op's l2 Lipschitz constant over the DAG (inputs count 1 each, the
    outputs are combined as one concatenated vector)."""
    from .ops import OPS

    lip: dict[str, float] = {name: 1.0 for name in graph.inputs}
    for node in graph.nodes:
        outs = OPS[node.op].lipschitz(node, graph.shapes, [lip[t] for t in node.inputs], norms.get(node.name))
        # a rule takes a few roundings, and one more per input it combines
        lip.update(zip(node.outputs, (rounded_up(v, 8 + 2 * len(node.inputs)) for v in outs)))
    # the l2 norm of the outputs' constants, scaled by the largest: squares of constants above 1e154 overflowed
    top = max((lip[t] for t in graph.outputs), default=0.0)
    if not (0.0 < top < math.inf):
        return top
    total = math.sqrt(math.fsum((lip[t] / top) ** 2 for t in graph.outputs)) * top
    return rounded_up(total, 4 + 2 * len(graph.outputs))


def rounded_up(value: float, roundings: int) -> float:
    """A float >= the exact value of a computation that took at most `roundings` roundings to nearest, each
    monotone in non-negative operands (products, quotients, sums, square roots): the computed value is then at
    least exact * (1 - u)**roundings, u = 2**-53. Without this a product of 100 certified norms may fall a few
    ulps below the exact product, and so below a true Lipschitz constant it bounds."""
    if not math.isfinite(value) or value <= 0.0:
        return value
    return math.nextafter(value * (1.0 + 2.0 * roundings * 2.0**-53), math.inf)  # (the product rounds: nextafter)


def _ratio(d: np.ndarray, dx: np.ndarray, norm: str) -> np.ndarray:
    order = {"2": 2, "1": 1, "inf": np.inf}[norm]
    den = np.linalg.norm(dx, ord=order, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.linalg.norm(d, ord=order, axis=1) / den
    return np.where(den > 0, ratio, 0.0)


class _NonFinite(Exception):
    pass


def lower_bound(m, norm: str = "2", seconds: float = 2.0, seed: int = 0) -> tuple[float, int]:
    """The largest ||R(x) - R(x')|| / ||x - x'|| found by random pairs and a hill-climbing local search, run on
    the original model in onnxruntime: (ratio, pairs tried). Any pair gives a valid lower bound (of the network as
    onnxruntime computes it). NaN when the model's float32 outputs are not finite on the sampled inputs.

    `seconds` covers building the sampler and every batch: each batch is sized from the time per pair measured so
    far to end within it, so only the first pair (always tried when seconds > 0) can overrun it."""
    import time

    from .sampling import max_batch, sample_shape, sampler_for

    start = time.perf_counter()
    sampler = sampler_for(m)
    shapes = {n: sample_shape(s) for n, s in m.graph.inputs.items()}
    sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
    dim = sum(sizes.values())
    rng = np.random.default_rng(seed)

    def evaluate(x, dx):
        # measure the step between the inputs the model really reads (float32, or float16 / float64 where it
        # declares so): rounding inflated ratios (float16 inputs of an identity map gave 17.96)
        x1, x2 = np.empty_like(x), x + dx
        feeds, feeds2, first = {}, {}, 0
        for n, s in shapes.items():
            cols = slice(first, first + sizes[n])
            a, b = x[:, cols].astype(sampler.input_dtype(n)), x2[:, cols].astype(sampler.input_dtype(n))
            x1[:, cols], x2[:, cols] = a, b
            feeds[n], feeds2[n] = a.reshape((-1, *s)), b.reshape((-1, *s))
            first += sizes[n]
        d = sampler.run(feeds2) - sampler.run(feeds)
        if not np.all(np.isfinite(d)):  # Inf or NaN outputs: no ratio measures the network
            raise _NonFinite
        return _ratio(d, x2 - x1, norm)

    cap, tried, best, best_pair = max_batch(m.graph, 16), 0, 0.0, None
    batch = 1 if seconds > 0 else 0  # a first pair measures the cost of one
    while batch >= 1:
        began = time.perf_counter()
        if best_pair is None or rng.random() < 0.3:  # explore
            x = rng.uniform(-1, 1, size=(batch, dim))
            # steps of 0.1 to 1 per coordinate: small enough to stay local, large against float32 rounding
            dx = rng.normal(size=(batch, dim)) * 10.0 ** rng.uniform(-1, 0, size=(batch, 1))
        else:  # exploit: perturb the best pair; the step keeps its length (tiny steps would measure rounding)
            x = best_pair[0] + 0.05 * rng.normal(size=(batch, dim))
            length = np.linalg.norm(best_pair[1])
            dx = best_pair[1] + 0.2 * length / np.sqrt(dim) * rng.normal(size=(batch, dim))
            dx *= length / np.linalg.norm(dx, axis=1, keepdims=True)
        try:
            ratios = evaluate(x, dx)
        except _NonFinite:
            return math.nan, tried
        tried += batch
        i = int(np.argmax(ratios))
        if ratios[i] > best:
            best, best_pair = float(ratios[i]), (x[i], dx[i])
        now = time.perf_counter()
        per_pair = (now - began) / batch
        # one pair of slack: the sampler's one-off check of its batched runs, and timing noise
        batch = min(cap, int((seconds - (now - start)) / max(per_pair, 1e-9)) - 1)
    return best, tried


@public
def lipschitz(
    model: ModelLike,
    norm: str = "2",
    *,
    per_layer: bool = False,
    estimate_iters: int = 50,
    lower_seconds: float = 2.0,
    seed: int = 0,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
    progress: Callable[[], None] | None = None,
) -> LipschitzResult:
    """Upper bounds (path-norm and, for l2, AutoLip with certified operator norms) and a lower bound on the
    Lipschitz constant of the model with respect to its input, in the given norm ("2", "1" or "inf")."""
    from .errors import OnnxlipError

    norm = str(norm)
    if norm not in ("2", "1", "inf"):
        raise OnnxlipError(f"--norm must be 2, 1 or inf, got {norm!r}")
    lower_seconds = seconds_arg("lower_seconds (--lower-seconds)", lower_seconds)
    estimate_iters = int_arg("estimate_iters", estimate_iters, minimum=1)

    check_seed(seed)
    m = analyse(model, output, input_shapes, lipschitz=True, keep_proto=False)
    relu_network = not any(n.op in _NON_RELU_OPS for n in m.graph.nodes)
    if not relu_network and norm != "2":
        raise OnnxlipError(
            f"the l{norm} bounds come from path-norms, which need a ReLU network; this model has "
            "non-ReLU activations (Tanh, Sigmoid, GroupSort, ...): use --norm 2"
        )
    notes: list[str] = []
    bounds = []
    if relu_network:
        try:
            bounds = pathnorm_bounds(m, device=device, notes=notes)
        except UnderflowError as refused:
            if norm != "2":
                raise
            notes.append(f"no path-norm bound: {refused}; the AutoLip bound does not use the companion graph")
    by_norm = {b.norm: b for b in bounds}
    layers: dict[str, LayerNorm] = {}
    if norm == "2":
        layers = layer_norms(m.graph, estimate=per_layer, iters=estimate_iters, progress=progress)
        value = autolip(m.graph, {k: v.certified for k, v in layers.items()})
        log10 = log10_rounded_up(math.log10(value)) if value > 0 else -math.inf
        bounds.append(Bound("2->2", plain_value(log10), log10, "AutoLip, certified operator norms", True))
    own = norm + "->" + norm
    candidates = [b for b in bounds if b.norm == own] or [by_norm[own]]
    upper = min(candidates, key=lambda b: b.log10)
    try:
        lower, tried = lower_bound(m, norm, lower_seconds, seed)
        method = f"largest ratio over {tried} input pairs (random + local search)"
    except RuntimeFailure as exc:  # the certified bounds stand; only the observed figure needs the model to run
        lower, tried, method = None, 0, "none: onnxruntime cannot run the model itself"
        notes.append(f"no lower bound was measured: onnxruntime cannot run the model itself ({exc})")
    if lower is None:
        pass
    elif math.isnan(lower):
        lower, method = None, "none: the model's float32 outputs are not finite (Inf or NaN) on sampled inputs"
        notes.append(f"no lower bound was measured: {method[6:]}")
    elif tried == 0:  # (--lower-seconds 0): no pair, no figure (0.0 would read as a measured lower bound)
        lower, method = None, "none: no input pair was tried (lower_seconds is 0)"
    return LipschitzResult(
        norm,
        upper,
        # observed on the float32 network, not certified for the exact one (README "Lipschitz constant")
        {"value": lower, "method": method, "pairs": tried, "certified": False},
        bounds,
        list(layers.values()) if per_layer else [],
        notes,
    )
