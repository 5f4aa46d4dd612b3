#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU whose Python has no onnxruntime-gpu (benchmarks/README.md, "GPU").
#   WHEEL=path/to/onnxruntime_gpu-*.whl OUT=results/ bash benchmarks/gpu_check.sh
# WHEEL may also be a folder of the wheel's parts (split -n 4), joined here. Installs the wheel (and any extra
# wheels in EXTRA_WHEELS) into a private folder put first on PYTHONPATH, then runs:
#   1. tests/test_cuda.py: every CUDA result equals the CPU result within the rounding margins;
#   2. benchmarks/bench_resnet18.py --device cuda: the speed figures on the GPU;
#   3. the whole test suite, whose APIs default to device="auto", i.e. CUDA there.
set -u
OUT=${OUT:-/tmp/onnxlip-gpu}
mkdir -p "$OUT"
SITE=$(mktemp -d)
if [ -d "$WHEEL" ]; then
    cat "$WHEEL"/ort.* > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    WHEEL=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
fi
sha256sum "$WHEEL"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEEL" ${EXTRA_WHEELS:-} || exit 2
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import sys, numpy, onnx, onnxruntime as ort
from onnxlip import runtime
from tests.helpers import gemm_chain
sess, dev = runtime.make_session(gemm_chain([numpy.ones((2, 2))], [numpy.zeros(2)]), "auto")
print("python", sys.version.split()[0], "onnxruntime", ort.__version__, ort.__file__, "onnx", onnx.__version__)
print("device", dev, "providers", sess.get_providers(), sess.get_provider_options().get("CUDAExecutionProvider"))
EOF
timeout "${T_CUDA:-90}" python3 -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.log" | tail -25
timeout "${T_BENCH:-200}" python3 benchmarks/bench_resnet18.py --device cuda --repeat "${REPEAT:-5}" \
    --json "$OUT/results_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" | tail -40
timeout "${T_SUITE:-200}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" --maxfail 25 --timeout 120 \
    2>&1 | tee "$OUT/suite_gpu.log" | tail -40
