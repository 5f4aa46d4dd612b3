"""Companion graphs compiled once into onnxruntime sessions and run for many parameter sets: the path-norm,
and the path-metric of one base model against many variants (theory.md section 3)."""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from .blockwise import (
    UNCHANGED,
    Comparison,
    abs_difference,
    abs_gap,
    abs_max,
    abs_max_of,
    abs_min_of,
    compare,
    exponent_of,
    formed_abs_max,
    formed_rows,
    hilo_mantissas,
    in_threads,
    mantissas,
    params_mantissas,
    same,
    split_kept,
)
from .companion import (
    ZERO_EXPONENT,
    CompanionEmitter,
    emit_companion,
    emit_metric,
    metric_inputs,
)
from .compiled import CompiledCompanion, Pairs, Raised, thorough_first
from .errors import OnnxlipError, UnderflowError
from .ir import Graph
from .range_guard import LAM_ZERO
from .rounding import relative_error_bound
from .routes import (
    MAX_CONDITION,
    ROUTE_DIFFERENCE,
    ROUTE_HILO,
    ROUTE_SUBTRACTION,
    ROUTE_UNCHANGED,
    SIGN_SPLIT,
    MetricOutcome,
    change_sizes,
    hi_inputs,
    is_tight,
    lam_of,
    log10_add,
    remembered_lam,
    route_notes,
    rows_lam,
    subtraction_metric,
    triangle_cap,
)
from .variants import Change


class MetricEngine:
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

    def general_log10(self, va: dict[str, np.ndarray], vb: dict[str, np.ndarray]) -> tuple[float, str]:
        """log10 of ||Phi(hi)||_1 - ||Phi(lo)||_1 without cancellation (an upper bound of the metric), with
        hi = max(|va|, |vb|) and lo = min(|va|, |vb|) entrywise."""
        pairs: dict[str, Pairs] = {"hi": {}, "lo": {}, "delta": {}}
        for n, b in vb.items():
            a = va[n]
            if a is b and a is self.base.get(n):  # unchanged: hi = lo = |base|, delta = 0
                pairs["hi"][n] = pairs["lo"][n] = (*self.base_pairs[n], self._lam(n))
                pairs["delta"][n] = (self._buffer("zero", n), ZERO_EXPONENT, LAM_ZERO)
                continue
            e = exponent_of(max(self._abs_max(n, a), self._abs_max(n, b)))
            outs = tuple(self._buffer(kind, n) for kind in ("hi", "lo", "delta"))
            if not hilo_mantissas(a, b, e, outs):
                for out, fn in zip(outs, (abs_max_of, abs_min_of, abs_gap)):
                    mantissas(fn, (a, b), e, out)
            for kind, out, fn in zip(("hi", "lo", "delta"), outs, (abs_max_of, abs_min_of, abs_gap)):
                pairs[kind][n] = (out, e, lam_of(fn, (a, b), e))
        return self._run_general(pairs)

    def _run_general(self, pairs: dict[str, Pairs]) -> tuple[float, str]:
        if self._general is None:
            em = CompanionEmitter(1.0, {}, "hi", fed=("hi", "lo", "delta"), guarded=True)
            self._general = CompiledCompanion(self.graph, em, emit_metric(self.graph, em), self.device, spin=False)
        return self._general.log10(pairs=pairs, raise_to="bound"), self._general.device

    def _general_changes(self, changes: dict[str, Change]) -> tuple[float, str] | None:
        """general_log10(base, variant) for a variant given by its changes, bit for bit, forming the two values
        row block by row block from the file's arrays and the factors (no float64 copy of either model: 2x the
        parameter bytes each, and half the memory traffic). None where general_log10 itself must serve: an
        exponent outside hilo_mantissas' range, or a scalar parameter. OnnxlipError, as Change.value's, for NaN
        or Inf in the variant."""
        exponents = {}
        for n, c in changes.items():
            raw = c.layout(c.new)
            if raw.ndim == 0:
                return None
            top = formed_abs_max(raw, c.factor)
            if not math.isfinite(top):
                raise OnnxlipError(f"parameter(s) {n} contain NaN or Inf values")
            # the exponent of max(|base|, |variant|): exponent_of is monotone, and an all-zero base has none
            e = exponent_of(top)
            exponents[n] = max(e, self.base_exp[n]) if self._nonzero(n) else e
            if not -100 < exponents[n] < 120:
                return None
        pairs: dict[str, Pairs] = {"hi": {}, "lo": {}, "delta": {}}
        outs = {n: tuple(self._buffer(kind, n) for kind in ("hi", "lo", "delta")) for n in changes}

        def form(n: str) -> None:  # one tensor per thread (blockwise.in_threads), into its own buffers
            c = changes[n]
            a_rows, b_rows = formed_rows(c.layout(c.base), c.factor), formed_rows(c.layout(c.new), c.factor)
            for (rows, a), (_, b) in zip(a_rows, b_rows):
                hilo_mantissas(a, b, exponents[n], tuple(o[rows] for o in outs[n]))

        in_threads(form, {n: n for n in changes}, change_sizes(changes))
        for n, (m, e) in self.base_pairs.items():
            c = changes.get(n)
            if c is None:  # unchanged: hi = lo = |base|, delta = 0
                pairs["hi"][n] = pairs["lo"][n] = (m, e, self._lam(n))
                pairs["delta"][n] = (self._buffer("zero", n), ZERO_EXPONENT, LAM_ZERO)
                continue
            for kind, out, fn in zip(("hi", "lo", "delta"), outs[n], (abs_max_of, abs_min_of, abs_gap)):
                pairs[kind][n] = (out, exponents[n], rows_lam(fn, c, exponents[n]))
        return self._run_general(pairs)

    def metric_changes(self, changes: dict[str, Change]) -> MetricOutcome:
        """metric() for a variant given by the parameters it changes (variants.VariantReader), the others being
        the base's: the same outcome, bit for bit, without forming unchanged or merely pruned parameters.
        Comparisons read the file's values: with a shared non-zero factor (variants._factor_ok) they order,
        equal and sign the same way as the formed products."""
        # pruned entries are split off in the comparing pass where the layouts agree (not transposed)
        # (the moved mantissas, m - kept, are formed only if the difference stream needs them); one tensor per
        # thread (blockwise.in_threads), each writing its own buffer, made here
        splits = {
            n: None if c.transposed else (self.base_pairs[n][0], self._buffer("lo", n), None)
            for n, c in changes.items()
        }
        compared = in_threads(
            lambda n: compare(changes[n].base, changes[n].new, splits[n]),
            {n: n for n in changes},
            change_sizes(changes),
        )
        split_done = {n for n, split in splits.items() if split is not None and compared[n].zeroed}
        if all(r.flips == 0 and r.dominated for r in compared.values()):
            lo, formed = {}, {}
            for n, (m, e) in self.base_pairs.items():
                c = changes.get(n)
                if c is None:
                    lo[n] = (m, e, self._lam(n))
                    continue
                kept = self._buffer("lo", n)
                if not compared[n].zeroed:  # changed otherwise than by zeroing: formed as metric() does
                    v = c.value(n, self._buffer("value", n, np.float64))
                    mantissas(same, (v,), e, kept)
                    delta = mantissas(abs_difference, (self.base[n], v), e, self._buffer("delta", n))[0]
                    formed[n] = (delta, e, lam_of(abs_difference, (self.base[n], v), e))
                elif n not in split_done:  # the moved mantissas are formed lazily, as for the others
                    split_kept(m, c.layout(c.base), c.layout(c.new), kept)
                lo[n] = (kept, e, self._lam(n) if compared[n].zeroed else lam_of(same, (v,), e))

            moved = lambda: self._moved(lo, changes, formed)  # noqa: E731
            return self.dominated(lo, moved, sum(r.changed for r in compared.values()))
        if all(r.flips == 0 for r in compared.values()):  # neither dominates: the hi/lo stream (metric())
            out = self._general_changes(changes)
            if out is not None:
                changed = sum(r.changed for r in compared.values())
                dominating = all(r.dominating for r in compared.values())
                notes, exact = route_notes(self._general), dominating and is_tight(self._general)
                outcome = MetricOutcome(
                    out[0], exact, 0, changed, "none needed", out[1], self.metric_margin, ROUTE_HILO, notes
                )
                return triangle_cap(self, outcome, lambda: self._changed_values(changes, only=True))
        vb = self._changed_values(changes)
        return self.metric(vb, {n: compared.get(n, UNCHANGED) for n in self.base})

    def _changed_values(self, changes: dict[str, Change], only: bool = False) -> dict[str, np.ndarray]:
        """The variant's parameters as float64 arrays (`only`: just the changed ones, the base not formed)."""
        if only:
            return {n: c.value(n, self._buffer("value", n, np.float64)) for n, c in changes.items()}
        return {
            n: changes[n].value(n, self._buffer("value", n, np.float64)) if n in changes else a
            for n, a in self.base.items()
        }

    def _below_base(self, vb: dict[str, np.ndarray], changed: int, upper=None) -> MetricOutcome:
        """The exact metric between the base and values it dominates entrywise (|vb| <= |base|, same signs)."""
        lo, delta = {}, {}
        for n, b in vb.items():
            e, a = self.base_exp[n], self.base[n]
            lo[n] = (*mantissas(same, (b,), e, self._buffer("lo", n)), lam_of(same, (b,), e))
            delta[n] = (
                *mantissas(abs_difference, (a, b), e, self._buffer("delta", n)),
                lam_of(abs_difference, (a, b), e),
            )
        return self.dominated(lo, delta, changed, upper)

    def metric(self, vb: dict[str, np.ndarray], compared: dict[str, Comparison] | None = None) -> MetricOutcome:
        """The metric between the base and vb, choosing the cheapest exact or certified route (`compared`:
        blockwise.compare of each parameter, when already known)."""
        va = self.base
        flips = changed = 0
        dominated = dominating = True
        for n, a in va.items():
            c, f, below, above, _ = compare(a, vb[n]) if compared is None else compared[n]
            changed, flips = changed + c, flips + f
            dominated, dominating = dominated and below, dominating and above
        if flips == 0:
            if dominated:
                return self._below_base(vb, changed)
            log10_m, dev = self.general_log10(va, vb)
            notes, exact = route_notes(self._general), dominating and is_tight(self._general)
            outcome = MetricOutcome(
                log10_m, exact, 0, changed, "none needed", dev, self.metric_margin, ROUTE_HILO, notes
            )
            return triangle_cap(self, outcome, lambda: {n: b for n, b in vb.items() if b is not va[n]})
        # theory.md section 3: with mid zero where the signs flip, (base, mid) and (mid, vb) are same-sign pairs.
        # mid = the entrywise smaller magnitude elsewhere, so that both models dominate it and both metrics are
        # exact: the sum is symmetric in the two models, and never above the split at the base with its flipped
        # entries zeroed (for non-negative vectors, prod(max) + prod(min) >= prod(x) + prod(y) on every path).
        # (Splitting at the base's own entries instead made the bounds of (a, b) and (b, a) differ by up to 2%.)
        mid = {
            n: np.where(
                np.sign(va[n]) * np.sign(vb[n]) > 0, np.sign(va[n]) * np.minimum(np.abs(va[n]), np.abs(vb[n])), 0.0
            )
            for n in va
        }
        first = self._below_base(mid, changed, upper=0.0)  # upper=0: the difference stream, whose margin covers both
        second, dev = self.general_log10(mid, vb)  # vb dominates mid: the hi/lo stream is exact
        total = log10_add(first.log10_metric, second)
        notes = list(dict.fromkeys(first.notes + route_notes(self._general, total)))
        outcome = MetricOutcome(
            total,
            False,
            flips,
            changed,
            SIGN_SPLIT,
            dev,
            self.metric_margin,
            ROUTE_HILO,
            notes,
        )
        return triangle_cap(self, outcome, lambda: {n: b for n, b in vb.items() if b is not va[n]})
