"""Speed of onnxlip on a ResNet-18-shaped model at 224x224, as ratios against one plain onnxruntime forward
pass of the model and against the PyTorch reference methods (path-norm toolkit style) when torch is installed.

    python benchmarks/bench_resnet18.py [--repeat 7] [--json out.json] [--device cpu|cuda]

Measures: the companion run alone (both session levels) and the scores run alone, each interleaved with plain
forward passes; `path_norm` and `scores` from file, interleaved with the torch references; session creation; a
sweep of one base against pruned and quantized variants (per-variant cost, interleaved with forwards); a
`prune --sweep` of 5 sparsities x 2 criteria against one `scores` call; `onnxlip bound a.onnx b.onnx` end to
end (CLI). Every ratio compares calls made in turn within the same seconds (see `interleaved`)."""

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
from onnxlip.compiled import CompiledCompanion  # noqa: E402


def interleaved(fns: dict, repeat: int, pause: float = 0.0, block: int = 1) -> dict[str, float]:
    """Median time of each function, the functions called in turn `repeat` times (after one warm-up round), so
    that every ratio compares calls made within the same seconds (the machine's speed drifts).

    Calls must not time each other's leftovers. onnxruntime's worker threads spin for a while after a run, and
    each session has its own: a run timed right after another session's run shares the 2 cores with those
    spinning threads (a plain forward measured 33 ms that way and 17 ms alone). `block`: each turn calls the
    function `block` times in a row and times all but the first, which absorbs the previous function's
    leftovers. `pause`: seconds of rest before each turn (the torch reference's OpenMP threads spin too)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(pause)
            for i in range(block):
                start = time.perf_counter()
                fn()
                if i or block == 1:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def plain_forward(path: Path, device: str = "cpu", cuda_options: dict | None = None):
    """(a function running one forward pass with onnxruntime's default options, session creation time). On
    CUDA the defaults include TF32 and cuDNN's exhaustive algorithm search, which onnxlip's certified runs
    cannot use (see onnxlip.runtime.CUDA_PROVIDER): the ratios are against what a user's own forward pass costs.
    `cuda_options`: other CUDA provider options (to time the forward with onnxlip's)."""
    providers = [("CUDAExecutionProvider", cuda_options or {})] if device == "cuda" else ["CPUExecutionProvider"]
    start = time.perf_counter()
    sess = ort.InferenceSession(str(path), providers=providers)
    if sess.get_providers()[0] != ("CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"):
        raise SystemExit(f"the plain forward does not run on {device}")
    created = time.perf_counter() - start
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    return (lambda: sess.run(None, {"input": x})), created


def companion_run(path: Path, level: str = "none", device: str = "cpu"):
    """(a function running the prebuilt companion session, session creation time). `level`: "none" is what
    path_norm uses (fastest from file to number); "all" adds onnxruntime's NCHWc layouts, as the plain forward
    has them, for ~40 ms more session creation."""
    graph = analyse(path).graph
    # guarded as every certified run is (range_guard: one ReduceMin per renormalisation, a few scalars fetched)
    em = CompanionEmitter(1.0, {"value": {p.name: p.value for p in graph.params()}}, "value", guarded=True)
    start = time.perf_counter()
    compiled = CompiledCompanion(graph, em, emit_pathnorm(graph, em), device, level)
    created = time.perf_counter() - start
    return compiled.log10, created


def scores_run(path: Path, device: str = "cpu"):
    """A function running the prebuilt scores session: companion forward + adjoint + weight gradients, all at
    run time (the session options scores() uses)."""
    from onnxlip.companion import ones_feeds
    from onnxlip.runtime import make_session
    from onnxlip.scores import LEVEL, PREPACK, scores_graph

    graph = analyse(path).graph
    em, _, _ = scores_graph(graph)
    session, _ = make_session(em.model(), device, em.external, level=LEVEL, prepack=PREPACK, certified=False)
    feeds = ones_feeds(graph)
    return lambda: session.run(None, feeds)


def torch_references(device: str = "cpu"):
    """(path-norm, scores) reference functions on an already-built torch ResNet-18, or None without torch:
    the path-norm toolkit's recipe (deep copy to float64, |weights|, BatchNorm as |affine|, max-pool as
    sum-pool, one forward of the all-ones input) and float64 autograd of that companion network."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    from benchmarks.torch_resnet import ResNet18, reference_pathnorm, reference_scores

    net = ResNet18().eval().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return (lambda: reference_pathnorm(net)), (lambda: (reference_scores(net), sync()))


def variants(base: Path, tmp: Path) -> tuple[list[Path], list[Path]]:
    """Five magnitude-pruned and three uniformly quantized copies of the base model, as files."""
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
    return pruned, quantized


def cli_bound(a: Path, b: Path, device: str = "cpu") -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxlip.cli", "bound", str(a), str(b), "--device", device]
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    from onnxlip.prune import prune_sweep

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    dev = args.device
    n, few = args.repeat, max(3, args.repeat // 2)
    r: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = tmp / "resnet18.onnx"
        onnx.save(resnet18(), str(base))
        forward, r["plain_session_create_s"] = plain_forward(base, dev)
        comp, r["companion_session_create_s"] = companion_run(base, "none", dev)
        comp_all, r["companion_session_create_all_level_s"] = companion_run(base, "all", dev)
        # each run against forwards, in blocks of four calls after 0.3 s of rest, the first call not timed (see
        # interleaved: the other session's spinning threads slow the next 2-3 forwards, ~70 ms, if not left to stop)
        runs = {"companion_run": comp, "companion_run_all_level": comp_all, "scores_run": scores_run(base, dev)}
        for key, fn in runs.items():
            t = interleaved({"forward": forward, "run": fn}, n, pause=0.3, block=4)
            r[f"{key}_s"], r[f"{key}_over_forward"] = t["run"], t["run"] / t["forward"]
            r["plain_forward_s"] = t["forward"]

        if dev == "cuda":  # the forward under the options of onnxlip's certified runs (TF32 off, cuDNN fallback)
            from onnxlip.runtime import CUDA_PROVIDER

            same, _ = plain_forward(base, dev, CUDA_PROVIDER[1])
            t = interleaved({"forward": forward, "same": same}, n, pause=0.3, block=4)
            r["plain_forward_certified_options_s"] = t["same"]
            r["companion_run_over_forward_certified_options"] = r["companion_run_s"] / t["same"]

        refs = torch_references(dev)
        fns = {
            "path_norm": lambda: onnxlip.path_norm(base, device=dev),
            "scores": lambda: onnxlip.scores(base, device=dev),
        }
        if refs is not None:
            fns.update(torch_path_norm=refs[0], torch_scores=refs[1])
        t = interleaved(fns, n, pause=0.2)
        r["path_norm_from_file_s"], r["scores_from_file_s"] = t["path_norm"], t["scores"]
        r["torch_reference_s"] = t.get("torch_path_norm")
        r["path_norm_over_torch_reference"] = t["path_norm"] / t["torch_path_norm"] if refs else None
        r["torch_scores_reference_s"] = t.get("torch_scores")
        r["scores_over_torch_reference"] = t["scores"] / t["torch_scores"] if refs else None

        pruned, quantized = variants(base, tmp)
        for name, vs in (("pruning", pruned), ("quantization", quantized)):
            # per variant once the graph and its sessions are built: the same variants once and twice in one call
            t = interleaved(
                {
                    "once": lambda v=vs: onnxlip.bound_many(base, v, samples=0, device=dev),
                    "twice": lambda v=vs: onnxlip.bound_many(base, v + v, samples=0, device=dev),
                    "forward": forward,
                },
                few,
            )
            per_variant = (t["twice"] - t["once"]) / len(vs)
            r[f"sweep_{name}_per_variant_s"] = per_variant
            r[f"sweep_{name}_per_variant_forwards"] = per_variant / t["forward"]
            # the first variant of a call also builds the session of its route
            r[f"sweep_{name}_call_with_{len(vs)}_variants_s"] = t["once"]

        t = interleaved(
            {
                "sweep": lambda: prune_sweep(base, [0.1, 0.2, 0.4, 0.6, 0.8], device=dev),
                "scores": lambda: onnxlip.scores(base, device=dev),
            },
            few,
        )
        r["prune_sweep_5x2_s"], r["prune_sweep_over_scores"] = t["sweep"], t["sweep"] / t["scores"]
        r["cli_bound_end_to_end_s"] = statistics.median(cli_bound(base, pruned[2], dev) for _ in range(3))
    for k, v in r.items():
        print(f"{k:42s} {'-' if v is None else f'{v:.4f}'}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
