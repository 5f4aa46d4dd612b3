"""Companion-type graphs compiled once into onnxruntime sessions and run for many parameter sets."""

from __future__ import annotations

import math

import numpy as np

from .companion import CompanionEmitter, Scaled, emit_pathnorm, log10_total, ones_feeds
from .errors import OnnxlipError
from .ir import Graph
from .runtime import make_session, run

Pairs = dict[str, tuple[np.ndarray, int]]


class CompiledCompanion:
    """An emitted companion-type graph with its session; `log10(kinds)` runs it for fed parameter values."""

    def __init__(
        self,
        graph: Graph,
        em: CompanionEmitter,
        outs: list[Scaled | None],
        device: str,
        level: str = "none",
        extra: dict[str, Scaled] | None = None,
        spin: bool = True,
    ):
        """`extra`: further tensors to declare as outputs, read by `tensors()` (log10 does not fetch them);
        `spin`: see runtime.session_options (False for sessions run in turn with others)."""
        self.graph, self.em = graph, em
        self.empty = all(s is None for s in outs)
        self.device = "cpu" if device == "auto" else device
        if self.empty:  # no output depends on anything that differs: identically zero
            return
        em.add_outputs(t for s in outs if s is not None for t in (s.m, s.e))
        self.names = [o.name for o in em.outputs]
        self.extra = list(extra or {})
        em.add_outputs(t for name in self.extra for t in (extra[name].m, extra[name].e))
        self.extra_names = [o.name for o in em.outputs[len(self.names) :]]
        self.session, self.device = make_session(em.model(), device, em.external, level, spin=spin)

    def _feeds(self, kinds, exponents, pairs, more) -> dict[str, np.ndarray]:
        feeds = {}
        if self.em.feed_specs:
            feeds = self.em.feed_pairs(pairs) if pairs is not None else self.em.feed_values(kinds or {}, exponents)
        if self.em.ones_fed:
            feeds.update(ones_feeds(self.graph))
        feeds.update(more or {})
        return feeds

    def log10(
        self,
        kinds: dict[str, dict[str, np.ndarray]] | None = None,
        exponents=None,
        pairs: dict[str, Pairs] | None = None,
        more: dict[str, np.ndarray] | None = None,
    ) -> float:
        """log10 of the sum of all outputs (-inf for zero). The fed kinds come as values (`kinds`, `exponents`:
        see CompanionEmitter.feed_values) or as ready float32 (mantissa, exponent) `pairs`; `more`: other inputs."""
        if self.empty:
            return -math.inf
        values = run(self.session, self.names, self._feeds(kinds, exponents, pairs, more))
        return log10_total([(values[i], float(values[i + 1])) for i in range(0, len(values), 2)])

    def tensors(self, pairs: dict[str, Pairs]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The `extra` tensors' (mantissa, exponent) for the fed parameter pairs."""
        values = run(self.session, self.extra_names, self._feeds(None, None, pairs, None))
        return {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(self.extra)}


SMALLEST_NORMAL = np.float32(2.0**-126)


def pathnorm_log10_power(graph: Graph, q: float, device: str = "auto") -> tuple[float, str]:
    """log10 of sum_p |Phi_p|^q, by one run of the companion graph.

    A tensor's |w|^q share one float32 scale (theory.md section 2), so for q > 1 entries below 2**-126 of their
    tensor's largest |w|^q lose precision or become 0: paths through them are undercounted. When that happens a
    second run with those entries raised to 2**-126 of the scale bounds the sum from above; the result stands
    when the two agree to 1e-7 of the norm, else q is too large for this model and the error gives both."""
    # the weights are fed: onnxruntime reads our mantissas in place instead of copying them into the session
    em = CompanionEmitter(q, {}, "value", fed=("value",))
    compiled = CompiledCompanion(graph, em, emit_pathnorm(graph, em), device)
    params = graph.params()
    pairs = {p.name: p.mantissas(q) for p in params}
    lower = compiled.log10(pairs={"value": pairs})
    if q == 1:  # below 2**-126 of the largest entry of its tensor: negligible (onnxlip/rounding.py)
        return lower, compiled.device
    raised, lost = {}, 0
    for p in params:
        m, e = pairs[p.name]
        weak = (m < SMALLEST_NORMAL) & (p.value != 0)
        lost += int(np.count_nonzero(weak))
        raised[p.name] = (np.where(weak, SMALLEST_NORMAL, m), e)
    if lost == 0:
        return lower, compiled.device
    upper = compiled.log10(pairs={"value": raised})
    if (upper - lower) / q > math.log10(1 + 1e-7):
        raise OnnxlipError(
            f"q={q:g} is too large for this model: {lost} weight(s) fall below float32's range once raised to the "
            f"q-th power next to the largest of their tensor, and the L^{q:g} path-norm is only known to lie "
            f"between 10^{lower / q:.6f} and 10^{upper / q:.6f}; use a smaller q"
        )
    return lower, compiled.device
