#!/usr/bin/env bash
# Device verification, two calls of under 10 minutes each. Run from the repository root; logs and results under
# ${OUT:-/tmp}:
#   bash benchmarks/device_verification.sh kernels   the CUDA kernel cases for groups, masked groups at 0.0 and NaN
#                                                    tokens (about 2 minutes on an H100), then the fuzz campaign's
#                                                    descriptions through the Triton kernels for FUZZ_S seconds (300)
#   bash benchmarks/device_verification.sh memory    the full-size memory test: a Qwen3-30B-A3B-shaped model (48
#                                                    layers, bf16), gc disabled while optimize runs (results to
#                                                    $OUT/results)
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp}
mkdir -p "$OUT/results"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
if [ "${1:-}" = memory ]; then
    MOECOMPILE_RESULTS="$OUT/results" timeout 560 python -m pytest -q -rf -p no:cacheprovider -s \
        tests/passes/test_memory.py -k gpu > "$OUT/gpu_memory.log" 2>&1
    echo "memory rc=$?" | tee -a "$OUT/gpu_memory.log"; tail -n 25 "$OUT/gpu_memory.log"
    exit 0
fi
timeout 200 python -m pytest -q -rf -p no:cacheprovider tests/kernels/test_moe_kernels.py \
    -k "cuda and (fill0 or nan_token or grouped)" > "$OUT/gpu_kernels.log" 2>&1
echo "kernels rc=$?" | tee -a "$OUT/gpu_kernels.log"; tail -n 8 "$OUT/gpu_kernels.log"
FUZZ_S=${FUZZ_S:-300}
timeout $((FUZZ_S + 40)) python benchmarks/fuzz_moe.py --device cuda --descriptions 10000 --blocks 0 \
    --budget-s "$FUZZ_S" --out "$OUT/results" > "$OUT/fuzz_gpu.log" 2>&1
echo "fuzz rc=$?" | tee -a "$OUT/fuzz_gpu.log"; tail -n 4 "$OUT/fuzz_gpu.log"
