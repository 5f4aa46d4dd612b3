"""Companion graphs compiled once into onnxruntime sessions and run for many parameter sets: the path-norm,
and the path-metric of one base model against many variants (theory.md section 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .companion import CompanionEmitter, Scaled, emit_metric, emit_pathnorm, log10_total, ones_feeds
from .ir import Graph
from .runtime import make_session

SIGN_SPLIT = "split at the midpoint with flipped entries zeroed: M(a, mid) + M(mid, b) (triangle inequality)"


class CompiledCompanion:
    """An emitted companion-type graph with its session; `log10(kinds)` runs it for fed parameter values."""

    def __init__(self, graph: Graph, em: CompanionEmitter, outs: list[Scaled | None], device: str, level: str = "none"):
        self.graph, self.em = graph, em
        self.empty = all(s is None for s in outs)
        self.device = "cpu" if device == "auto" else device
        if self.empty:  # no output depends on anything that differs: identically zero
            return
        for s in outs:
            if s is not None:
                for t in (s.m, s.e):
                    em.add_output(em.op("Identity", [t], "out"))
        self.session, self.device = make_session(em.model(), device, em.external, level)

    def log10(self, kinds: dict[str, dict[str, np.ndarray]] | None = None, exponents=None) -> float:
        """log10 of the sum of all outputs (-inf for zero); kinds/exponents as CompanionEmitter.feed_values."""
        if self.empty:
            return -math.inf
        feeds = self.em.feed_values(kinds or {}, exponents) if self.em.feed_specs else {}
        if self.em.ones_fed:
            feeds.update(ones_feeds(self.graph))
        values = self.session.run(None, feeds)
        return log10_total([(values[i], float(values[i + 1])) for i in range(0, len(values), 2)])


def pathnorm_log10_power(graph: Graph, q: float, device: str = "auto") -> tuple[float, str]:
    """log10 of sum_p |Phi_p|^q, by one run of the companion graph."""
    em = CompanionEmitter(q, {"value": {p.name: p.value for p in graph.params()}}, "value")
    compiled = CompiledCompanion(graph, em, emit_pathnorm(graph, em), device)
    return compiled.log10(), compiled.device


def _log10_add(x: float, y: float) -> float:
    if x == -math.inf or y == -math.inf:
        return max(x, y)
    top = max(x, y)
    return top + math.log10(10 ** (x - top) + 10 ** (y - top))


class MetricEngine:
    """Path-metrics between one base parameter set and many others of the same architecture.

    Two sessions, built on first use and reused: for variants the base dominates (|v| <= |base| entrywise, as
    pruning gives) the hi stream is the base's companion, a constant that onnxruntime evaluates once while
    building the session, so each variant costs only the difference stream; any other pair feeds hi, lo and
    delta."""

    def __init__(self, graph: Graph, device: str = "auto"):
        self.graph, self.device = graph, device
        self.base = {p.name: p.value for p in graph.params()}
        self.base_abs = {n: np.abs(v) for n, v in self.base.items()}
        # |base| <= 2**e: also a bound for every lo and delta of a variant the base dominates
        self.base_exp = {n: int(np.frexp(float(a.max()))[1]) if a.size else 0 for n, a in self.base_abs.items()}
        self._dominated: CompiledCompanion | None = None
        self._general: CompiledCompanion | None = None

    def _compile(self, kinds, fed, ones_fed) -> CompiledCompanion:
        em = CompanionEmitter(1.0, kinds, "hi", fed=fed, ones_fed=ones_fed)
        # a constant all-ones input means the hi stream is constant: let onnxruntime fold it once
        return CompiledCompanion(
            self.graph, em, emit_metric(self.graph, em), self.device, "none" if ones_fed else "fold"
        )

    def dominated_log10(self, vb_abs: dict[str, np.ndarray]) -> tuple[float, str]:
        """Metric between the base and a variant it dominates, given the variant's |values| (exact)."""
        delta = {n: self.base_abs[n] - b for n, b in vb_abs.items()}  # correctly rounded, as in float64
        if self._dominated is None:
            self._dominated = self._compile({"hi": self.base}, ("lo", "delta"), ones_fed=False)
        exps = {"lo": self.base_exp, "delta": self.base_exp}
        return self._dominated.log10({"lo": vb_abs, "delta": delta}, exps), self._dominated.device

    def general_log10(self, va_abs: dict[str, np.ndarray], vb_abs: dict[str, np.ndarray]) -> tuple[float, str]:
        """log10 of ||Phi(hi)||_1 - ||Phi(lo)||_1 without cancellation (an upper bound of the metric)."""
        hi = {n: np.maximum(va_abs[n], b) for n, b in vb_abs.items()}
        lo = {n: np.minimum(va_abs[n], b) for n, b in vb_abs.items()}
        delta = {n: hi[n] - lo[n] for n in hi}
        exps = {}
        for n, h in hi.items():
            exps[n] = int(np.frexp(float(h.max()))[1]) if h.size else 0
        if self._general is None:
            self._general = self._compile({}, ("hi", "lo", "delta"), ones_fed=True)
        kinds = {"hi": hi, "lo": lo, "delta": delta}
        return self._general.log10(kinds, {k: exps for k in kinds}), self._general.device

    def metric(self, vb: dict[str, np.ndarray]) -> MetricOutcome:
        """The metric between the base and vb, choosing the cheapest exact or certified route."""
        va = self.base
        vb_abs = {n: np.abs(v) for n, v in vb.items()}
        flips = sum(int(np.count_nonzero((va[n] < 0) & (vb[n] > 0) | (va[n] > 0) & (vb[n] < 0))) for n in va)
        changed = sum(int(np.count_nonzero(va[n] != vb[n])) for n in va)
        if flips == 0:
            if all(bool(np.all(self.base_abs[n] >= vb_abs[n])) for n in va):
                log10_m, dev = self.dominated_log10(vb_abs)
                return MetricOutcome(log10_m, True, 0, changed, "none needed", dev)
            exact = all(bool(np.all(self.base_abs[n] <= vb_abs[n])) for n in va)
            log10_m, dev = self.general_log10(self.base_abs, vb_abs)
            return MetricOutcome(log10_m, exact, 0, changed, "none needed", dev)
        # theory.md section 3: mid = base with the flipped entries zeroed; (base, mid) and (mid, vb) are
        # same-sign pairs and the base dominates mid
        mid_abs = {n: np.where(va[n] * vb[n] < 0, 0, self.base_abs[n]).astype(self.base_abs[n].dtype) for n in va}
        first, dev = self.dominated_log10(mid_abs)
        second, _ = self.general_log10(mid_abs, vb_abs)
        return MetricOutcome(_log10_add(first, second), False, flips, changed, SIGN_SPLIT, dev)


@dataclass
class MetricOutcome:
    log10_metric: float
    exact: bool
    sign_flips: int
    changed: int
    sign_flip_handling: str
    device: str
