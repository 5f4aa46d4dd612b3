"""One call from file to number on the CPU and on CUDA, for ResNet-18 at two input sizes: which device should
`--device auto` prefer for one-shot calls? (A GPU session costs ~0.15 s to build; benchmarks/README.md, "GPU".)

    python benchmarks/device_choice.py [--sizes 224,512] [--json out.json]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxlip  # noqa: E402
from benchmarks.resnet_onnx import resnet18, with_weights  # noqa: E402


def median_time(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        time.sleep(0.2)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="224,512")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in (int(s) for s in args.sizes.split(",")):
            base, variant = Path(d) / f"r{size}.onnx", Path(d) / f"r{size}_pruned.onnx"
            model = resnet18(size)
            onnx.save(model, str(base))
            prune = lambda n, a: np.where(np.abs(a) < np.quantile(np.abs(a), 0.4), 0, a)  # noqa: E731
            onnx.save(with_weights(model, prune), str(variant))
            calls = {
                "path_norm": lambda dev, a=base: onnxlip.path_norm(a, device=dev),
                "scores": lambda dev, a=base: onnxlip.scores(a, device=dev),
                "bound_pruned": lambda dev, a=base, b=variant: onnxlip.bound(a, b, samples=0, device=dev),
            }
            for name, call in calls.items():
                row = {"size": size, "call": name}
                for dev in args.devices.split(","):
                    row[f"{dev}_s"] = median_time(lambda c=call, v=dev: c(v))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
