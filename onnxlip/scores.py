"""Path-magnitude scores of every parameter (theory.md section 4), computed by one onnxruntime session that
runs the companion forward pass and its adjoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .adjoint import emit_scores
from .api import analyse
from .companion import LOG10_2, CompanionEmitter, Scaled, is_zero, log10_total, ones_feeds
from .errors import RuntimeFailure, ShapeError, public
from .ir import Graph
from .loading import ModelLike
from .results import jsonable
from .runtime import make_session, no_reuse_planning, run

# Session options for the one-shot scores graph. "fold" would evaluate the adjoint (which depends on the weights
# only) while the session is built; "none" without weight prepacking builds in less than half the time and the
# first run is the whole forward + adjoint + weight-gradient work: the fastest from file to scores
# (benchmarks/README.md).
LEVEL = "none"
PREPACK = False


@dataclass
class TensorScores:
    """Scores of one parameter tensor, stored as onnxruntime returned them: score / ||Phi||_1 =
    mantissa * 2**shift exactly, with `mantissa` float32 in the layout of the user's initializer. `relative`
    (always <= 1, so it fits a float64) is computed on each access: keeping float64 copies of every score
    would triple the memory of a scores call."""

    name: str
    shape: tuple[int, ...]
    log10_sum: float
    log10_max: float
    mantissa: np.ndarray
    shift: float
    sources: tuple[str, ...]

    @property
    def relative(self) -> np.ndarray:
        """score / ||Phi||_1 in float64 (a new array on each access)."""
        return _relative(self.mantissa, self.shift)

    @property
    def log10_relative(self) -> np.ndarray:
        """log10(score / ||Phi||_1) in float64, -inf for a zero score: exact in range for every score, however
        far below float64's range (deep networks' scores can be)."""
        with np.errstate(divide="ignore"):
            out = np.log10(self.mantissa.astype(np.float64))
        if not math.isfinite(self.shift):  # zero path-norm: every score is 0
            out[...] = -math.inf
            return out
        out += self.shift * LOG10_2
        return out

    def below_float64(self) -> int:
        """How many nonzero scores fall below float64's normal range relative to the path-norm (they read as 0,
        or lose precision, in `relative`)."""
        if not math.isfinite(self.shift) or self.shift - 150 > _FLOAT64_MIN_LOG2:  # float32 mantissas >= 2**-149
            return 0
        if _FLOAT64_MIN_LOG2 - self.shift > 1:  # above every mantissa (<= 1): each nonzero score is below
            return int(np.count_nonzero(self.mantissa > 0))
        threshold = np.float32(2.0 ** (_FLOAT64_MIN_LOG2 - self.shift))
        return int(np.count_nonzero((self.mantissa > 0) & (self.mantissa < threshold)))

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
    notes: list[str] = field(default_factory=list)  # the import's (reduced precision, a fixed batch above 1)

    def absolute(self, name: str) -> np.ndarray:
        """Scores in absolute units (inf where they do not fit a float64)."""
        with np.errstate(over="ignore"):
            return self.tensors[name].relative * 10.0**self.log10_path_norm

    def comparable(self, names: Sequence[str]) -> tuple[dict[str, np.ndarray], float]:
        """Arrays ordered like the relative scores of `names` across tensors, and the log2 factor back to
        relative scores (relative = array * 2**factor). Float32 when that is exact: the mantissas times
        powers of two 2**(e_i - max e) that push no score below float32's normal range (then sorting them
        sorts the scores, at half the memory of float64); otherwise the float64 relative scores."""
        tensors = [self.tensors[n] for n in names]
        if not tensors:
            return {}, 0.0
        # all-zero tensors are 0 at any scale (their exponent is mantissas.ZERO_EXPONENT): they set no shift
        live = [t.shift for t in tensors if not is_zero(t.mantissa) and math.isfinite(t.shift)]
        if not live:  # every score is 0 (e.g. a zero path-norm, where the shifts are not finite)
            return {t.name: np.zeros(t.mantissa.shape, np.float32) for t in tensors}, 0.0
        top = max(live)
        out = {}
        for t in tensors:
            drop = round(top - t.shift)  # an integer: shifts differ by onnxruntime's integer exponents
            if drop == 0 or is_zero(t.mantissa):
                out[t.name] = t.mantissa
                continue
            tiny = float(np.min(t.mantissa, initial=np.inf, where=t.mantissa > 0))
            if drop > 126 or (math.isfinite(tiny) and math.log2(tiny) - drop < -126):
                return {t.name: t.relative for t in tensors}, 0.0
            out[t.name] = t.mantissa * np.float32(2.0**-drop)
        return out, top

    def uses(self) -> dict[str, list[str]]:
        """Tensor names grouped by the initializer they score: a shared initializer's later uses ("W#1", ...:
        passes.unique_param_names; a use reads W itself, first among its sources where a scale was folded into
        it, so a file's own initializer named "W#1" stays apart)."""
        groups: dict[str, list[str]] = {}
        for n, t in self.tensors.items():
            head, sep, tail = n.rpartition("#")
            own = self.tensors.get(head)
            if sep and tail.isdigit() and own is not None and t.sources[:1] == (head,) and t.shape == own.shape:
                groups.setdefault(head, [head]).append(n)
            else:
                groups.setdefault(n, [n])
        return groups

    def initializer_scores(self, log10: bool = False) -> dict[str, np.ndarray]:
        """score / ||Phi||_1 (or its log10) per initializer in float64. A shared initializer's score is the sum
        over its uses: |w| times the derivative of ||Phi||_1 in w (theory.md section 4)."""
        out = {}
        for n, names in self.uses().items():
            total = self.tensors[names[0]].log10_relative if log10 else self.tensors[names[0]].relative
            for u in names[1:]:
                if log10:  # log10(10**a + 10**b), exact in range at any depth
                    total = np.logaddexp(total / LOG10_E, self.tensors[u].log10_relative / LOG10_E) * LOG10_E
                else:
                    total += self.tensors[u].relative
            out[n] = total
        return out

    def to_json(self) -> dict:
        # strict JSON like every result (a zero path-norm's log10 is "-inf", as the CLI prints it)
        groups = self.uses()
        return jsonable(
            {
                "log10_path_norm": self.log10_path_norm,
                "output": list(self.outputs),
                "device": self.device,
                "notes": list(self.notes),
                "tensors": {
                    n: {
                        "shape": list(t.shape),
                        "log10_sum": t.log10_sum,  # -inf (an all-zero tensor) as "-inf", as everywhere
                        "log10_max": t.log10_max,
                        "sources": list(t.sources),
                        "initializer": next(g for g, names in groups.items() if n in names),
                    }
                    for n, t in self.tensors.items()
                },
            }
        )


_FLOAT64_MIN_LOG2 = -1022  # log2 of float64's smallest normal number
LOG10_E = math.log10(math.e)


def _relative(mant: np.ndarray, shift: float) -> np.ndarray:
    """mant * 2**shift in float64; shifts beyond float64's normal exponents go through ldexp (one rounding)."""
    if not math.isfinite(shift):  # zero path-norm: every score is 0
        return np.zeros(mant.shape)
    out = mant.astype(np.float64)
    k = math.floor(shift)
    if -1000 < k < 1000:
        out *= 2.0**shift
        return out
    out *= 2.0 ** (shift - k)
    return np.ldexp(out, k, out=out)


def scores_graph(graph: Graph) -> tuple[CompanionEmitter, int, dict[str, Scaled]]:
    """The scores model: outputs are the (m, e) pairs of the companion outputs, then of every score."""
    params = {p.name: p for p in graph.params()}
    em = CompanionEmitter(1.0, {"value": params}, "value")
    outs, score_map, _ = emit_scores(graph, em)
    em.add_outputs(t for s in outs + list(score_map.values()) for t in (s.m, s.e))
    em.drop_dead_nodes()
    em.kinds = {}  # emitted: the parameter values live on as the constants' mantissas only
    return em, len(outs), score_map


@public
def scores(
    model: ModelLike,
    *,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
) -> ScoresResult:
    """score_i = |theta_i| d||Phi||_1/d|theta_i| = the l1 path mass through parameter entry i, for every
    parameter tensor (keys: the user's initializer names; folded tensors list their sources)."""
    graph = analyse(model, output, input_shapes, keep_proto=False).graph
    em, n_outs, score_map = scores_graph(graph)
    layouts = {p.name: (p.shape, p.transposed, tuple(p.sources), p.file_shape) for p in graph.params()}
    model = em.model()
    reuse = not no_reuse_planning(graph, len(model.graph.node))
    feeds, outputs, notes = ones_feeds(graph), list(graph.outputs), list(graph.warnings)
    feeds_shapes, fixed_sources = dict(graph.inputs), set(graph.fixed_sources)
    # from here on only the session's copies of the constants are needed: without the float64 IR parameters
    # (2x the model's parameter bytes) and our mantissas (1x) the peak memory stays within 3x params + activations
    del graph
    # not certified: the scores rank entries and steer metric routes, never bound anything (onnxlip/engine.py)
    session, dev = make_session(
        model, device, em.external, level=LEVEL, prepack=PREPACK, certified=False, mem_reuse=reuse
    )
    try:
        values = run(session, None, feeds)
    except RuntimeFailure:
        batched = {n: s for n, s in feeds_shapes.items() if len(s) > 1 and s[0] > 1}
        if not batched:
            raise
        name, shape = next(iter(batched.items()))
        one = "x".join(["1"] + [str(d) for d in shape[1:]])
        raise ShapeError(
            f"path-magnitude scores cannot be computed at a batch of {shape[0]} (input {name!r}) for this model: "
            f"analyse one sample with input_shapes {{{name!r}: [{', '.join(['1'] + [str(d) for d in shape[1:]])}]}} "
            f"(--input-shape {name}={one}); scores relative to the path-norm do not depend on the batch"
        ) from None
    del session
    pairs = [(values[i], float(values[i + 1])) for i in range(0, len(values), 2)]
    del values
    log10_norm = log10_total(pairs[:n_outs])
    result = ScoresResult(log10_norm, outputs, dev, notes=notes)
    log2_norm = log10_norm / LOG10_2
    for name, (mant, exp) in zip(score_map, pairs[n_outs:]):
        total, top = float(mant.sum(dtype=np.float64)), float(mant.max()) if mant.size else 0.0
        shape, transposed, sources, file_shape = layouts[name]
        mant = mant.reshape(shape)
        if transposed:  # back to the layout of the user's initializer
            mant = mant.T
        if file_shape is not None:  # a C-order reshape of the initializer (ir.Param.file_shape)
            mant = mant.reshape(file_shape)
        result.tensors[name] = TensorScores(
            name,
            tuple(mant.shape),
            math.log10(total) + exp * LOG10_2 if total > 0 else -math.inf,
            math.log10(top) + exp * LOG10_2 if top > 0 else -math.inf,
            mant,
            exp - log2_norm,  # <= 1 in all: a score never exceeds the path-norm
            sources,
        )
    fixed = sorted({src for t in result.tensors.values() for src in t.sources if src in fixed_sources})
    if fixed:
        result.notes.append(
            f"initializer(s) {', '.join(map(repr, fixed[:6]))} are also read as fixed constants of the network (e.g. a "
            "PRelu slope): their scores count their uses as parameters only, and zeroing them changes the network "
            "itself (prune leaves them)"
        )
    for n, names in result.uses().items():
        if len(names) > 1:
            result.notes.append(
                f"initializer {n!r} is read by {len(names)} ops (tensors {', '.join(names)}): its score in a file "
                "written with -o is the sum over its uses, |w| times the derivative of the path-norm in w"
            )
    return result
