"""Peak memory of onnxlip calls on a ResNet-18-shaped model at 224x224, against the budget of issue 3:
about 3x the model's parameter bytes plus one set of activations (every intermediate tensor of one forward).

    python benchmarks/bench_memory.py [--json out.json] [--calls scores,path_norm,prune_sweep]

Each call runs in a fresh child process. The child imports everything and runs a tiny model first (so the
libraries and thread pools are resident), records its resident set, resets the kernel's peak counter
(/proc/self/clear_refs, Linux only), runs the call once and reports the peak resident set (VmHWM) minus the
resident set before it: the extra memory the call needed at its worst moment."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CALLS = {
    "scores": "onnxlip.scores(path)",
    "path_norm": "onnxlip.path_norm(path)",
    "prune_sweep": "prune_sweep(path, [0.1, 0.2, 0.4, 0.6, 0.8])",
    "bound": "onnxlip.bound(path, variant, samples=0)",
    "bound_sampled": "onnxlip.bound(path, variant)",
}

CHILD = """
import sys, numpy as np, onnx
sys.path.insert(0, {root!r})
import onnxlip
from onnxlip.prune import prune_sweep
path, variant, call = {path!r}, {variant!r}, {call!r}

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

onnxlip.scores({tiny!r}); onnxlip.path_norm({tiny!r})
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
result = eval(call)
print(status("VmHWM") - before)
"""


def param_and_activation_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the float parameters in the file, bytes of every intermediate tensor of one forward)."""
    import numpy as np
    import onnx

    from onnxlip.api import analyse

    model = onnx.load(str(path))
    params = sum(np.prod(t.dims, dtype=np.int64) * 4 for t in model.graph.initializer if t.data_type == 1)
    graph = analyse(path).graph
    # the IR's shapes also list the parameters: they are P, not activations (before session 5 they were counted
    # in A too, which overstated the budget by P)
    constants = {p.name for p in graph.params()} | {t.name for t in model.graph.initializer}
    acts = sum(int(np.prod(s)) * 4 for name, s in graph.shapes.items() if name not in constants)
    return int(params), int(acts)


def measure(call: str, path: Path, variant: Path, tiny: Path) -> int:
    root = str(Path(__file__).resolve().parents[1])
    code = CHILD.format(root=root, path=str(path), variant=str(variant), call=CALLS[call], tiny=str(tiny))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import numpy as np
    import onnx

    from benchmarks.resnet_onnx import resnet18, with_weights

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--calls", default="scores,path_norm,bound,bound_sampled,prune_sweep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base, variant = tmp / "resnet18.onnx", tmp / "pruned.onnx"
        tiny = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"  # warms the libraries up
        model = resnet18()
        onnx.save(model, str(base))
        pruned = with_weights(model, lambda n, a: np.where(np.abs(a) < np.quantile(np.abs(a), 0.4), 0, a))
        onnx.save(pruned, str(variant))
        params, acts = param_and_activation_bytes(base)
        budget = 3 * params + acts
        r = {"param_bytes": params, "activation_bytes": acts, "budget_bytes": budget}
        mib = 2.0**20
        print(f"parameters {params / mib:.1f} MiB, activations {acts / mib:.1f} MiB, 3P+A {budget / mib:.1f} MiB")
        for call in args.calls.split(","):
            peak = measure(call, base, variant, tiny)
            r[f"{call}_peak_extra_bytes"] = peak
            r[f"{call}_over_budget"] = peak / budget
            r[f"{call}_over_params"] = peak / params
            ratios = f"{peak / params:4.1f}x params = {peak / budget:4.2f}x budget"
            print(f"{call:12s} peak extra {peak / mib:7.1f} MiB = {ratios}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
