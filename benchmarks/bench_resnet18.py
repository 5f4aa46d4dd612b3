"""Speed of onnxlip on a ResNet-18-shaped model at 224x224, as ratios against one plain onnxruntime forward
pass of the model and against the PyTorch reference method (path-norm toolkit style) when torch is installed.

    python benchmarks/bench_resnet18.py [--repeat 7] [--json out.json]

Measures: the companion run alone; `path_norm` from file to number; session creation; a sweep of one base
against pruned and quantized variants (per-variant cost); `onnxlip bound a.onnx b.onnx` end to end (CLI)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxlip  # noqa: E402
from benchmarks.resnet_onnx import resnet18, with_weights  # noqa: E402
from onnxlip.api import analyse  # noqa: E402
from onnxlip.companion import CompanionEmitter, emit_pathnorm  # noqa: E402
from onnxlip.engine import CompiledCompanion  # noqa: E402


def median_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_forward(path: Path, repeat: int) -> tuple[float, float]:
    """(median forward time, session creation time) with onnxruntime's default options."""
    start = time.perf_counter()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    created = time.perf_counter() - start
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    return median_time(lambda: sess.run(None, {"input": x}), repeat), created


def companion_run(path: Path, repeat: int, level: str = "none") -> tuple[float, float]:
    """(median companion run time with a prebuilt session, session creation time). `level`: "none" is what
    path_norm uses (fastest from file to number); "all" adds onnxruntime's NCHWc layouts, as the plain forward
    has them, for ~40 ms more session creation."""
    graph = analyse(path).graph
    em = CompanionEmitter(1.0, {"value": {p.name: p.value for p in graph.params()}}, "value")
    start = time.perf_counter()
    compiled = CompiledCompanion(graph, em, emit_pathnorm(graph, em), "cpu", level)
    created = time.perf_counter() - start
    return median_time(compiled.log10, repeat), created


def scores_run(path: Path, repeat: int) -> float:
    """Median time of the scores graph run alone (companion forward + adjoint + weight gradients), prebuilt."""
    from onnxlip.companion import ones_feeds
    from onnxlip.runtime import make_session
    from onnxlip.scores import LEVEL, PREPACK, scores_graph

    graph = analyse(path).graph
    em, _, _ = scores_graph(graph)
    session, _ = make_session(em.model(), "cpu", em.external, level=LEVEL, prepack=PREPACK)
    feeds = ones_feeds(graph)
    return median_time(lambda: session.run(None, feeds), repeat)


def torch_reference(repeat: int) -> float | None:
    """Path-norm toolkit style on an already-built torch ResNet-18: deepcopy to float64, abs of every weight,
    BatchNorm as |affine|, max-pool as sum-pool, one forward of the all-ones input."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    from benchmarks.torch_resnet import ResNet18, reference_pathnorm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    net = ResNet18().eval()
    del nn
    return median_time(lambda: reference_pathnorm(net), repeat)


def torch_scores_reference(repeat: int) -> float | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    from benchmarks.torch_resnet import ResNet18, reference_scores

    net = ResNet18().eval()
    return median_time(lambda: reference_scores(net), repeat)


def prune_costs(base: Path, repeat: int) -> tuple[float, float]:
    """(one scores call, a --sweep over 5 sparsities for both criteria), from file."""
    from onnxlip.prune import prune_sweep

    reps = max(1, repeat // 3)
    single = median_time(lambda: onnxlip.scores(base), reps)
    swept = median_time(lambda: prune_sweep(base, [0.1, 0.2, 0.4, 0.6, 0.8]), reps)
    return single, swept


def sweep(base: Path, tmp: Path, repeat: int) -> dict:
    model = onnx.load(str(base))
    pruned, quantized = [], []
    for sparsity in (0.1, 0.2, 0.4, 0.6, 0.8):
        v = with_weights(model, lambda n, a, s=sparsity: np.where(np.abs(a) < np.quantile(np.abs(a), s), 0, a))
        pruned.append(tmp / f"pruned{sparsity}.onnx")
        onnx.save(v, str(pruned[-1]))
    for bits in (8, 6, 4):

        def quant(n, a, b=bits):
            step = np.abs(a).max() / (2 ** (b - 1) - 1)
            return np.round(a / step) * step

        quantized.append(tmp / f"int{bits}.onnx")
        onnx.save(with_weights(model, quant), str(quantized[-1]))
    out = {}
    for name, variants in (("pruning", pruned), ("quantization", quantized)):
        reps = max(1, repeat // 3)
        base_only = median_time(lambda v=variants: onnxlip.bound_many(base, v[:1], samples=0), reps)
        total = median_time(lambda v=variants: onnxlip.bound_many(base, v, samples=0), reps)
        out[name] = {"variants": len(variants), "per_variant_s": (total - base_only) / (len(variants) - 1)}
    return out


def cli_bound(a: Path, b: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxlip.cli", "bound", str(a), str(b)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = tmp / "resnet18.onnx"
        onnx.save(resnet18(), str(base))
        fwd, fwd_create = plain_forward(base, args.repeat)
        comp, comp_create = companion_run(base, args.repeat)
        comp_all, comp_all_create = companion_run(base, args.repeat, "all")
        e2e = median_time(lambda: onnxlip.path_norm(base), args.repeat)
        ref = torch_reference(args.repeat)
        sw = sweep(base, tmp, args.repeat)
        variant = tmp / "pruned0.4.onnx"
        cli = statistics.median(cli_bound(base, variant) for _ in range(3))
        scores_s, prune_sweep_s = prune_costs(base, args.repeat)
        scores_run_s = scores_run(base, args.repeat)
        torch_scores = torch_scores_reference(max(1, args.repeat // 2))
    r = {
        "plain_forward_s": fwd,
        "plain_session_create_s": fwd_create,
        "companion_run_s": comp,
        "companion_run_over_forward": comp / fwd,
        "companion_run_all_level_s": comp_all,
        "companion_run_all_level_over_forward": comp_all / fwd,
        "companion_session_create_all_level_s": comp_all_create,
        "companion_session_create_s": comp_create,
        "path_norm_from_file_s": e2e,
        "torch_reference_s": ref,
        "path_norm_over_torch_reference": None if ref is None else e2e / ref,
        "sweep_pruning_per_variant_s": sw["pruning"]["per_variant_s"],
        "sweep_pruning_per_variant_forwards": sw["pruning"]["per_variant_s"] / fwd,
        "sweep_quantization_per_variant_s": sw["quantization"]["per_variant_s"],
        "sweep_quantization_per_variant_forwards": sw["quantization"]["per_variant_s"] / fwd,
        "cli_bound_end_to_end_s": cli,
        "scores_run_s": scores_run_s,
        "scores_run_over_forward": scores_run_s / fwd,
        "scores_from_file_s": scores_s,
        "scores_over_forward": scores_s / fwd,
        "torch_scores_reference_s": torch_scores,
        "scores_over_torch_reference": None if torch_scores is None else scores_s / torch_scores,
        "prune_sweep_5x2_s": prune_sweep_s,
        "prune_sweep_over_scores": prune_sweep_s / scores_s,
    }
    for k, v in r.items():
        print(f"{k:42s} {'-' if v is None else f'{v:.4f}'}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
