"""Companion-type graphs compiled once into onnxruntime sessions and run for many parameter sets."""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .blockwise import params_mantissas
from .companion import CompanionEmitter, Scaled, emit_pathnorm, log10_total, ones_feeds
from .errors import OnnxlipError, UnderflowError
from .ir import Graph
from .range_guard import UNDERFLOW_SLACK, GuardProgram, guard_program, log2_min_nonzero
from .runtime import PRIORITY_ORDER_ABOVE, cuda_possible, make_session, no_reuse_planning, run

GUARD_LOG2 = math.log2(UNDERFLOW_SLACK)  # range_guard's output must not exceed it

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
        thorough: bool = False,
    ):
        """`extra`: further tensors to declare as outputs, read by `tensors()` (log10 does not fetch them);
        `spin`: see runtime.session_options (False for sessions run in turn with others); `thorough`: build straight
        away the session _thorough_session would switch to, where it would (see thorough_first)."""
        self.graph, self.em = graph, em
        self.raised: Raised | None = None  # the last call's raised run, if any (see _raised_run)
        self.last_log10: float | None = None  # the last tensors() run's certified total (see tensors)
        self.unraised: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self.empty = all(s is None for s in outs)
        self.device = "cpu" if device == "auto" else device
        if self.empty:  # no output depends on anything that differs: identically zero
            return
        self.extra = list(extra or {})
        self.guard: GuardProgram | None = None
        self._level, self._spin, self._thorough = level, spin, None
        self._results = [t for s in outs if s is not None for t in (s.m, s.e)]
        self._extra_results = [t for name in self.extra for t in (extra[name].m, extra[name].e)]
        if em.guarded:
            # outs follow graph.outputs (emit_pathnorm, emit_metric): the entries each output sums
            sizes = [int(np.prod(graph.shapes[t])) for t in graph.outputs] if len(outs) == len(graph.outputs) else []
            self._summed = {s.m: (sizes[i] if sizes else 2**30) for i, s in enumerate(outs) if s is not None}
            self._read = [extra[name].m for name in self.extra]
            small = sum(a.nbytes for a in em.external.values()) <= _SNAPSHOT_BYTES  # fed weights: small constants
            if small and not thorough:
                self._thorough = _snapshot(em)  # for _thorough_session, if ever needed
            self.guard = guard_program(em, self._summed, self._read, thorough=small and thorough)
        self._fetch(em, cuda_possible(device))
        self.session, self.device = self._session(em, device)

    def _fetch(self, em: CompanionEmitter, gather: bool) -> None:
        """Declare the results, the extra tensors and the guard's scalars as outputs (one pass over the graph)."""
        fetch = self.guard.emit_fetch(em, gather) if self.guard is not None else []
        names = em.add_fetches(self._results + self._extra_results + fetch)
        n, k = len(self._results), len(self._results) + len(self._extra_results)
        self.names, self.extra_names, self.guard_names = names[:n], names[n:k], names[k:]

    def _thorough_session(self) -> bool:
        """Switch to a session whose guard measures every sum's least nonzero entry (range_guard, thorough):
        for models whose sums hold exact zeros layer after layer. False where no snapshot was kept."""
        em, self._thorough = self._thorough, None
        if em is None:
            return False
        self.guard = guard_program(em, self._summed, self._read, thorough=True)
        self._fetch(em, self.device == "cuda")
        self.session, _ = self._session(em, self.device)
        return True

    def _session(self, em: CompanionEmitter, device: str):
        model = em.model()
        priority = em.guarded and len(model.graph.node) > PRIORITY_ORDER_ABOVE  # (runtime.PRIORITY_ORDER_ABOVE)
        reuse = not no_reuse_planning(self.graph, len(model.graph.node))
        return make_session(
            model, device, em.external, self._level, spin=self._spin, priority=priority, mem_reuse=reuse
        )

    def _feeds(self, kinds, exponents, pairs, more) -> dict[str, np.ndarray]:
        feeds = {}
        if self.em.feed_specs:
            feeds = self.em.feed_pairs(pairs) if pairs is not None else self.em.feed_values(kinds or {}, exponents)
        if self.em.ones_fed:
            feeds.update(ones_feeds(self.graph))
        feeds.update(more or {})
        return feeds

    def _fetched(self, extra: bool | str) -> list[str]:
        """The outputs a run fetches: the results (False), the extra tensors (True) or both ("both")."""
        return self.names + self.extra_names if extra == "both" else self.extra_names if extra else self.names

    def _run(self, extra: bool | str, feeds: dict[str, np.ndarray], lams: dict, check: bool = True):
        """Run; for guarded sessions, certify the run with range_guard (`lams`: see certify).
        UnderflowError when float32 underflow may have cost more than range_guard.UNDERFLOW_SLACK."""
        names = self._fetched(extra)
        if self.guard is None or not check:
            return run(self.session, names, feeds)
        values = run(self.session, names + self.guard_names, feeds)
        try:
            certify(self.guard, values[len(names) :], feeds, lams)
        except UnderflowError:
            if not self._thorough_session():
                raise
            names = self._fetched(extra)
            values = run(self.session, names + self.guard_names, feeds)
            certify(self.guard, values[len(names) :], feeds, lams)
        return values[: len(names)]

    def _lams(self, pairs: dict[str, Pairs] | None, more: dict | None) -> dict:
        """Known lam bounds of fed mantissas: a third entry of a (mantissa, exponent, lam) pair, or a
        "<input>::lam" entry of `more`; a lam may be a function computing it (called only if needed)."""
        out = {}
        for name, (kind, pname, part) in self.em.feed_specs.items():
            if part == "m" and pairs is not None and len(pairs[kind][pname]) > 2:
                lam = pairs[kind][pname][2]
                out[name] = lam if callable(lam) else float(lam)
        for name, value in (more or {}).items():
            if name.endswith("::lam"):
                out[name[: -len("::lam")]] = float(value)
        return out

    def log10(
        self,
        kinds: dict[str, dict[str, np.ndarray]] | None = None,
        exponents=None,
        pairs: dict[str, Pairs] | None = None,
        more: dict[str, np.ndarray] | None = None,
        check: bool = True,
        raise_to: str | None = None,
    ) -> float:
        """log10 of the sum of all outputs (-inf for zero). The fed kinds come as values (`kinds`, `exponents`:
        see CompanionEmitter.feed_values) or as ready float32 (mantissa, exponent) `pairs`; `more`: other inputs.
        `check=False` skips range_guard's verdict: the value may then undercount (for lower bounds only).
        `raise_to`: where range_guard refuses the run, tiny fed entries may be raised (_raised_run; `raised`
        then tells how): "value" where the result must agree with the unraised run's to 1e-7, "bound" where any
        certified upper bound serves."""
        self.raised = None
        if self.empty:
            return -math.inf
        feeds = self._feeds(kinds, exponents, pairs, {k: v for k, v in (more or {}).items() if "::lam" not in k})
        lams = self._lams(pairs, more)
        try:
            return _total(self._run(False, feeds, lams, check))
        except UnderflowError as refused:
            if raise_to is None:
                raise
            values, floor, zeros = self._raised_run(False, feeds, lams, refused)
            self.raised = Raised(floor, _total(values), _total(self._run(False, feeds, lams, check=False)), zeros)
            if raise_to == "value" and not self.raised.tight:  # a larger floor only raises more
                up, plain = self.raised.log10, self.raised.log10_unraised
                raise UnderflowError(
                    f"{refused}. With every entry below 2**{floor} of its tensor's largest raised to it, the result "
                    f"is certified but 10**{up - plain:.3g} times the unraised run's (10**{up:.6g} against "
                    f"10**{plain:.6g}, not certified): the tiny entries carry real path mass"
                ) from None
            return self.raised.log10

    def _raised_run(self, extra: bool, feeds: dict[str, np.ndarray], lams: dict, refused: UnderflowError):
        """The run's values, and the floor used, with every fed mantissa's nonzero entries raised to at least
        2**floor (RAISE_FLOORS in turn, until range_guard certifies the run). The outputs are positive polynomials
        of the fed entries, so each raised value bounds the true one from above. A mantissa that may have lost
        entries to 0 when it was formed (true lam at or below 2**-150) has its zeros raised too: the lost entries
        are among them, and raising the others only raises the bound (scikit-learn's subnormal weights against a
        rescaled copy of them were refused). Returns the values, the floor and whether zeros were raised; `refused`
        is raised where no floor is certified."""
        mantissas = [n for n in self.guard.fed if feeds[n].ndim > 0]
        flushed = set()
        for n in mantissas:
            lam = lams.get(n, -math.inf)
            if (float(lam()) if callable(lam) else float(lam)) <= _FLUSHED:
                flushed.add(n)
        for floor in RAISE_FLOORS:
            up_feeds, up_lams = dict(feeds), dict(lams)
            for n in mantissas:
                m, low = feeds[n], np.float32(2.0**floor)
                up_feeds[n] = np.maximum(m, low) if n in flushed else np.where(m > 0, np.maximum(m, low), 0)
                up_feeds[n] = up_feeds[n].astype(np.float32, copy=False)
                up_lams[n] = log2_min_nonzero(up_feeds[n])
            try:
                return self._run(extra, up_feeds, up_lams), floor, bool(flushed)
            except UnderflowError:
                continue
        raise refused

    def tensors(self, pairs: dict[str, Pairs], raise_to: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The `extra` tensors' (mantissa, exponent) for the fed parameter pairs. `raise_to="bound"`: where
        range_guard refuses the run, certified upper bounds of them from a raised run (_raised_run); `raised`
        then gives its floor and `unraised` the run's own values, which underflow may have lowered.
        The same run's certified log10 total (what `log10` would give) is kept in `last_log10`, or None
        where the run was raised."""
        self.raised, self.unraised, self.last_log10 = None, None, None
        feeds, lams = self._feeds(None, None, pairs, None), self._lams(pairs, None)
        try:
            values = self._run("both", feeds, lams)
            self.last_log10 = _total(values[: len(self.names)])
            values = values[len(self.names) :]
        except UnderflowError as refused:
            if raise_to is None:
                raise
            values, floor, zeros = self._raised_run(True, feeds, lams, refused)
            self.raised = Raised(floor, math.nan, math.nan, zeros)
            self.unraised = self._named(self._run(True, feeds, lams, check=False))
        return self._named(values)

    def _named(self, values: list) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(self.extra)}


def _total(values: list) -> float:
    return log10_total([(values[i], float(values[i + 1])) for i in range(0, len(values), 2)])


# log2 floors, relative to a tensor's scale, to which tiny entries are raised when range_guard refuses a run whose
# value may be an upper bound (CompiledCompanion._raised_run, lipschitz.pathnorm_bounds), tried in turn
RAISE_FLOORS = (-100, -60, -30)
RAISE_TOLERANCE_LOG10 = math.log10(1 + 1e-7)


@dataclass
class Raised:
    """A run with tiny entries raised to 2**floor (CompiledCompanion._raised_run): its log10 value, a certified
    upper bound, and the unraised run's, which float32 underflow may have lowered."""

    floor: int
    log10: float
    log10_unraised: float
    zeros: bool = False  # a tensor's zeros were raised too (its float32 values may have lost entries to 0)

    @property
    def tight(self) -> bool:
        """The raised value exceeds the unraised one by less than 1e-7 relative."""
        return self.log10 - self.log10_unraised <= RAISE_TOLERANCE_LOG10


def raised_note(what: str, raised: Raised, log10_total: float | None = None) -> str:
    """The note for a result computed with tiny entries raised (`log10_total`: the result the raised run is one
    term of, e.g. the second metric of a sign-flip split)."""
    text = (
        f"{what} was computed with every nonzero entry below 2**{raised.floor} of its tensor's largest raised to "
        "that value"
        + (
            " (every entry, zeros too, where forming a tensor's float32 values may have lost some)"
            if raised.zeros
            else ""
        )
        + ": float32 cannot hold the paths through such entries closely enough to certify them (sklearn's MLPs keep "
        "weights of 1e-40 on dead neurons). Raising entries only raises path masses, so the value is a certified "
        "upper bound"
    )
    if raised.tight:
        return text + ", and it agrees with the unraised run's to 1e-7 relative"
    if log10_total is not None and raised.log10 - log10_total < -7:
        return (
            text + f"; the raised run is a term of 10**{raised.log10:.6g} in a result of 10**{log10_total:.6g}, so "
            "the raising changes the result by less than 1e-7 relative"
        )
    unraised = (
        f"gives 10**{raised.log10_unraised:.6g} against 10**{raised.log10:.6g}"
        if math.isfinite(raised.log10_unraised)
        else "finds no path mass at all"
    )
    return (
        text + ", but a loose one: the unraised run, which float32 underflow may have lowered (not certified), "
        f"{unraised}: the raising adds most of this value"
    )


_SNAPSHOT_BYTES = 64 << 20  # constants a guarded session keeps for a thorough rebuild


def thorough_first(graph: Graph, em: CompanionEmitter, mantissas: Iterable[np.ndarray]) -> bool:
    """Whether a session is better built thorough straight away (CompiledCompanion's `thorough`; its runs are
    certified whenever the other's are, with the same values): a deep graph of small tensors
    (runtime.no_reuse_planning) whose first run feeds exact zeros (pruned weights). Its sums then often hold zeros
    for hundreds of layers, which only the thorough guard certifies, and a rebuild costs a build, a guard walk and
    a run more than the thorough session's ~20% (bound mlp_1000 against a half-pruned copy: 7 s instead of 9.4)."""
    return no_reuse_planning(graph, len(em.nodes)) and any(not np.all(m) for m in mantissas)


def _snapshot(em: CompanionEmitter) -> CompanionEmitter:
    """A copy of an emitter's graph so far that later additions to `em` do not touch (the arrays are shared)."""
    twin = copy.copy(em)
    twin.nodes, twin.initializers = list(em.nodes), list(em.initializers)
    twin.inputs, twin.outputs = list(em.inputs), list(em.outputs)
    twin.external, twin._scalar_cache = dict(em.external), dict(em._scalar_cache)
    return twin


_FLUSHED = -150.0  # a true mantissa at or below 2**-150 may round to 0 in float32; any above stays nonzero


def certify(guard: GuardProgram, fetched: list, feeds: dict[str, np.ndarray], lams: dict) -> None:
    """Raise UnderflowError unless range_guard bounds the underflow error of a run by UNDERFLOW_SLACK. `fetched`:
    the run's values of the outputs of guard.emit_fetch; `lams`: lower bounds of log2 of the nonzero entries of
    the fed mantissas' true values (range_guard.true_lam), or functions computing them, called only when the bound
    fails without them (their results are stored back into `lams`); a fed mantissa without one gets -inf. Its own
    least entry is tried last, and only where its lam shows that forming it flushed no entry to 0."""
    fed = {n: float(feeds[n]) for n in guard.fed if feeds[n].ndim == 0}
    mantissas = [n for n in guard.fed if n not in fed]
    known = {n: -math.inf if callable(lams.get(n)) else lams.get(n, -math.inf) for n in mantissas}
    bound = guard.log2_bound(fetched, {**fed, **known})
    if bound > GUARD_LOG2 and any(callable(lams.get(n)) for n in mantissas):
        for n in mantissas:
            if callable(lams.get(n)):
                lams[n] = known[n] = float(lams[n]())
        bound = guard.log2_bound(fetched, {**fed, **known})
    if bound > GUARD_LOG2:  # tighter: a mantissa's own least entry, where forming it flushed nothing
        for n in mantissas:
            if known[n] > _FLUSHED:
                own = log2_min_nonzero(feeds[n])  # a subnormal one may have been rounded up, to at most twice
                known[n] = max(known[n], own if own >= -126 else own - 1)
        bound = guard.log2_bound(fetched, {**fed, **known})
    if bound > GUARD_LOG2:
        share = f"up to 2**{bound:.0f} of the result" if math.isfinite(bound) else "any amount"
        raise UnderflowError(
            "float32 cannot hold this model's companion values: some weights, or products of weights and path "
            "masses, fall below float32's range (2**-126 of the largest entry of their tensor; a weight 1e-38 of "
            "its tensor's largest, or two entries 1e-20 of theirs that meet, get there), and the paths through "
            f"them could be undercounted by {share}, so no certified result is given"
        )


SMALLEST_NORMAL = np.float32(2.0**-126)


def pathnorm_log10_power(graph: Graph, q: float, device: str = "auto") -> tuple[float, str, list[str]]:
    """log10 of sum_p |Phi_p|^q, by one run of the companion graph.

    A tensor's |w|^q share one float32 scale (theory.md section 2), so for q > 1 entries below 2**-126 of their
    tensor's largest |w|^q lose precision or become 0: paths through them are undercounted. When that happens a
    second run with those entries raised to 2**-126 of the scale bounds the sum from above; the result stands
    when the two agree to 1e-7 of the norm, else q is too large for this model and the error gives both. For q = 1
    the same holds for tiny entries that range_guard refuses (CompiledCompanion._raised_run). Returns log10, the
    device and notes."""
    # the weights are fed: onnxruntime reads our mantissas in place instead of copying them into the session
    em = CompanionEmitter(q, {}, "value", fed=("value",), guarded=True)
    outs = emit_pathnorm(graph, em)
    params = graph.params()
    # formed before the session only where they may choose its guard (thorough_first): a deep graph's are small
    pairs = params_mantissas(params, q) if no_reuse_planning(graph, len(em.nodes)) else {}
    thorough = thorough_first(graph, em, (m for m, _ in pairs.values()))
    compiled = CompiledCompanion(graph, em, outs, device, thorough=thorough)
    pairs = pairs or params_mantissas(params, q)
    if q == 1:  # range_guard checks what float32 underflow may have cost
        with_lams = {p.name: (*pairs[p.name], functools.partial(p.true_lam, pairs[p.name][1])) for p in params}
        log10 = compiled.log10(pairs={"value": with_lams}, raise_to="value")
        notes = [] if compiled.raised is None else [raised_note("the path-norm", compiled.raised)]
        return log10, compiled.device, notes
    raised, lost = {}, 0
    for p in params:
        m, e = pairs[p.name]
        weak = (m < SMALLEST_NORMAL) & (p.value != 0)
        lost += int(np.count_nonzero(weak))
        up = np.where(weak, SMALLEST_NORMAL, m)  # no nonzero entry is lost: its own least entry bounds it
        raised[p.name] = (up, e, functools.partial(log2_min_nonzero, up))
    try:  # an upper bound only if range_guard certifies it
        upper = compiled.log10(pairs={"value": raised})
    except UnderflowError:
        raise OnnxlipError(
            f"q={q:g} is too large for this model: its path masses raised to the q-th power span more than "
            "float32's range, and paths through the smallest could be undercounted; use a smaller q"
        ) from None
    if lost == 0:
        return upper, compiled.device, []
    lower = compiled.log10(pairs={"value": pairs}, check=False)  # weak entries flushed: a lower bound
    if (upper - lower) / q > math.log10(1 + 1e-7):
        raise OnnxlipError(
            f"q={q:g} is too large for this model: {lost} weight(s) fall below float32's range once raised to the "
            f"q-th power next to the largest of their tensor, and the L^{q:g} path-norm is only known to lie "
            f"between 10^{lower / q:.6f} and 10^{upper / q:.6f}; use a smaller q"
        )
    return lower, compiled.device, []
