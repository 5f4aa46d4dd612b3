"""Companion graphs compiled once into onnxruntime sessions and run for many parameter sets: the path-norm,
and the path-metric of one base model against many variants (theory.md section 3). The routes for variants the
base dominates (pruning) are here; those for other pairs are in onnxlip/pair_routes.py."""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from .blockwise import (
    abs_max,
    in_threads,
    params_mantissas,
)
from .companion import (
    ZERO_EXPONENT,
    CompanionEmitter,
    emit_companion,
    emit_metric,
    metric_inputs,
)
from .compiled import CompiledCompanion, Pairs, Raised, thorough_first
from .errors import UnderflowError
from .ir import Graph
from .pair_routes import PairRoutes
from .range_guard import LAM_ZERO
from .rounding import relative_error_bound
from .routes import (
    MAX_CONDITION,
    ROUTE_DIFFERENCE,
    ROUTE_SUBTRACTION,
    ROUTE_UNCHANGED,
    MetricOutcome,
    hi_inputs,
    is_tight,
    remembered_lam,
    route_notes,
    subtraction_metric,
)


class MetricEngine(PairRoutes):
    """Path-metrics between one base parameter set and many others of the same architecture.

    Sessions are built on first use and reused. For variants the base dominates (|v| <= |base| entrywise, as
    pruning gives): when the variant keeps little of the base's path mass, ||Phi(base)|| - ||Phi(v)|| from one
    companion run with the variant's weights (well conditioned, see MAX_CONDITION); otherwise the
    cancellation-free difference stream, which reads the base's companion values (computed once, by the values
    session, and fed). Any other pair feeds hi, lo and delta."""

    def __init__(self, graph: Graph, device: str = "auto"):
        self.graph, self.device = graph, device
        self.params = {p.name: p for p in graph.params()}
        self._base: dict[str, np.ndarray] | None = None
        self._base_exp: dict[str, int] | None = None
        self._base_abs_max: dict[str, float] = {}
        self._base_nonzero: dict[str, int] = {}
        self._base_lam: dict[str, Callable[[], float]] = {}
        self._base_lam_value: dict[str, float] = {}
        # parameters that multiply (weights, scales): their kept l1 mass predicts how much path mass survives
        self._multiplicative = [
            p.name for node in graph.nodes for role, p in node.params.items() if role in ("weight", "scale")
        ]
        self.metric_margin = relative_error_bound(graph, metric=True)
        self.norm_margin = relative_error_bound(graph)
        self._base_pairs: Pairs | None = None
        self._base_mass: dict[str, float] = {}
        self._log10_base: float | None = None
        self._dominated: CompiledCompanion | None = None
        self._general: CompiledCompanion | None = None
        self._values: CompiledCompanion | None = None
        self._hi: dict[str, np.ndarray] | None = None
        self._hi_raised: Raised | None = None
        self._hi_unraised: dict[str, np.ndarray] | None = None
        self._buffers: dict[tuple[str, str], np.ndarray] = {}  # float32 mantissa buffers, see _buffer

    # ---- sessions ------------------------------------------------------------------------------------------

    @property
    def base(self) -> dict[str, np.ndarray]:
        """The base's parameter values, formed on first use: pruned variants never need them (memory)."""
        if self._base is None:
            self._base = {n: p.value for n, p in self.params.items()}
        return self._base

    @property
    def base_pairs(self) -> Pairs:
        """|base| as float32 mantissas and exponents (normalized_power, read from folded weights' factors)."""
        if self._base_pairs is None:
            formed = params_mantissas(self.params.values())
            self._base_pairs = {n: formed[n] for n in self.params}  # (in parameter order)
        return self._base_pairs

    @property
    def base_exp(self) -> dict[str, int]:
        """|base| <= 2**e: also a bound for every lo and delta of a variant the base dominates."""
        if self._base_exp is None:
            self._base_exp = {n: e for n, (_, e) in self.base_pairs.items()}
        return self._base_exp

    def _values_session(self, pairs: Pairs | None = None) -> CompiledCompanion:
        """The companion with fed weights; it also yields the companion values the difference stream reads.
        `pairs`: the ones its first run is for (compiled.thorough_first)."""
        if self._values is None:
            em = CompanionEmitter(1.0, {}, "value", fed=("value",), ones_fed=False, guarded=True)
            env = emit_companion(self.graph, em)
            outs = [env[t] for t in self.graph.outputs]
            extra = {t: env[t] for t in metric_inputs(self.graph)}
            thorough = pairs is not None and thorough_first(self.graph, em, (p[0] for p in pairs.values()))
            self._values = CompiledCompanion(
                self.graph, em, outs, self.device, extra=extra, spin=False, thorough=thorough
            )
        return self._values

    def values_session(self) -> CompiledCompanion:
        return self._values_session()

    def base_pairs_with_lams(self) -> Pairs:
        return self._with_lams(self.base_pairs)

    def scratch(self, name: str) -> np.ndarray:
        """A float32 buffer of the parameter's shape that no route is reading (for routes.triangle_cap)."""
        return self._buffer("lo", name)

    def log10_norm(self, pairs: Pairs) -> tuple[float, str]:
        """log10 ||Phi||_1 of the parameters given as (mantissa, exponent) pairs, one companion run."""
        values = self._values_session(pairs)
        return values.log10(pairs={"value": pairs}), values.device

    def _hi_feeds(self) -> dict[str, np.ndarray]:
        """The base's companion values that the difference stream reads, as its "hi::" inputs (one run)."""
        if self._hi is None:
            values = self._values_session(self.base_pairs)
            self._hi = hi_inputs(values.tensors({"value": self._with_lams(self.base_pairs)}, raise_to="bound"))
            if self._log10_base is None:  # the same run gave ||Phi(base)||, certified (None where it was raised)
                self._log10_base = values.last_log10
            # where range_guard refused them, they bound the true values from above (a raised run); the
            # difference stream is then an upper bound too, and its run with the unraised ones an estimate
            self._hi_raised = values.raised
            self._hi_unraised = None if values.unraised is None else hi_inputs(values.unraised)
        return self._hi

    def _lam(self, name: str) -> Callable[[], float]:
        """A function giving log2 of the least nonzero true base mantissa of a parameter (range_guard.true_lam,
        computed on first call and remembered): a lower bound for the nonzero mantissas of every variant that
        keeps some of its entries and zeroes the others."""
        if name not in self._base_lam:  # (no reference to self: a cycle would keep the engine's buffers alive)
            memo, param, e = self._base_lam_value, self.params[name], self.base_exp[name]
            self._base_lam[name] = functools.partial(remembered_lam, memo, param, name, e)
        return self._base_lam[name]

    def _with_lams(self, pairs: Pairs) -> Pairs:
        return {n: (m, e, self._lam(n)) for n, (m, e, *_) in pairs.items()}

    def _device(self) -> str:
        """The device of the engine's sessions (the requested one before any is built)."""
        for compiled in (self._values, self._dominated, self._general):
            if compiled is not None:
                return compiled.device
        return "cpu" if self.device == "auto" else self.device

    def log10_base(self) -> float:
        if self._log10_base is None:
            self._log10_base = self.log10_norm(self._with_lams(self.base_pairs))[0]
        return self._log10_base

    # ---- routes ----------------------------------------------------------------------------------------------
    def _difference(self, lo: Pairs, delta: Pairs) -> tuple[float, str]:
        """Difference stream between the base and a variant it dominates (exact, cancellation-free)."""
        if self._dominated is None:  # the base stream comes from the values session: no folding at build
            em = CompanionEmitter(1.0, {}, "hi", fed=("lo", "delta"), ones_fed=False, guarded=True)
            outs = emit_metric(self.graph, em, hi_fed=True)
            hi = self._hi_feeds().items() if any(s is not None for s in outs) else ()  # its zeros: its sums'
            thorough = thorough_first(self.graph, em, (m for _, m in hi if np.ndim(m) > 0))
            self._dominated = CompiledCompanion(self.graph, em, outs, self.device, spin=False, thorough=thorough)
        more = self._hi_feeds() if not self._dominated.empty else None
        pairs = {"lo": lo, "delta": delta}
        log10 = self._dominated.log10(pairs=pairs, more=more, raise_to="bound")
        if more is not None and self._hi_raised is not None:  # the raised hi stream: an estimate from the unraised
            floor = max(self._hi_raised.floor, self._dominated.raised.floor if self._dominated.raised else -math.inf)
            plain = self._dominated.log10(pairs=pairs, more=self._hi_unraised, check=False)
            zeros = self._hi_raised.zeros or bool(self._dominated.raised and self._dominated.raised.zeros)
            self._dominated.raised = Raised(floor, log10, plain, zeros)
        return log10, self._dominated.device

    def _subtraction(self, lo: Pairs) -> tuple[float, float, str] | None:
        try:
            log10_b, dev = self.log10_norm(lo)
            log10_a = self.log10_base()
        except UnderflowError:  # the difference stream may still hold it
            return None
        out = subtraction_metric(log10_a, log10_b, self.norm_margin)
        return None if out is None else (*out, dev)

    def _kept_mass_ratio(self, lo: Pairs) -> float:
        """prod over multiplicative parameters of (kept l1 mass / base l1 mass): a cheap guess of
        ||Phi(v)|| / ||Phi(base)|| (exact for one path; only used to pick a route)."""
        ratio = 1.0
        for n in self._multiplicative:
            if n not in self._base_mass:  # float32 (pairwise) sums: a guess needs no more precision
                self._base_mass[n] = float(self.base_pairs[n][0].sum())
            base = self._base_mass[n]
            if base > 0 and lo[n][0] is not self.base_pairs[n][0]:
                ratio *= float(lo[n][0].sum()) / base
        return ratio

    def dominated(self, lo: Pairs, delta: Pairs, changed: int, upper=None) -> MetricOutcome:
        """The exact metric between the base and a variant it dominates, given the variant's |values| (`lo`) and
        |base| - |variant| (`delta`, or a function giving them: only the difference stream reads them) as pairs
        with the base's exponents. `upper`, when known, bounds
        metric / ||Phi(base)|| from above (e.g. the pruned entries' relative scores; a float or a function giving it,
        called only when needed): it only steers the route."""
        if changed == 0:  # no entry differs: the metric is 0, no graph needs to run (nor be built)
            return MetricOutcome(-math.inf, True, 0, 0, "none needed", self._device(), 0.0, ROUTE_UNCHANGED)
        guess_share = 1.0 - self._kept_mass_ratio(lo)
        worth_trying = guess_share * MAX_CONDITION >= 2.0 - guess_share
        if worth_trying and upper is not None:
            worth_trying = (upper() if callable(upper) else upper) >= 2 / 3
        if worth_trying:
            out = self._subtraction(lo)
            if out is not None:
                log10_m, margin, dev = out
                return MetricOutcome(log10_m, True, 0, changed, "none needed", dev, margin, ROUTE_SUBTRACTION)
        log10_m, dev = self._difference(lo, delta() if callable(delta) else delta)
        notes, exact = route_notes(self._dominated), is_tight(self._dominated)
        return MetricOutcome(
            log10_m, exact, 0, changed, "none needed", dev, self.metric_margin, ROUTE_DIFFERENCE, notes
        )

    def pruned(self, keep: dict[str, np.ndarray], upper=None) -> MetricOutcome:
        """The exact metric between the base and the base with the entries where `keep` is False set to zero
        (`keep`: boolean arrays shaped like the IR parameters they name; others are kept whole)."""
        lo, changed = {}, 0
        # the buffers every dominated route uses, one call at a time; one tensor per thread (in_threads)
        kept = {n: self._buffer("lo", n) for n in keep if n in self.base_pairs}
        for n in kept:
            self._nonzero(n)  # remembered here, not in the threads

        def split(n: str) -> int:  # exact: each mantissa is either kept or (in delta) moved
            np.multiply(self.base_pairs[n][0], keep[n], out=kept[n])
            if self._nonzero(n) == kept[n].size:  # no zero mantissa: the removed entries are keep's False ones
                return kept[n].size - int(np.count_nonzero(keep[n]))  # (counting bools is ~30x faster)
            return self._nonzero(n) - int(np.count_nonzero(kept[n]))

        removed = in_threads(split, {n: n for n in kept}, {n: kept[n].size for n in kept})
        for n, (m, e) in self.base_pairs.items():
            lo[n] = (kept[n], e, self._lam(n)) if n in kept else (m, e, self._lam(n))
            changed += removed.get(n, 0)

        return self.dominated(lo, lambda: self._moved(lo, keep), changed, upper)

    def _moved(self, lo: Pairs, changed, formed: dict[str, np.ndarray] | None = None) -> Pairs:
        """The delta pairs of a pruned variant: m - kept for the `changed` parameters (exact: each entry is m or
        0) unless already `formed`, zeros for the others; formed only when the difference stream needs them."""
        out = {}
        for n, (m, e) in self.base_pairs.items():
            if formed and n in formed:
                out[n] = formed[n]
            elif n in changed:  # the moved entries are base mantissas: their least is at least the base's
                out[n] = (np.subtract(m, lo[n][0], out=self._buffer("delta", n)), e, self._lam(n))
            else:
                out[n] = (self._buffer("zero", n), ZERO_EXPONENT, LAM_ZERO)
        return out

    def _nonzero(self, name: str) -> int:
        """Non-zero entries of the base's mantissas of a parameter (remembered)."""
        if name not in self._base_nonzero:
            self._base_nonzero[name] = int(np.count_nonzero(self.base_pairs[name][0]))
        return self._base_nonzero[name]

    def _abs_max(self, name: str, v: np.ndarray) -> float:
        """abs_max, remembered for the base's own arrays (a sweep compares many variants with them)."""
        if self._base is None or v is not self._base.get(name):
            return abs_max(v)
        if name not in self._base_abs_max:
            self._base_abs_max[name] = abs_max(v)
        return self._base_abs_max[name]

    def _buffer(self, kind: str, name: str, dtype=np.float32) -> np.ndarray:
        """A buffer (float32 unless `dtype` says otherwise) shaped like parameter `name`, reused across calls: fresh
        pages are slow to fault in (benchmarks/README.md). The "zero" kind is all zeros and stays so."""
        key = (kind, name)
        if key not in self._buffers:
            self._buffers[key] = (np.zeros if kind == "zero" else np.empty)(self.params[name].shape, dtype)
        return self._buffers[key]
