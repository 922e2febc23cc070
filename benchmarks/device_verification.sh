#!/usr/bin/env bash
# Device calls for verification (each under the 10-minute limit of one call). Run from the repository root.
#   bash benchmarks/device_verification.sh tests   the CUDA kernel cases for masked groups at 0.0, NaN tokens and
#                                                  groups, then the full-size memory test (Qwen3-30B-A3B shape,
#                                                  gc disabled; results to $OUT/results)
#   bash benchmarks/device_verification.sh fuzz    the fuzz campaign's descriptions through the Triton kernels
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp}
mkdir -p "$OUT/results"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
if [ "${1:-}" = fuzz ]; then
    timeout 570 python benchmarks/fuzz_moe.py --device cuda --descriptions 10000 --blocks 0 --budget-s 500 \
        --out "$OUT/results" > "$OUT/fuzz_gpu.log" 2>&1
    echo "fuzz rc=$?" | tee -a "$OUT/fuzz_gpu.log"; tail -n 4 "$OUT/fuzz_gpu.log"
    exit 0
fi
timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_moe_kernels.py \
    -k "cuda and (fill0 or nan_token or grouped)" > "$OUT/gpu_kernels.log" 2>&1
echo "kernels rc=$?" | tee -a "$OUT/gpu_kernels.log"; tail -n 3 "$OUT/gpu_kernels.log"
MOECOMPILE_RESULTS="$OUT/results" timeout 400 python -m pytest -q -p no:cacheprovider -s tests/passes/test_memory.py \
    -k gpu > "$OUT/gpu_memory.log" 2>&1
echo "memory rc=$?" | tee -a "$OUT/gpu_memory.log"; tail -n 30 "$OUT/gpu_memory.log"
