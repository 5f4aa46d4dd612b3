"""The metric engine's routes for pairs that are not a plain pruning of the base (theory.md section 3): the
hi/lo difference stream where neither model dominates, the sign split, and variants read from files as the
parameters they change (variants.VariantReader). MetricEngine (onnxlip/engine.py) takes them in as a mixin;
they use its sessions, buffers and base mantissas."""

from __future__ import annotations

import math

import numpy as np

from .blockwise import (
    UNCHANGED,
    Comparison,
    abs_difference,
    abs_gap,
    abs_max_of,
    abs_min_of,
    compare,
    exponent_of,
    formed_abs_max,
    formed_rows,
    hilo_mantissas,
    in_threads,
    mantissas,
    same,
    split_kept,
)
from .companion import CompanionEmitter, emit_metric
from .compiled import CompiledCompanion, Pairs
from .errors import OnnxlipError
from .mantissas import ZERO_EXPONENT
from .range_guard import LAM_ZERO
from .routes import (
    ROUTE_HILO,
    SIGN_SPLIT,
    MetricOutcome,
    change_sizes,
    is_tight,
    lam_of,
    log10_add,
    route_notes,
    rows_lam,
    triangle_cap,
)
from .variants import Change


class PairRoutes:
    """general_log10 (the hi/lo stream), metric (any pair of parameter sets) and metric_changes (a variant given
    by its changes), for MetricEngine."""

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
