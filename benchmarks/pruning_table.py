"""The shape of the ICML 2025 paper's pruning table, reproduced on the digits models in models/: held-out
accuracy after global unstructured pruning (no fine-tuning) by path-magnitude and by magnitude, before and after
a random neuron-wise rescaling (`onnxlip rescale`, which leaves the function unchanged), with the certified
bound of each pruned model.

    python benchmarks/pruning_table.py [--sparsities 0.4,0.6,0.8] [--seed 0]

Needs scikit-learn (for the digits data)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from onnxlip.api import analyse  # noqa: E402
from onnxlip.prune import apply_masks, criterion_scores, masks_for, prunable_tensors, prune_sweep  # noqa: E402
from onnxlip.rescale import rescale  # noqa: E402

MODELS = {
    "CNN (numpy-trained, ONNX by onnx.helper)": ("models/digits_cnn.onnx", None, "logits"),
    "MLP (scikit-learn, ONNX by skl2onnx)": ("models/digits_mlp.onnx", ["add_result2"], "label"),
}


def test_split():
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    _, x_test, _, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_test.astype(np.float32), y_test


def accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray, output: str) -> float:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    feed = x.reshape(-1, 1, 8, 8) if len(inp.shape) == 4 else x
    out = sess.run([output], {inp.name: feed})[0]
    pred = out.argmax(axis=1) if out.ndim == 2 and out.shape[1] > 1 else out.ravel()
    return float(np.mean(pred == y))


def rows_for(path: str, outputs, output_name: str, sparsities, seed: int, x, y):
    base = onnx.load(str(ROOT / path))
    attacked, info = rescale(base, seed=seed)
    rows = {}
    for label, model in (("", base), (" after rescale", attacked)):
        results = prune_sweep(model, sparsities, output=outputs)

        m = analyse(model, outputs)
        tensors = prunable_tensors(m)
        for criterion in ("path-magnitude", "magnitude"):
            scores = criterion_scores(m, tensors, criterion)
            accs = []
            for s in sparsities:
                pruned = apply_masks(model, masks_for(scores, s, "global"))
                accs.append(accuracy(pruned.SerializeToString(), x, y, output_name))
            bounds = [r.log10_bound for r in results if r.criterion == criterion]
            rows[criterion + label] = (accs, bounds)
    dense = accuracy(base.SerializeToString(), x, y, output_name)
    return dense, rows, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0.4,0.6,0.8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    x, y = test_split()
    for title, (path, outputs, output_name) in MODELS.items():
        dense, rows, info = rows_for(path, outputs, output_name, sparsities, args.seed, x, y)
        print(f"\n{title}: dense accuracy {dense:.4f}; rescale touched {info.rescaled_neurons} neurons\n")
        head = " | ".join(f"{s:.0%} acc / log10 bound" for s in sparsities)
        print(f"| criterion | {head} |")
        print("|---|" + "---|" * len(sparsities))
        for name, (accs, bounds) in rows.items():
            cells = " | ".join(f"{a:.4f} / {b:.3f}" for a, b in zip(accs, bounds))
            print(f"| {name} | {cells} |")
        same = rows["path-magnitude"] == rows["path-magnitude after rescale"]
        print(f"\npath-magnitude rows identical before and after rescaling: {same}")


if __name__ == "__main__":
    main()
