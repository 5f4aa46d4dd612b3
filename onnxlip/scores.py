"""Path-magnitude scores of every parameter (theory.md section 4), computed by one onnxruntime session that
runs the companion forward pass and its adjoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .adjoint import emit_scores
from .api import analyse
from .companion import LOG10_2, CompanionEmitter, Scaled, log10_total, ones_feeds
from .ir import Graph
from .loading import ModelLike
from .runtime import make_session

# Constant folding: the adjoint stream depends on the weights only (the companion of a ReLU network is linear),
# so onnxruntime evaluates it while it builds the session. ResNet-18 on 2 CPU cores: from file to result as fast
# as "none" (~0.35 s), the run itself 3.2x a plain forward instead of 4.8x; "all" runs at ~2.9x but builds the
# session ~70 ms slower.
LEVEL = "fold"


@dataclass
class TensorScores:
    """Scores of one parameter tensor: `relative` = score / ||Phi||_1 (always <= 1, so it fits a float64)."""

    name: str
    shape: tuple[int, ...]
    log10_sum: float
    log10_max: float
    relative: np.ndarray
    sources: tuple[str, ...]

    @property
    def folded(self) -> bool:
        """True when the tensor also absorbed other initializers (e.g. a BatchNorm folded into a Conv)."""
        return len(self.sources) > 1


@dataclass
class ScoresResult:
    log10_path_norm: float
    outputs: list[str]
    device: str
    tensors: dict[str, TensorScores] = field(default_factory=dict)

    def absolute(self, name: str) -> np.ndarray:
        """Scores in absolute units (inf where they do not fit a float64)."""
        with np.errstate(over="ignore"):
            return self.tensors[name].relative * 10.0**self.log10_path_norm

    def to_json(self) -> dict:
        return {
            "log10_path_norm": self.log10_path_norm,
            "output": list(self.outputs),
            "device": self.device,
            "tensors": {
                n: {
                    "shape": list(t.shape),
                    "log10_sum": _finite(t.log10_sum),
                    "log10_max": _finite(t.log10_max),
                    "sources": list(t.sources),
                }
                for n, t in self.tensors.items()
            },
        }


def _finite(x: float):
    return x if math.isfinite(x) else None


def _relative(mant: np.ndarray, shift: float) -> np.ndarray:
    """mant * 2**shift in float64; shifts beyond float64's normal exponents go through ldexp (one rounding)."""
    if not math.isfinite(shift):  # zero path-norm: every score is 0
        return np.zeros(mant.shape)
    k = math.floor(shift)
    if -1000 < k < 1000:
        return np.multiply(mant, 2.0**shift, dtype=np.float64)
    return np.ldexp(np.multiply(mant, 2.0 ** (shift - k), dtype=np.float64), k)


def scores_graph(graph: Graph) -> tuple[CompanionEmitter, int, dict[str, Scaled]]:
    """The scores model: outputs are the (m, e) pairs of the companion outputs, then of every score."""
    params = {p.name: p for p in graph.params()}
    em = CompanionEmitter(1.0, {"value": {n: p.value for n, p in params.items()}}, "value")
    outs, score_map, _ = emit_scores(graph, em)
    em.add_outputs(t for s in outs + list(score_map.values()) for t in (s.m, s.e))
    em.drop_dead_nodes()
    return em, len(outs), score_map


def scores(
    model: ModelLike,
    *,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
) -> ScoresResult:
    """score_i = |theta_i| d||Phi||_1/d|theta_i| = the l1 path mass through parameter entry i, for every
    parameter tensor (keys: the user's initializer names; folded tensors list their sources)."""
    graph = analyse(model, output, input_shapes).graph
    params = {p.name: p for p in graph.params()}
    em, n_outs, score_map = scores_graph(graph)
    session, dev = make_session(em.model(), device, em.external, level=LEVEL)
    values = session.run(None, ones_feeds(graph))
    pairs = [(values[i], float(values[i + 1])) for i in range(0, len(values), 2)]
    log10_norm = log10_total(pairs[:n_outs])
    result = ScoresResult(log10_norm, list(graph.outputs), dev)
    log2_norm = log10_norm / LOG10_2
    for name, (mant, exp) in zip(score_map, pairs[n_outs:]):
        relative = _relative(mant, exp - log2_norm)  # <= 1: a score never exceeds the path-norm
        total, top = float(mant.sum(dtype=np.float64)), float(mant.max()) if mant.size else 0.0
        p = params[name]
        relative = relative.reshape(p.value.shape)
        if p.transposed:  # back to the layout of the user's initializer
            relative = relative.T
        result.tensors[name] = TensorScores(
            name,
            tuple(relative.shape),
            math.log10(total) + exp * LOG10_2 if total > 0 else -math.inf,
            math.log10(top) + exp * LOG10_2 if top > 0 else -math.inf,
            relative,
            tuple(p.sources),
        )
    return result
