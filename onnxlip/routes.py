"""The metric engine's routes and outcome (onnxlip/engine.py): route names, the well-conditioned subtraction,
MetricOutcome, and the small helpers its routes share (lazy lower bounds of mantissas for range_guard, the notes
of runs with raised entries)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .blockwise import fn_blocks, formed_rows
from .compiled import CompiledCompanion, raised_note
from .range_guard import log2_min_nonzero, true_lam
from .variants import Change

SIGN_SPLIT = (
    "split at mid (0 where the sign flips, the smaller magnitude elsewhere): M(a, mid) + M(mid, b), both exact "
    "(triangle inequality)"
)
ROUTE_DIFFERENCE = "difference stream"
ROUTE_SUBTRACTION = "subtraction"
ROUTE_HILO = "hi/lo difference stream"
ROUTE_UNCHANGED = "no parameter changed"
ROUTE_TRIANGLE = "triangle inequality"
# A dominated pair's metric d = ||Phi(a)|| - ||Phi(b)|| may be formed by subtracting two float32 companion runs
# when that is well conditioned: (||Phi(a)|| + ||Phi(b)||) / d <= 2, so the float32 errors of both runs weigh at
# most twice their own size against d. The trap of theory.md section 3 (d << ||Phi||) never takes this route,
# and the rounding margin of the result accounts for the subtraction exactly (subtraction_metric).
MAX_CONDITION = 2.0


def log10_add(x: float, y: float) -> float:
    if x == -math.inf or y == -math.inf:
        return max(x, y)
    top = max(x, y)
    return top + math.log10(10 ** (x - top) + 10 ** (y - top))


def subtraction_metric(log10_a: float, log10_b: float, margin: float) -> tuple[float, float] | None:
    """(log10 d, rounding margin of d) for d = Phi_a - Phi_b from two float32 companion sums whose relative error
    is at most `margin` each; None when the subtraction is not well conditioned (MAX_CONDITION). With the true
    values Phi_a <= sa/(1 - margin) and Phi_b >= sb/(1 + margin), d <= d_up; the margin m returned satisfies
    d_up = (sa - sb) / (1 - m), the convention of PathMetricResult.rounding_margin."""
    if not (math.isfinite(log10_a) and log10_b < log10_a):
        return None
    ratio = 10.0 ** (log10_b - log10_a) if log10_b > -math.inf else 0.0  # Phi_b / Phi_a < 1
    share = -math.expm1((log10_b - log10_a) * math.log(10.0)) if ratio > 0 else 1.0  # 1 - ratio, accurately
    if (1.0 + ratio) / share > MAX_CONDITION:
        return None
    inflation = (1.0 / (1.0 - margin) - ratio / (1.0 + margin)) / share  # d_up / (sa - sb) >= 1
    rounding = math.nextafter(1.0 - 1.0 / inflation, 1.0)
    return log10_a + math.log10(share), max(rounding, margin)


def change_sizes(changes: dict[str, Change]) -> dict[str, int]:
    return {n: c.new.size for n, c in changes.items()}


def remembered_lam(memo: dict[str, float], param, name: str, exponent: int) -> float:
    if name not in memo:
        memo[name] = param.true_lam(exponent)
    return memo[name]


def lam_of(fn: Callable[..., np.ndarray], arrays: tuple[np.ndarray, ...], exponent: int) -> Callable[[], float]:
    """A function giving range_guard.true_lam of blockwise.mantissas(fn, arrays, exponent)."""
    return lambda: true_lam(fn_blocks(fn, arrays), exponent)


def rows_lam(fn: Callable[..., np.ndarray], change: Change, exponent: int) -> Callable[[], float]:
    """lam_of for a change's base and new values formed row block by row block (pair_routes._general_changes)."""

    def lam() -> float:
        base, new = (formed_rows(change.layout(v), change.factor) for v in (change.base, change.new))
        rows = zip(base, new)
        return true_lam((fn(a, b) for (_, a), (_, b) in rows), exponent)

    return lam


@dataclass
class MetricOutcome:
    log10_metric: float
    exact: bool
    sign_flips: int
    changed: int
    sign_flip_handling: str
    device: str
    rounding_margin: float = 0.0
    route: str = ROUTE_DIFFERENCE
    notes: list[str] = field(default_factory=list)


def route_notes(compiled: CompiledCompanion | None, log10_total: float | None = None) -> list[str]:
    """The note of a route whose last run raised tiny entries (CompiledCompanion._raised_log10); `log10_total`:
    the result that run is one term of."""
    if compiled is None or compiled.raised is None:
        return []
    what = "the path-metric" if log10_total is None else "a term of the path-metric"
    return [raised_note(what, compiled.raised, log10_total)]


def hi_inputs(found: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """The base's companion values as the difference stream's "hi::" inputs, with their lams for range_guard."""
    hi = {}
    for t, (m, e) in found.items():
        hi[f"hi::{t}"], hi[f"hi::{t}::e"] = m, np.asarray(e, dtype=np.float32)
        hi[f"hi::{t}::lam"] = np.float64(log2_min_nonzero(m))
    return hi


def is_tight(compiled: CompiledCompanion | None) -> bool:
    """The route's last value is the metric it computes (to 1e-7), not a looser upper bound of it."""
    return compiled is None or compiled.raised is None or compiled.raised.tight


def triangle_cap(engine, outcome: MetricOutcome, values: Callable[[], dict[str, np.ndarray]]) -> MetricOutcome:
    """The smaller certified upper bound of `outcome` (an upper bound of the metric: not exact) and of
    ||Phi(a)||_1 + ||Phi(b)||_1 >= ||Phi(a) - Phi(b)||_1 (triangle inequality), for models far apart (another
    training run, shuffled weights), where the hi/lo bound can exceed it. Phi(a) + Phi(b) >= Phi(a), so the
    variant's path-norm (`values()`: the parameters it changes, by name; one companion run) is computed only when
    the outcome is at least Phi(a). Each sum carries the companion's rounding margin, and so does theirs."""
    from .blockwise import exponent_of, mantissas, same
    from .errors import UnderflowError

    if outcome.exact or not math.isfinite(outcome.log10_metric):
        return outcome
    try:
        log10_a = engine.log10_base()
        if outcome.log10_metric < log10_a:
            return outcome
        changed = values()
        pairs = engine.base_pairs_with_lams()  # the unchanged parameters' mantissas are the base's
        for n, b in changed.items():
            top = float(np.max(np.abs(b))) if b.size else 0.0
            e = exponent_of(top) if top > 0 else 0
            pairs[n] = (*mantissas(same, (b,), e, engine.scratch(n)), lam_of(same, (b,), e))
        log10_b, device = engine.log10_norm(pairs)
    except UnderflowError:  # range_guard cannot certify a companion sum: the outcome stands
        return outcome
    log10_sum, margin = log10_add(log10_a, log10_b), engine.norm_margin
    if log10_sum - math.log10(1 - margin) >= outcome.log10_metric - math.log10(1 - outcome.rounding_margin):
        return outcome
    note = (
        f"the models are far apart: ||Phi(a)||_1 + ||Phi(b)||_1 = 10^{log10_sum:.4f} (triangle inequality) is "
        f"smaller than the hi/lo upper bound 10^{outcome.log10_metric:.4f}, and is the metric's bound given"
    )
    notes = route_notes(engine.values_session()) + [note]
    return MetricOutcome(
        log10_sum,
        False,
        outcome.sign_flips,
        outcome.changed,
        outcome.sign_flip_handling,
        device,
        margin,
        ROUTE_TRIANGLE,
        notes,
    )
