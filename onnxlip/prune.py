"""Unstructured pruning by path-magnitude (theory.md section 4, rescaling-invariant) or by plain magnitude.
The pruned file keeps the input's graph, names, opset and metadata: only pruned initializer entries become 0.
Every result carries the certified bound between the original and the pruned model (exact: the original
dominates it entrywise)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .api import Analysed, _jsonable, analyse, certified_log10_bound, metric_between
from .companion import plain_value
from .engine import MetricEngine
from .errors import OnnxlipError
from .importer import ImportOptions, import_model
from .loading import ModelLike
from .scores import scores as compute_scores

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

    def to_json(self) -> dict:
        return _jsonable(asdict(self))


def prunable_tensors(m: Analysed, include_biases: bool = False) -> dict[str, np.ndarray]:
    """The user's initializers that pruning may zero: weights of Conv/ConvTranspose/Gemm/MatMul (and their
    biases on request), as they are in the file."""
    inits = {i.name: i for i in m.proto.graph.initializer}
    roles = ("weight", "bias") if include_biases else ("weight",)
    out: dict[str, np.ndarray] = {}
    for node in m.graph.nodes:
        if node.op not in _PRUNABLE_OPS:
            continue
        for role in roles:
            p = node.params.get(role)
            if p is None or p.name not in inits or (role == "bias" and len(p.sources) > 1):
                continue  # a bias folded from a BatchNorm is not one initializer of the file
            arr = numpy_helper.to_array(inits[p.name])
            if arr.dtype.kind == "f":
                out[p.name] = arr
    if not out:
        raise OnnxlipError("the model has no prunable weights (Conv, ConvTranspose, Gemm or MatMul initializers)")
    return out


def criterion_scores(m: Analysed, tensors: Mapping[str, np.ndarray], criterion: str, device: str = "auto"):
    """One array per prunable tensor, shaped like it: larger means keep."""
    if criterion == "magnitude":
        return {n: np.abs(a).astype(np.float64) for n, a in tensors.items()}
    if criterion != "path-magnitude":
        raise OnnxlipError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    result = compute_scores(m, device=device)
    return {n: result.tensors[n].relative.reshape(a.shape) for n, a in tensors.items()}


def masks_for(scores: Mapping[str, np.ndarray], sparsity: float, scope: str) -> dict[str, np.ndarray]:
    """Boolean keep-masks removing the `sparsity` fraction of entries with the smallest scores (ties broken by
    position, so results are deterministic)."""
    if not 0.0 <= sparsity <= 1.0:
        raise OnnxlipError(f"sparsity must be between 0 and 1, got {sparsity}")
    if scope == "layer":
        return {n: _keep_largest(s.ravel(), sparsity).reshape(s.shape) for n, s in scores.items()}
    if scope != "global":
        raise OnnxlipError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    names = list(scores)
    flat = np.concatenate([scores[n].ravel() for n in names])
    keep = _keep_largest(flat, sparsity)
    out, start = {}, 0
    for n in names:
        size = scores[n].size
        out[n] = keep[start : start + size].reshape(scores[n].shape)
        start += size
    return out


def _keep_largest(values: np.ndarray, sparsity: float) -> np.ndarray:
    """Mask keeping all but the k = round(sparsity * n) smallest values; ties at the threshold are pruned in
    position order. Linear time (a selection, not a sort: 11M ResNet-18 weights take ~0.1 s, not ~3 s)."""
    k = int(round(sparsity * values.size))
    keep = np.ones(values.size, dtype=bool)
    if k == 0:
        return keep
    if k >= values.size:
        return ~keep
    threshold = np.partition(values, k - 1)[k - 1]
    below = values < threshold
    keep[below] = False
    ties = np.flatnonzero(values == threshold)[: k - int(below.sum())]
    keep[ties] = False
    return keep


def apply_masks(proto: onnx.ModelProto, masks: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the model whose named initializers have the masked-out entries set to zero."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.name in masks:
            arr = numpy_helper.to_array(init).copy()
            arr[~masks[init.name]] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return out


def _result(m, pruned_proto, masks, tensors, criterion, scope, sparsity, input_bound, engine, output, device):
    other = Analysed(pruned_proto, import_model(pruned_proto, ImportOptions(outputs=m.graph.outputs)), "pruned")
    metric = metric_between(m, other, device, engine)
    total = sum(a.size for a in tensors.values())
    zeros = sum(int(np.count_nonzero((a == 0) | ~masks[n])) for n, a in tensors.items())
    log10_bound = certified_log10_bound(metric, input_bound)
    return PruneResult(
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
        output,
    )


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
) -> list[PruneResult]:
    """Several sparsities and criteria: scores computed once per criterion, one metric session for all."""
    if out_path is not None and len(sparsities) * len(criteria) != 1:
        raise OnnxlipError("an output file can only be written for a single sparsity and criterion")
    if (
        out_path is not None
        and not isinstance(model, onnx.ModelProto)
        and Path(out_path).exists()
        and Path(out_path).resolve() == Path(model).resolve()
    ):
        raise OnnxlipError(f"refusing to overwrite the input file {model}; choose another output path")
    m = analyse(model, output, input_shapes)
    tensors = prunable_tensors(m, include_biases)
    engine = MetricEngine(m.graph, device)
    results = []
    for criterion in criteria:
        scores = criterion_scores(m, tensors, criterion, device)
        for sparsity in sparsities:
            masks = masks_for(scores, sparsity, scope)
            pruned = apply_masks(m.proto, masks)
            if out_path is not None:
                onnx.save(pruned, str(out_path))
            results.append(
                _result(
                    m,
                    pruned,
                    masks,
                    tensors,
                    criterion,
                    scope,
                    sparsity,
                    input_bound,
                    engine,
                    None if out_path is None else str(out_path),
                    device,
                )
            )
    return results
