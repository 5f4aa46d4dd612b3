"""Unstructured pruning by path-magnitude (theory.md section 4, rescaling-invariant) or by plain magnitude.
The pruned file keeps the input's graph, names, opset and metadata: only pruned initializer entries become 0.
Every result carries the certified bound between the original and the pruned model (exact: the original
dominates it entrywise)."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .api import (
    Analysed,
    PathMetricResult,
    analyse,
    certified_log10_bound,
    metric_between,
    metric_result,
)
from .args import real_arg
from .blockwise import BLOCK
from .companion import plain_value
from .engine import MetricEngine
from .errors import OnnxlipError, public
from .importer import ImportOptions, import_model
from .ir import Graph, Param
from .loading import ModelLike, replaced_tensor
from .results import jsonable
from .scores import scores as compute_scores
from .selection import keep_largest
from .writing import refuse_overwrite, write_output

CRITERIA = ("path-magnitude", "magnitude")
SCOPES = ("global", "layer")
_PRUNABLE_OPS = ("conv", "conv_transpose", "dense")


@dataclass
class PruneResult:
    criterion: str
    scope: str
    requested_sparsity: float
    sparsity: float  # achieved, over the prunable entries
    pruned_entries: int
    prunable_entries: int
    path_metric: float | None
    log10_path_metric: float
    exact: bool
    bound: float | None
    log10_bound: float
    input_bound: float
    rounding_margin: float
    output: str | None
    route: str = ""  # how the metric was computed (PathMetricResult.route)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return jsonable(asdict(self))


def prunable_tensors(
    m: Analysed, include_biases: bool = False, skipped: list[str] | None = None, fixed: list[str] | None = None
):
    """The user's initializers that pruning may zero: weights of Conv/ConvTranspose/Gemm/MatMul (and their
    biases on request), as they are in the file ({name: array}). Weights that are no float initializer (computed
    by a DequantizeLinear from quantized ones, or by a Constant node) stay; `skipped` collects their names. So do
    initializers the model also reads as a fixed constant (a PRelu slope, a Max threshold: ir.Graph.fixed_sources):
    zeroing them would change the network's fixed edges, which no path-metric covers; `fixed` collects those."""
    inits = None  # the file's initializers, read only for parameters the IR does not hold as in the file
    roles = ("weight", "bias") if include_biases else ("weight",)
    out: dict[str, np.ndarray] = {}
    left: list[str] = []
    for node in m.graph.nodes:
        if node.op not in _PRUNABLE_OPS:
            continue
        for role in roles:
            p = node.params.get(role)
            if p is None or (role == "bias" and len(p.sources) > 1):
                continue  # a bias folded from a BatchNorm is not one initializer of the file
            arr = p.as_in_file() if p.origin == p.name else None
            if arr is None:
                inits = inits if inits is not None else {i.name: i for i in m.full_proto().graph.initializer}
                name = p.name
                if name not in inits and len(p.sources) == 1 and p.sources[0] in inits and p.origin is not None:
                    name = p.sources[0]  # a second use of one initializer ("W#1"): pruning the file's W prunes both
                if name not in inits:
                    left.append(p.name)
                    continue
                if name in out:
                    continue
                arr = numpy_helper.to_array(inits[name])
                if arr.dtype.kind == "f":
                    out[name] = arr
                else:
                    left.append(p.name)
                continue
            if arr.dtype.kind == "f":
                out[p.name] = arr
            else:
                left.append(p.name)
    if skipped is not None:
        skipped.extend(left)
    held = sorted(n for n in out if n in m.graph.fixed_sources)
    for n in held:
        del out[n]
    if fixed is not None:
        fixed.extend(held)
    if not out:
        why = f" ({', '.join(left[:6])} are computed, e.g. dequantized, not stored as floats)" if left else ""
        if held:
            why += f" ({', '.join(held[:6])} are also read as fixed constants, e.g. a PRelu slope)"
        raise OnnxlipError(
            f"the model has no prunable weights (Conv, ConvTranspose, Gemm or MatMul float initializers){why}"
        )
    return out


def criterion_scores(m: Analysed, tensors: Mapping[str, np.ndarray], criterion: str, device: str = "auto"):
    """One array per prunable tensor, shaped like it: larger means keep."""
    return _criterion(m, tensors, criterion, device)[0]


def _criterion(
    m: Analysed, tensors: Mapping[str, np.ndarray], criterion: str, device: str
) -> tuple[dict[str, np.ndarray], float]:
    """criterion_scores and, for path-magnitude, the log2 factor from them to relative scores."""
    if criterion == "magnitude":  # |a| keeps the file's float dtype: exact, and float32 halves the selection's work
        return {n: np.abs(a) for n, a in tensors.items()}, 0.0
    if criterion != "path-magnitude":
        raise OnnxlipError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    result = compute_scores(m, device=device)
    # a shared initializer's score is the sum over its uses ("W", "W#1", ...: ScoresResult.uses), as the
    # derivative of ||Phi||_1 in a tied weight is (theory.md section 4); the first use alone ranked tied weights
    groups = result.uses()
    uses = {n: groups.get(n, [n]) for n in tensors}
    values, log2_factor = result.comparable([u for names in uses.values() for u in names])
    out = {}
    for n, a in tensors.items():
        total = values[uses[n][0]]
        for u in uses[n][1:]:
            total = total + values[u]  # (float32 where comparable kept it: a rounding of the sum, to rank by)
        out[n] = total.reshape(a.shape)
    return out, log2_factor


def masks_for(scores: Mapping[str, np.ndarray], sparsity: float, scope: str) -> dict[str, np.ndarray]:
    """Boolean keep-masks removing the `sparsity` fraction of entries with the smallest scores (ties broken by
    position, so results are deterministic)."""
    return next(iter(masks_for_many(scores, [sparsity], scope)))


def masks_for_many(
    scores: Mapping[str, np.ndarray], sparsities: Sequence[float], scope: str
) -> Iterator[dict[str, np.ndarray]]:
    """masks_for at several sparsities, with one selection pass over the scores for all of them; the masks of
    each sparsity are formed when it is reached (one set in memory at a time)."""
    for sparsity in sparsities:
        if not 0.0 <= sparsity <= 1.0:
            raise OnnxlipError(f"sparsity must be between 0 and 1, got {sparsity}")
    names = list(scores)
    if scope == "layer":
        per_tensor = zip(*(keep_largest([scores[n]], sparsities) for n in names))
        return ({n: keeps[0].reshape(scores[n].shape) for n, keeps in zip(names, row)} for row in per_tensor)
    if scope != "global":
        raise OnnxlipError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    return (
        {n: keep.reshape(scores[n].shape) for n, keep in zip(names, keeps)}
        for keeps in keep_largest([scores[n] for n in names], sparsities)
    )


def apply_masks(proto: onnx.ModelProto, masks: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the model whose named initializers have the masked-out entries set to zero."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.name in masks and not np.all(masks[init.name]):  # (an untouched tensor stays as stored)
            arr = numpy_helper.to_array(init).copy()
            arr[~masks[init.name]] = 0
            init.CopyFrom(replaced_tensor(init, arr))
    return out


def ir_keep_masks(graph: Graph, masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The keep-masks on the IR parameters that zeroing `masks` in the file amounts to, when each masked
    initializer is one IR parameter entry for entry (folding scales whole channels, keeping zeros at their
    places; Gemm transB transposes); None when some initializer is shared or mixed into other parameters."""
    owners: dict[str, list[Param]] = {}
    for p in graph.params():
        for src in p.sources:
            if src in masks:
                owners.setdefault(src, []).append(p)
    out = {}
    for name, keep in masks.items():
        params = owners.get(name, [])
        if len(params) != 1 or params[0].name != name:
            return None
        p = params[0]
        k = keep.T if p.transposed else keep
        if k.shape != p.shape:  # p.shape: a folded weight is not formed for this
            return None
        out[name] = k
    return out


class _PrunedShare:
    """Sum of the pruned entries' relative path-magnitude scores, by float32 dot products with reused
    buffers (a route hint needs no more precision; fresh memory is slow to fault in)."""

    def __init__(self, values: Mapping[str, np.ndarray], log2_factor: float):
        self.values, self.factor = values, 2.0**log2_factor
        self.totals = {n: float(v.sum()) for n, v in values.items()}
        self.scratch = np.empty(BLOCK, np.float32)  # masks become float32 block by block, not all at once

    def pruned_share(self, masks: Mapping[str, np.ndarray]) -> float:
        pruned = 0.0
        for n, v in self.values.items():
            if n in masks:
                flat, mask = v.reshape(-1), masks[n].reshape(-1)
                kept = 0.0
                for s in range(0, flat.size, BLOCK):
                    block = flat[s : s + BLOCK]
                    scratch = self.scratch[: block.size]
                    np.copyto(scratch, mask[s : s + BLOCK])
                    kept += float(np.dot(block, scratch))
                pruned += self.totals[n] - kept
        return max(pruned, 0.0) * self.factor


def _pruned_metric(m: Analysed, masks, engine: MetricEngine, path_scores, device: str) -> PathMetricResult:
    keep = ir_keep_masks(m.graph, masks)
    if keep is None:  # re-import the pruned file
        pruned = apply_masks(m.full_proto(), masks)
        other = Analysed(pruned, import_model(pruned, ImportOptions(outputs=m.graph.outputs)), "pruned")
        return metric_between(m, other, device, engine)

    # the pruned entries' relative path-magnitude scores bound metric / ||Phi|| from above (theory.md
    # section 4: each score is the first-order loss, and the loss is sub-additive): a hint for the route
    def upper() -> float:
        return path_scores.pruned_share(masks)

    return metric_result(engine.pruned(keep, None if path_scores is None else upper))


def _zeros(tensors: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], base_zeros: Mapping[str, int]) -> int:
    """Entries that are zero after pruning: the pruned ones and the kept ones that were zero already."""
    count = 0
    for n, a in tensors.items():
        kept = int(np.count_nonzero(masks[n]))
        count += a.size - kept
        if base_zeros[n]:
            count += int(np.count_nonzero((a == 0) & masks[n]))
    return count


def _sparsity(value) -> float:
    """A requested sparsity: a number from 0 to 1 (the fraction of prunable entries to zero)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise OnnxlipError(f"sparsity must be a number between 0 and 1, got {value!r}")
    return float(value)


@public
def prune(
    model: ModelLike,
    sparsity: float,
    *,
    criterion: str = "path-magnitude",
    scope: str = "global",
    include_biases: bool = False,
    out_path: str | Path | None = None,
    input_bound: float = 1.0,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
) -> PruneResult:
    """Prune the `sparsity` fraction of the prunable entries with the smallest criterion scores; write the
    pruned model to `out_path` (never over the input) and report its certified bound against the original."""
    return prune_sweep(
        model,
        [sparsity],
        criteria=[criterion],
        scope=scope,
        include_biases=include_biases,
        out_path=out_path,
        input_bound=input_bound,
        output=output,
        input_shapes=input_shapes,
        device=device,
    )[0]


@public
def prune_sweep(
    model: ModelLike,
    sparsities: Sequence[float],
    *,
    criteria: Sequence[str] = CRITERIA,
    scope: str = "global",
    include_biases: bool = False,
    out_path: str | Path | None = None,
    input_bound: float = 1.0,
    output: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "auto",
    progress: Callable[[], None] | None = None,
) -> list[PruneResult]:
    """Several sparsities and criteria: scores computed once per criterion, one metric session for all.
    `progress` is called after each (criterion, sparsity) result."""
    if isinstance(sparsities, np.ndarray) and sparsities.ndim == 1:  # (np.linspace(0.2, 0.8, 4) in a notebook)
        sparsities = sparsities.tolist()
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence):
        raise OnnxlipError(f"sparsities must be a list of numbers, got {sparsities!r}")
    if not sparsities:
        raise OnnxlipError("give at least one sparsity")
    sparsities = [_sparsity(s) for s in sparsities]
    if isinstance(criteria, (str, bytes)) or not isinstance(criteria, Sequence) or not criteria:
        raise OnnxlipError(f"criteria must be a non-empty list of {', '.join(CRITERIA)}, got {criteria!r}")
    for criterion in criteria:
        if criterion not in CRITERIA:
            raise OnnxlipError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if scope not in SCOPES:
        raise OnnxlipError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    input_bound = real_arg("the input bound", input_bound, minimum=0)
    if out_path is not None and len(sparsities) * len(criteria) != 1:
        raise OnnxlipError("an output file can only be written for a single sparsity and criterion")
    if out_path is not None:
        refuse_overwrite(out_path, [model])
    m = analyse(model, output, input_shapes, keep_proto=out_path is not None)  # no file to write: weights in place
    skipped: list[str] = []
    fixed: list[str] = []
    tensors = prunable_tensors(m, include_biases, skipped, fixed)
    notes = []
    if skipped:
        notes.append(
            f"{len(skipped)} weight tensor(s) are not float initializers of the file (e.g. dequantized from integers) "
            f"and are not pruned: {', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''}"
        )
    if fixed:
        notes.append(
            f"{len(fixed)} tensor(s) are also read as fixed constants of the network (e.g. a PRelu slope or a Max "
            f"threshold) and are not pruned: zeroing them would change the network itself, beyond what the "
            f"path-metric bounds: {', '.join(fixed[:6])}{', ...' if len(fixed) > 6 else ''}"
        )
    engine = MetricEngine(m.graph, device)
    total = sum(a.size for a in tensors.values())
    base_zeros = {n: int(np.count_nonzero(a == 0)) for n, a in tensors.items()}
    results = []
    path_scores = None
    for criterion in criteria:
        scores, log2_factor = _criterion(m, tensors, criterion, device)
        if criterion == "path-magnitude":
            path_scores = _PrunedShare(scores, log2_factor)
        for sparsity, masks in zip(sparsities, masks_for_many(scores, sparsities, scope)):
            metric = _pruned_metric(m, masks, engine, path_scores, device)
            if out_path is not None:  # once its bound is known: a failure before leaves no file
                write_output(out_path, lambda path, masks=masks: onnx.save(apply_masks(m.full_proto(), masks), path))
            zeros = _zeros(tensors, masks, base_zeros)
            log10_bound = certified_log10_bound(metric, input_bound)
            results.append(
                PruneResult(
                    criterion,
                    scope,
                    sparsity,
                    zeros / total,
                    zeros,
                    total,
                    metric.path_metric,
                    metric.log10_path_metric,
                    metric.exact,
                    plain_value(log10_bound),
                    log10_bound,
                    input_bound,
                    metric.rounding_margin,
                    None if out_path is None else str(out_path),
                    metric.route,
                    list(dict.fromkeys(notes + metric.notes)),
                )
            )
            if progress is not None:
                progress()
    return results
