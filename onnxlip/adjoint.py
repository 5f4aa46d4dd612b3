"""The adjoint (transpose) run of the companion graph and the path-magnitude scores (theory.md section 4).

Forward: a_u = sum of |Phi_p| over the paths ending at u (the companion). Adjoint: b_v = sum over the paths
from v to the outputs, i.e. the transpose network applied to all-ones at the outputs. For an edge u -> v of
weight w the score is |w| a_u b_v; a shared (conv) weight sums that over its edges, which is |w| times the
weight-gradient of the companion network. A bias b_v scores |b_v| b_v. Both runs are one ONNX graph, with the
same exponent bookkeeping as the companion, so scores of 1e300 networks are exact too."""

from __future__ import annotations

import numpy as np

from .companion import CompanionEmitter, Scaled, ones_inputs, zero_scaled
from .ir import Graph


def reduce_to(em: CompanionEmitter, tensor: str, from_shape, to_shape) -> str:
    """Sum a broadcast result back to the shape of the operand it came from (the adjoint of broadcasting)."""
    from_shape, to_shape = tuple(from_shape), tuple(to_shape)
    if from_shape == to_shape:
        return tensor
    lead = len(from_shape) - len(to_shape)
    padded = (1,) * lead + to_shape
    axes = [i for i, (f, t) in enumerate(zip(from_shape, padded)) if t == 1 and f != 1] + list(range(lead))
    axes = sorted(set(axes))
    out = em.op("ReduceSum", [tensor, em.i64(axes)], "rsum", keepdims=1) if axes else tensor
    return em.op("Reshape", [out, em.i64(to_shape if to_shape else [])], "rshape")


def scatter_add(em: CompanionEmitter, b: str, index: np.ndarray, in_shape) -> str:
    """Adjoint of a copy map out[j] = in[index[j]]: in-gradient[i] = sum of out-gradient[j] over index[j] = i."""
    size = int(np.prod(in_shape))
    zeros = em.const(np.zeros(size, np.float32), "zeros")
    flat = em.op("Reshape", [b, em.i64([-1])], "flat")
    idx = em.const(np.asarray(index, dtype=np.int64).ravel(), "sidx")
    summed = em.op("ScatterElements", [zeros, idx, flat], "scatter", axis=0, reduction="add")
    return em.op("Reshape", [summed, em.i64(in_shape)], "unflat")


def _ones_like(em: CompanionEmitter, shape) -> Scaled:
    zero_d = not tuple(shape)  # a 0-d output's seed: a mantissa all the same, not the shared scalar 1.0
    name = em.const(np.ones(shape, np.float32), "ones_out", shared=not zero_d)
    if zero_d:
        em.scalar_mantissas.add(name)  # (range_guard reads other 0-d constants as scalar multipliers)
    return Scaled(name, em.exponent(0))


def emit_scores(
    graph: Graph, em: CompanionEmitter, input_paths_only: bool = False
) -> tuple[list[Scaled], dict[str, Scaled], dict[str, Scaled]]:
    """Emit the companion forward run and the adjoint run. Returns (companion outputs, scores by parameter
    name, adjoint values b at the graph inputs). With `input_paths_only` the fixed constants of parameter-free
    ops are dropped (the caller zeroes the biases): only paths that start at an input remain (theory.md
    section 5)."""
    from .ops import OPS

    em.shapes = graph.shapes
    a_env: dict[str, Scaled] = ones_inputs(graph, em)
    for node in graph.nodes:
        ins = [a_env[t] for t in node.inputs]
        a_env.update(zip(node.outputs, OPS[node.op].companion(node, em, ins, not input_paths_only)))
    pending: dict[str, list[Scaled]] = {t: [_ones_like(em, graph.shapes[t])] for t in graph.outputs}
    scores: dict[str, Scaled] = {}
    for node in reversed(graph.nodes):
        b_out = [em.scaled_sum(pending[t]) if pending.get(t) else None for t in node.outputs]
        if all(b is None for b in b_out):
            continue  # nothing downstream reaches an output: every score here is 0
        b_out = [b if b is not None else zero_scaled(em, graph.shapes[t], "z") for b, t in zip(b_out, node.outputs)]
        rules = OPS[node.op]
        a_in = [a_env[t] for t in node.inputs]
        for t, b in zip(node.inputs, rules.adjoint(node, em, a_in, b_out)):
            if b is not None:
                pending.setdefault(t, []).append(b)
        if rules.scores is not None:
            for role, score in rules.scores(node, em, a_in, b_out).items():
                scores[node.params[role].name] = score
    b_inputs = {t: em.scaled_sum(pending[t]) for t in graph.inputs if pending.get(t)}
    return [a_env[t] for t in graph.outputs], scores, b_inputs
