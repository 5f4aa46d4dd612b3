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
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from .adjoint import emit_scores
from .api import _jsonable, analyse
from .companion import LOG10_2, CompanionEmitter, log10_total, ones_feeds, plain_value
from .loading import ModelLike
from .rounding import relative_error_bound
from .runtime import make_session


@dataclass
class Bound:
    """One upper bound on a Lipschitz constant."""

    norm: str  # "inf->1", "inf->inf", "1->1", "2->2"
    value: float | None
    log10: float
    method: str
    certified: bool

    def to_json(self) -> dict:
        return _jsonable(asdict(self))


def _log10_max(m: np.ndarray, e: float) -> float:
    top = float(np.max(m)) if np.size(m) else 0.0
    return math.log10(top) + e * LOG10_2 if top > 0 else -math.inf


def pathnorm_bounds(
    model: ModelLike,
    *,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
) -> list[Bound]:
    """The four path-norm Lipschitz bounds of the model (certified upper bounds)."""
    m = analyse(model, output, input_shapes)
    graph = m.graph
    values = {}
    for node in graph.nodes:
        for role, p in node.params.items():
            values[p.name] = np.zeros_like(p.value) if role == "bias" else p.value
    em = CompanionEmitter(1.0, {"value": values}, "value")
    outs, _, b_inputs = emit_scores(graph, em, input_paths_only=True)
    pieces = [outs[i] for i in range(len(outs))] + [b_inputs[t] for t in graph.inputs if t in b_inputs]
    for s in pieces:
        for t in (s.m, s.e):
            em.add_output(em.op("Identity", [t], "out"))
    session, _ = make_session(em.model(), device, em.external)
    vals = session.run(None, ones_feeds(graph))
    pairs = [(vals[i], float(vals[i + 1])) for i in range(0, len(vals), 2)]
    fwd, adj = pairs[: len(outs)], pairs[len(outs) :]
    # rounding margins: the forward stream, and the adjoint (same ops, transposed) bounded the same way
    margin = math.log10(1.0 / (1.0 - relative_error_bound(graph))) if graph.nodes else 0.0
    inf_1 = log10_total(fwd) + margin
    inf_inf = max((_log10_max(mm, e) for mm, e in fwd), default=-math.inf) + margin
    one_one = max((_log10_max(mm, e) for mm, e in adj), default=-math.inf) + 2 * margin
    two_two = (inf_inf + one_one) / 2 if math.isfinite(inf_inf) and math.isfinite(one_one) else -math.inf
    return [
        Bound("inf->1", plain_value(inf_1), inf_1, "path-norm: sum of all input paths", True),
        Bound("inf->inf", plain_value(inf_inf), inf_inf, "path-norm: largest path mass reaching one output", True),
        Bound("1->1", plain_value(one_one), one_one, "path-norm: largest path mass leaving one input (adjoint)", True),
        Bound("2->2", plain_value(two_two), two_two, "path-norm: sqrt(L_1->1 * L_inf->inf)", True),
    ]
