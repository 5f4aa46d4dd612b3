"""The Python API behind every CLI command: each function takes paths or onnx.ModelProtos and returns a
typed result whose `to_json()` is the CLI's --json contract."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from .args import check_seed, int_arg, models_arg, output_arg, real_arg, seconds_arg
from .canonical import in_canonical_scaling, rescaled_pairs
from .companion import plain_value
from .compiled import pathnorm_log10_power
from .engine import MetricEngine
from .errors import OnnxlipError, public
from .importer import ImportOptions, import_model
from .ir import Graph
from .loading import ModelLike, check_model_arg, load_model, load_with_arrays, model_label
from .results import BoundResult, PathMetricResult, PathNormResult, VariantError
from .routes import MetricOutcome
from .sampling import BoundSamplers, rounding_note
from .structure import align_params
from .variants import VariantReader


@dataclass
class Analysed:
    """A model imported once: its proto (for sampling) and IR."""

    proto: onnx.ModelProto | None  # None when imported with keep_proto=False
    graph: Graph
    label: str = ""
    extra: dict = field(default_factory=dict)
    file: np.ndarray | None = None  # the file's bytes, when the IR's weights view them (analyse keep_proto=False)
    source: ModelLike | None = None  # what was loaded, for full_proto
    skeleton: onnx.ModelProto | None = None  # with `file`: the file's protobuf without the weights' data

    def full_proto(self) -> onnx.ModelProto:
        """The model's protobuf with its weights (loaded again when the import did without it)."""
        if self.proto is None:
            self.proto = load_model(self.source)
        return self.proto


# q outside this range reports nothing useful: for a tiny q the q-th root overflows even log10 (q = 1e-308 gave
# log10 = inf), and a huge one overflowed the exponent arithmetic (1e308: an internal error); a large q inside
# the range is refused by range_guard where the model's |w|**q spans more than float32's range
Q_RANGE = (1e-3, 1e6)


def user_batch_notes(graph: Graph, input_shapes) -> list[str]:
    """A note for each input that input_shapes gives a batch above 1: the analysis is then that of the network on
    that many samples at once (every path counted once per sample), as for a model exported with a fixed batch."""
    notes = []
    for name in input_shapes or {}:
        dims = graph.inputs.get(name)
        if dims and len(dims) > 1 and dims[0] > 1:
            one = "x".join(["1"] + [str(d) for d in dims[1:]])
            notes.append(
                f"--input-shape (input_shapes) gives input {name!r} a batch of {dims[0]}: path-norms and bounds are "
                f"those of the network on {dims[0]} samples at once (each path counted {dims[0]} times); {name}={one} "
                "analyses one sample"
            )
    return notes


def analyse(
    model: ModelLike,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    lipschitz: bool = False,
    keep_proto: bool = True,
) -> Analysed:
    """Load and import a model once, for several computations (`lipschitz`: the lipschitz-only import mode).
    keep_proto=False: only the IR is wanted; the file's weights are then read in place, not parsed and copied
    (Analysed.proto is None)."""
    if isinstance(model, Analysed):
        return model
    check_model_arg(model)
    options = ImportOptions(outputs=output_arg(output), input_shapes=input_shapes, lipschitz=lipschitz)
    if not keep_proto:
        proto, arrays, data = load_with_arrays(model)
        graph = import_model(proto, options, arrays)
        graph.warnings.extend(user_batch_notes(graph, input_shapes))
        return Analysed(
            None, graph, model_label(model), file=data, source=model, skeleton=proto if data is not None else None
        )
    proto = load_model(model)
    graph = import_model(proto, options)
    graph.warnings.extend(user_batch_notes(graph, input_shapes))
    return Analysed(proto, graph, model_label(model))


def _analysed(model, output, input_shapes) -> Analysed:
    with naming(model):
        return analyse(model, output, input_shapes, keep_proto=False)


@contextlib.contextmanager
def naming(model) -> Iterator[None]:
    """Errors about one of several models name its file (`bound base v1 v2`: which one has the Sigmoid?)."""
    try:
        yield
    except OnnxlipError as exc:
        label = model_label(model) if isinstance(model, (str, os.PathLike)) else None
        if label and exc.args and isinstance(exc.args[0], str) and label not in exc.args[0]:
            exc.args = (f"{label}: {exc.args[0]}", *exc.args[1:])
        raise


# ---- path-norm -----------------------------------------------------------------------------------------
@public
def path_norm(
    model: ModelLike,
    q: float = 1.0,
    *,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
) -> PathNormResult:
    """L^q path-norm ||Phi(theta)||_q^q... reported as ||Phi||_q (the q-th root), value and log10."""
    if not (
        isinstance(q, numbers.Real) and not isinstance(q, bool) and math.isfinite(q) and Q_RANGE[0] <= q <= Q_RANGE[1]
    ):
        raise OnnxlipError(f"q must be a number from {Q_RANGE[0]:g} to {Q_RANGE[1]:g}, got {q!r}")
    graph = analyse(model, output, input_shapes, keep_proto=False).graph
    q = float(q)
    log10_sum, dev, notes = pathnorm_log10_power(graph, q, device)
    log10_norm = log10_sum / q
    return PathNormResult(
        float(q),
        plain_value(log10_norm),
        log10_norm,
        dev,
        graph.num_parameters,
        list(graph.outputs),
        list(graph.warnings) + notes,
    )


def metric_between(base: Analysed, other: Analysed, device: str = "auto", engine: MetricEngine | None = None):
    """The l1 path-metric (or its certified upper bound) between two imported models of one architecture."""
    vb = align_params(base.graph, other.graph, (base.label or "a", other.label or "b"))
    engine = engine or MetricEngine(base.graph, device)
    return metric_result(engine.metric(vb))


def metric_result(r: MetricOutcome) -> PathMetricResult:
    """The user-facing result of one engine computation."""
    return PathMetricResult(
        plain_value(r.log10_metric),
        r.log10_metric,
        r.exact,
        r.sign_flips,
        r.sign_flip_handling,
        r.changed,
        r.device,
        r.rounding_margin,
        r.route,
        list(r.notes),
    )


def certified_log10_bound(metric: PathMetricResult, input_bound: float) -> float:
    """log10 of max(R, 1) * metric / (1 - rounding margin), rounded up: the certified bound (theory.md section 3;
    the float32 rounding margin of onnxlip/rounding.py keeps it valid). The float64 host work after the runs (the
    sums of the outputs, log10, the exponents times log10(2), and 10**x for the reported value) rounds a few
    times, each by at most a few ulps of |log10| (~1e-15 relative of it): HOST_LOG10_ALLOWANCE covers them."""
    value = (
        metric.log10_path_metric
        + math.log10(max(input_bound, 1.0))
        - math.log1p(-metric.rounding_margin) / math.log(10)
    )
    return log10_rounded_up(value)


def log10_rounded_up(log10: float) -> float:
    """A certified log10 raised past the float64 host rounding behind it (see certified_log10_bound)."""
    if not math.isfinite(log10):
        return log10
    return math.nextafter(log10 + HOST_LOG10_ALLOWANCE * max(1.0, abs(log10)), math.inf)


HOST_LOG10_ALLOWANCE = 1e-12  # relative to max(1, |log10|): a few ulps of float64 work are ~1e-15 of it


@public
def path_metric(
    a: ModelLike,
    b: ModelLike,
    *,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
) -> PathMetricResult:
    """The l1 path-metric ||Phi(theta_a) - Phi(theta_b)||_1 (exact when one model dominates the other)."""
    a_, b_ = (_analysed(m, output, input_shapes) for m in (a, b))
    metric = metric_between(a_, b_, device)
    if not metric.exact and rescaled_pairs(_aligned_pairs(a_, b_)):  # (onnxlip/canonical.py)
        metric = in_canonical_scaling(a, b, metric, output, input_shapes, device)
    return metric


def _aligned_pairs(a: Analysed, b: Analysed):
    vb = align_params(a.graph, b.graph, (a.label or "a", b.label or "b"))
    return ((p.value, vb[p.name]) for p in a.graph.params())


# ---- bound ---------------------------------------------------------------------------------------------
@public
def bound(
    a: ModelLike,
    b: ModelLike,
    input_bound: float = 1.0,
    *,
    samples: int = 256,
    seed: int = 0,
    sample_seconds: float = 1.0,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
) -> BoundResult:
    """Certified bound on ||R_a(x) - R_b(x)||_1 over ||x||_inf <= input_bound (theory.md section 3)."""
    return bound_many(
        a,
        [b],
        input_bound,
        samples=samples,
        seed=seed,
        sample_seconds=sample_seconds,
        output=output,
        input_shapes=input_shapes,
        device=device,
    )[0]


@public
def bound_many(
    base: ModelLike,
    variants: Sequence[ModelLike],
    input_bound: float = 1.0,
    *,
    samples: int = 256,
    seed: int = 0,
    sample_seconds: float = 1.0,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
    progress: Callable[[], None] | None = None,
    errors: str = "raise",
) -> list[BoundResult | VariantError]:
    """One BoundResult per variant, against one base model (imported once). `errors="report"`: a variant that
    cannot be compared (OnnxlipError) gives a VariantError in its place and the others are still compared; with
    "raise" (the default) its error is raised. Errors of the base or the arguments are always raised."""
    if errors not in ("raise", "report"):
        raise OnnxlipError(f"errors must be 'raise' or 'report', not {errors!r}")
    input_bound = real_arg("the input bound", input_bound, minimum=0)
    samples = int_arg("samples (--samples)", samples)
    # finite: inf with a huge --samples would never end
    sample_seconds = seconds_arg("sample_seconds (--sample-seconds)", sample_seconds)
    check_seed(seed)
    variants = models_arg(variants)
    ref = _analysed(base, output, input_shapes)
    samplers = BoundSamplers(ref, samples if sample_seconds > 0 else 0)  # (a budget of 0 s skips it, as samples=0)
    # variant files that differ from the base file only in initializer values reuse the base's import
    reader = VariantReader(base, ref.graph, ref.file) if isinstance(base, (str, os.PathLike)) and variants else None
    engine = MetricEngine(ref.graph, device)
    sampling = (input_bound, seed, sample_seconds)
    results: list[BoundResult | VariantError] = []
    for variant in variants:
        try:
            results.append(_bound_one(base, variant, ref, reader, engine, samplers, sampling, output, input_shapes))
        except OnnxlipError as exc:
            if errors == "raise":
                raise
            results.append(VariantError(model_label(variant), str(exc)))
        if progress is not None:
            progress()
    return results


def _bound_one(base, variant, ref, reader, engine, samplers, sampling, output, input_shapes) -> BoundResult:
    input_bound, seed, sample_seconds = sampling
    device = engine.device
    changes = reader.changes(variant) if reader and isinstance(variant, (str, os.PathLike)) else None
    if changes is not None:  # the same graph as the base: its IR serves, with the changed values
        # the skeleton: equal to the base file's outside the weights' data (VariantReader checked it)
        other = Analysed(None, ref.graph, model_label(variant), source=variant, skeleton=ref.skeleton)
        metric = metric_result(engine.metric_changes(changes))
        # (in the parameters' layout, as the full import compares them: a transB Gemm's file rows are outputs)
        rescaled = not metric.exact and rescaled_pairs((c.layout(c.base), c.layout(c.new)) for c in changes.values())
    else:
        other = _analysed(variant, output, input_shapes)
        metric = metric_between(ref, other, device, engine)
        rescaled = not metric.exact and rescaled_pairs(_aligned_pairs(ref, other))
    if rescaled:
        metric = in_canonical_scaling(base, variant, metric, output, input_shapes, device)
    log10_bound = certified_log10_bound(metric, input_bound)
    observed, tried, sampling_notes = samplers.observe(other, input_bound, seed, sample_seconds)
    if observed is not None and observed > 0 and math.log10(observed) > log10_bound:
        sampling_notes.append(rounding_note(engine, ref.graph, observed, log10_bound, metric, input_bound))
    return BoundResult(
        metric.path_metric,
        metric.log10_path_metric,
        metric.exact,
        metric.sign_flips,
        metric.sign_flip_handling,
        metric.changed_parameters,
        float(input_bound),
        plain_value(log10_bound),
        log10_bound,
        observed,
        tried,
        metric.device,
        other.label,
        metric.rounding_margin,
        metric.route,
        list(dict.fromkeys(ref.graph.warnings + other.graph.warnings + metric.notes + sampling_notes)),
    )
