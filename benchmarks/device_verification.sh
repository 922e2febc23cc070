#!/usr/bin/env bash
# Device verification in one call (under the 10-minute limit). Run from the repository root; logs and results under
# ${OUT:-/tmp}:
#   1. the CUDA kernel cases for masked groups at 0.0, NaN tokens and groups (tests/kernels, -k cuda)
#   2. the full-size memory test: a Qwen3-30B-A3B-shaped model (48 layers, bf16), gc disabled while optimize runs
#      (tests/passes/test_memory.py, which runs benchmarks/memory_optimize.py; results to $OUT/results)
#   3. the fuzz campaign's descriptions through the Triton kernels, for the seconds left (FUZZ_S, default 120)
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp}
mkdir -p "$OUT/results"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout 120 python -m pytest -q -p no:cacheprovider tests/kernels/test_moe_kernels.py \
    -k "cuda and (fill0 or nan_token or grouped)" > "$OUT/gpu_kernels.log" 2>&1
echo "kernels rc=$?" | tee -a "$OUT/gpu_kernels.log"; tail -n 3 "$OUT/gpu_kernels.log"
MOECOMPILE_RESULTS="$OUT/results" timeout 330 python -m pytest -q -p no:cacheprovider -s tests/passes/test_memory.py \
    -k gpu > "$OUT/gpu_memory.log" 2>&1
echo "memory rc=$?" | tee -a "$OUT/gpu_memory.log"; tail -n 25 "$OUT/gpu_memory.log"
FUZZ_S=${FUZZ_S:-120}
timeout $((FUZZ_S + 40)) python benchmarks/fuzz_moe.py --device cuda --descriptions 10000 --blocks 0 \
    --budget-s "$FUZZ_S" --out "$OUT/results" > "$OUT/fuzz_gpu.log" 2>&1
echo "fuzz rc=$?" | tee -a "$OUT/fuzz_gpu.log"; tail -n 4 "$OUT/fuzz_gpu.log"
