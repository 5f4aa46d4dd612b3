"""Emission of the absolute-value companion graph (theory.md section 2) and of the cancellation-free
path-metric graph (section 3) as ONNX models.

Overflow safety: every companion tensor is a pair `Scaled(m, e)` meaning m * 2**e, with m a float32
tensor whose maximum is kept near 1 and e a float32 scalar holding an integer. Renormalising multiplies
by an exact power of two (no rounding), sums align exponents with multipliers <= 1, and the final sum
is formed in float64 on the host, so log10 of the result is right at any depth."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .graph_builder import GraphBuilder
from .ir import Graph, Node, Param
from .mantissas import ZERO_EXPONENT, array_lam, normalized_power

LOG10_2 = math.log10(2.0)
# exponent floor for all-zero tensors: multiplying 0 by 2**120 is harmless and avoids log(0)
_ZERO_MAX = 2.0**-120


@dataclass(frozen=True)
class Scaled:
    """A non-negative tensor m * 2**e (m: float32 tensor name, e: float32 scalar tensor name)."""

    m: str
    e: str


class CompanionEmitter(GraphBuilder):
    """Builds companion graphs. Parameter values come from `kinds`: a map from a kind name ("value", or
    "hi", "lo", "delta" for the metric) to {param name: array}; `q` is the path-norm exponent.
    Kinds listed in `fed` become graph inputs instead of constants (one session then serves many models of
    one architecture); `self.feed_specs` records how `feed_values` computes each of them.
    `ones_fed`: the all-ones input is a run-time input (else a constant, which lets onnxruntime fold every
    stream that depends only on constants while it builds the session)."""

    def __init__(
        self,
        q: float,
        kinds: dict[str, dict[str, np.ndarray]] | None,
        default_kind: str,
        fed: tuple[str, ...] = (),
        ones_fed: bool = True,
        guarded: bool = False,
    ):
        super().__init__()
        self.q = q
        self.kinds = kinds or {}
        self.default_kind = default_kind
        self.fed = set(fed)
        self.ones_fed = ones_fed
        self.guarded = guarded  # certified runs: range_guard checks that float32 underflow lost nothing
        self.feed_specs: dict[str, tuple[str, str, str]] = {}  # input name -> (kind, param name, "m"|"e")
        self._weights: dict[tuple[str, str], Scaled] = {}
        self._two = self.f32(2.0)
        # renormalised mantissa -> (the least entry of the sum it rescales, log2 of the rescaling, the largest
        # entry of that sum, the sum): range_guard
        self.measured: dict[str, tuple[str, str, str, str]] = {}
        # guarded: constant mantissa -> its true lam (range_guard.true_lam), which the float32 constant may not show
        self.const_lams: dict[str, Callable[[], float]] = {}
        # 0-d constants that are mantissas, not scalar multipliers (range_guard reads 0-d constants as the latter):
        # the adjoint's seed at a 0-d output
        self.scalar_mantissas: set[str] = set()

    # ---- parameters -------------------------------------------------------------------------------
    def weight(self, param: Param, kind: str | None = None) -> Scaled:
        """|param|**q of the given kind as a Scaled constant (or a pair of graph inputs if the kind is fed)."""
        kind = kind or self.default_kind
        key = (kind, param.name)
        if key not in self._weights:
            if kind in self.fed:
                m = self.add_input(self.fresh(f"{kind}_{param.name}"), param.shape)
                e = self.add_input(self.fresh(f"{kind}_{param.name}_exp"), ())
                self.feed_specs[m] = (kind, param.name, "m")
                self.feed_specs[e] = (kind, param.name, "e")
                self._weights[key] = Scaled(m, e)
            else:
                # an array, a Param (read without forming its value) or a ready (mantissa, exponent) pair (q = 1)
                source = self.kinds[kind][param.name]
                if isinstance(source, tuple):
                    m_arr, e_val = source[:2]
                    lam = source[2] if len(source) > 2 else -math.inf  # a pair's lam, if it comes with one
                elif isinstance(source, Param):
                    m_arr, e_val = source.mantissas(self.q)
                    lam = functools.partial(source.true_lam, e_val, self.q)
                else:
                    m_arr, e_val = normalized_power(source, self.q)
                    lam = functools.partial(array_lam, source, e_val, self.q)
                name = self.const(m_arr, f"{kind}_{param.name}")
                if self.guarded:
                    self.const_lams[name] = lam if callable(lam) else functools.partial(float, lam)
                self._weights[key] = Scaled(name, self.exponent(e_val))
        return self._weights[key]

    def feed_values(
        self, kinds: dict[str, dict[str, np.ndarray]], exponents: dict[str, dict[str, int]] | None = None
    ) -> dict[str, np.ndarray]:
        """The feeds of the fed kinds for the given parameter values; `exponents[kind][name]`, when given, is a
        known bound |value|**q <= 2**e (saves a pass). Arrays in `kinds` may be overwritten."""
        exponents = exponents or {}
        pairs: dict[str, dict[str, tuple[np.ndarray, int]]] = {}
        for kind, pname, _ in self.feed_specs.values():
            if pname not in pairs.setdefault(kind, {}):
                hint = exponents.get(kind, {}).get(pname)
                pairs[kind][pname] = normalized_power(kinds[kind][pname], self.q, hint)
        return self.feed_pairs(pairs)

    def feed_pairs(self, pairs: dict[str, dict[str, tuple[np.ndarray, int]]]) -> dict[str, np.ndarray]:
        """The feeds of the fed kinds from ready (float32 mantissa, exponent) pairs, as normalized_power gives."""
        out = {}
        for name, (kind, pname, part) in self.feed_specs.items():
            m, e = pairs[kind][pname][:2]  # a third entry may bound the mantissas for range_guard
            if part == "m":
                out[name] = np.asarray(m, dtype=np.float32)
            else:
                out[name] = np.array(ZERO_EXPONENT if is_zero(m) else e, dtype=np.float32)
        return out

    # ---- scale arithmetic ---------------------------------------------------------------------------
    def exponent(self, value: int) -> str:
        return self.f32(float(value))

    def pow2(self, e: str) -> str:
        return self.op("Pow", [self._two, e], "p2")

    def constant(self, array: np.ndarray, q: float | None = None, hint: str = "k") -> Scaled:
        """A fixed non-negative constant |array|**q (q defaults to the emitter's) as a Scaled tensor."""
        q = self.q if q is None else q
        m, e = normalized_power(array, q)
        name = self.const(m, hint)
        if self.guarded:
            self.const_lams[name] = functools.partial(array_lam, array, e, q)
        return Scaled(name, self.exponent(e))

    def align(self, exponents: list[str]) -> tuple[str, list[str]]:
        """Common exponent E = max(e_i) and the multipliers 2**(e_i - E) <= 1."""
        if len(exponents) == 1:
            return exponents[0], [self.f32(1.0)]
        top = self.op("Max", list(exponents), "emax")
        return top, [self.pow2(self.op("Sub", [e, top], "de")) for e in exponents]

    def add_exp(self, *exponents: str) -> str:
        out = exponents[0]
        for e in exponents[1:]:
            out = self.op("Add", [out, e], "e")
        return out

    def mul(self, tensor: str, factor: str) -> str:
        if factor == self._scalar_cache.get((np.dtype(np.float32).str, (), 1.0)):
            return tensor  # times the constant 1.0 (e.g. align's multiplier of a single term)
        return self.op("Mul", [tensor, factor], "mul")

    def renorm(self, m: str, e: str) -> Scaled:
        """Rescale m by an exact power of two so its maximum lies near 1; the exponent absorbs it."""
        found = self.op("ReduceMax", [m], "max", keepdims=0)
        top = self.op("Max", [found, self.f32(_ZERO_MAX)], "max")
        k = self.op("Floor", [self.op("Div", [self.op("Log", [top]), self.f32(math.log(2.0))])], "k")
        nonzero = self.op("Greater", [found, self.f32(0.0)], "nz")
        e_out = self.op("Where", [nonzero, self.add_exp(e, k), self.exponent(ZERO_EXPONENT)], "e")
        shift = self.op("Neg", [k])
        out = self.mul(m, self.pow2(shift))
        if self.guarded:
            self.measured[out] = (self.op("ReduceMin", [m], "least", keepdims=0), shift, found, m)
        return Scaled(out, e_out)

    def scaled_sum(self, terms: list[Scaled], renorm: bool = True) -> Scaled:
        """Sum of several Scaled tensors (broadcasting as ONNX Add does)."""
        if len(terms) == 1:
            return terms[0]
        top, mults = self.align([t.e for t in terms])
        acc = None
        for t, c in zip(terms, mults):
            term = self.mul(t.m, c)
            acc = term if acc is None else self.op("Add", [acc, term], "sum")
        return self.renorm(acc, top) if renorm else Scaled(acc, top)

    def scale_by(self, x: Scaled, factor: float, renorm: bool = False) -> Scaled:
        """x times a fixed positive float, keeping the mantissa bounded: a power of two goes to the exponent
        alone; otherwise the mantissa is multiplied by a float in (0.5, 1) and, with `renorm`, renormalised (a
        chain of such factors with nothing renormalising between them would shrink it out of float32's range)."""
        if factor == 1.0:
            return x
        mant, e = math.frexp(factor)
        return self._times(x, mant, e, renorm)

    def scale_by_power(self, x: Scaled, root: float, q: float, renorm: bool = False) -> Scaled:
        """x times root**q (root >= 0), without forming root**q in float64 (it may leave its range); `renorm` as
        for scale_by."""
        if q == 1.0 or root in (0.0, 1.0):
            return self.scale_by(x, root, renorm)
        log2 = q * math.log2(root)
        e = math.floor(log2) + 1
        return self._times(x, 2.0 ** (log2 - e), e, renorm)

    def _times(self, x: Scaled, mant: float, e: int, renorm: bool) -> Scaled:
        """x times mant * 2**e, mant in [0.5, 1)."""
        if mant == 0.5:  # a power of two: exact in the exponent, the mantissa untouched
            return Scaled(x.m, self.add_exp(x.e, self.exponent(e - 1)))
        out = Scaled(self.mul(x.m, self.f32(mant)), self.add_exp(x.e, self.exponent(e)))
        return self.renorm(out.m, out.e) if renorm else out

    def linear(
        self,
        terms: list[tuple[Scaled, Scaled]],
        apply: Callable[[str, Scaled], str],
        bias: Scaled | None,
        bias_shape: tuple[int, ...] | None = None,
    ) -> Scaled:
        """Sum over (input, weight) pairs of L_weight(input), plus a bias, renormalised.
        `apply(x_m, w)` emits the positive linear op on mantissas; `bias_shape` reshapes the bias for
        broadcasting (e.g. (C, 1, 1) for a Conv bias)."""
        exps = [self.add_exp(x.e, w.e) for x, w in terms]
        if bias is not None:
            exps.append(bias.e)
        top, mults = self.align(exps)
        acc = None
        for (x, w), c in zip(terms, mults):
            out = apply(self.mul(x.m, c), w)
            acc = out if acc is None else self.op("Add", [acc, out], "sum")
        if bias is not None:
            b = self.mul(bias.m, mults[-1])
            if bias_shape is not None:
                b = self.op("Reshape", [b, self.i64(bias_shape)], "bshape")
            acc = self.op("Add", [acc, b], "bias")
        return self.renorm(acc, top)


def is_zero(m: np.ndarray) -> bool:
    """True when the (non-negative) mantissa array is all zeros; the first entry usually settles it."""
    return m.size == 0 or (not m.flat[0] and not m.max() > 0)


def zero_scaled(em: CompanionEmitter, shape: tuple[int, ...], hint: str = "zero") -> Scaled:
    """An all-zero Scaled constant (with ZERO_EXPONENT)."""
    return Scaled(em.const(np.zeros(shape, np.float32), hint), em.exponent(ZERO_EXPONENT))


def ones_inputs(graph: Graph, em: CompanionEmitter) -> dict[str, Scaled]:
    """The all-ones companion input: fed at run time by default (a constant makes onnxruntime fold the whole
    graph while building the session, without its run-time optimisations)."""
    if not em.ones_fed:
        return {
            name: Scaled(em.const(np.ones(shape, np.float32), "ones"), em.exponent(0))
            for name, shape in graph.inputs.items()
        }
    return {name: Scaled(em.add_input(f"ones::{name}", shape), em.exponent(0)) for name, shape in graph.inputs.items()}


def ones_feeds(graph: Graph) -> dict[str, np.ndarray]:
    return {f"ones::{name}": np.ones(shape, np.float32) for name, shape in graph.inputs.items()}


def emit_pathnorm(graph: Graph, em: CompanionEmitter) -> list[Scaled]:
    """Emit the companion of `graph` on the all-ones input; returns the Scaled graph outputs."""
    env = emit_companion(graph, em)
    return [env[t] for t in graph.outputs]


def emit_companion(graph: Graph, em: CompanionEmitter) -> dict[str, Scaled]:
    """Emit the companion of `graph` on the all-ones input; returns every tensor's Scaled value."""
    from .ops import OPS

    env: dict[str, Scaled] = ones_inputs(graph, em)
    for node in graph.nodes:
        outs = OPS[node.op].companion(node, em, [env[t] for t in node.inputs], True)
        env.update(zip(node.outputs, outs))
    return env


def metric_inputs(graph: Graph) -> list[str]:
    """The tensors whose hi-stream values the difference stream reads (inputs of ops with a metric rule)."""
    from .ops import OPS

    seen: dict[str, None] = {}
    for node in graph.nodes:
        if OPS[node.op].metric is not None:
            seen.update(dict.fromkeys(node.inputs))
    return list(seen)


def emit_metric(graph: Graph, em: CompanionEmitter, hi_fed: bool = False) -> list[Scaled | None]:
    """Emit the hi companion stream a and the difference stream d (theory.md section 3):
    d_out = L_{hi-lo}(a_in) + L_lo(d_in) + (|b_hi| - |b_lo|); d is None where it is identically zero.
    hi_fed: the a values the d stream reads (metric_inputs) are graph inputs "hi::<tensor>" and "hi::<tensor>::e",
    computed elsewhere (the a stream is not emitted)."""
    from .ops import OPS

    if hi_fed:
        a_env = {
            t: Scaled(em.add_input(f"hi::{t}", graph.shapes[t]), em.add_input(f"hi::{t}::e", ()))
            for t in metric_inputs(graph)
        }
    else:
        a_env = ones_inputs(graph, em)
    d_env: dict[str, Scaled | None] = {name: None for name in graph.inputs}
    for node in graph.nodes:
        rules = OPS[node.op]
        a_in = [a_env.get(t) for t in node.inputs]
        d_in = [d_env[t] for t in node.inputs]
        if not hi_fed:
            a_env.update(zip(node.outputs, rules.companion(node, em, a_in, True)))
        if rules.metric is not None:
            d_out = rules.metric(node, em, a_in, d_in)
        elif all(d is None for d in d_in):
            d_out = [None] * len(node.outputs)
        else:
            d_full = [d if d is not None else zero_scaled(em, graph.shapes[t]) for d, t in zip(d_in, node.inputs)]
            d_out = rules.companion(node, em, d_full, False)
        d_env.update(zip(node.outputs, d_out))
    return [d_env[t] for t in graph.outputs]


def log10_total(parts: list[tuple[np.ndarray, float]]) -> float:
    """log10 of sum_i sum(m_i) * 2**e_i, formed in float64 without overflow (-inf for zero)."""
    terms = [(math.fsum(np.asarray(m, dtype=np.float64).ravel().tolist()), float(e)) for m, e in parts]
    terms = [(s, e) for s, e in terms if s > 0]
    if not terms:
        return -math.inf
    top = max(e for _, e in terms)
    total = math.fsum(s * 2.0 ** (e - top) for s, e in terms)
    return math.log10(total) + top * LOG10_2


def plain_value(log10: float) -> float | None:
    """10**log10 when it fits a float64, else None."""
    if log10 == -math.inf:
        return 0.0
    if log10 > 308.25:
        return None
    value = 10.0**log10
    return value if math.isfinite(value) else None


def linear_metric(
    node: Node,
    em: CompanionEmitter,
    a: Scaled,
    d: Scaled | None,
    apply,
    weight_role: str,
    bias_role: str | None,
    bias_shape: tuple[int, ...] | None = None,
) -> Scaled:
    """Metric rule shared by every parametric linear op: L_delta(a) + L_lo(d) + delta_b (theory.md section 3)."""
    w = node.params[weight_role]
    terms = [(a, em.weight(w, "delta"))]
    if d is not None:
        terms.append((d, em.weight(w, "lo")))
    bias = node.params.get(bias_role) if bias_role else None
    return em.linear(terms, apply, em.weight(bias, "delta") if bias is not None else None, bias_shape)
