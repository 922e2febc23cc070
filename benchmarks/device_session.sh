#!/usr/bin/env bash
# One device call: the ONNX tests on the device's onnxruntime (CPU provider) next to the CUDA kernel grid and the
# dynamo backend's CUDA tests. Run from the repository root; logs under ${OUT:-/tmp}.
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp}
python -c "import torch, triton, transformers, onnx, onnxruntime as o; print(torch.__version__, triton.__version__, transformers.__version__, onnx.__version__, o.__version__, o.get_available_providers())" | tee "$OUT/versions.txt"
(CUDA_VISIBLE_DEVICES= timeout 540 python -m pytest -q -p no:cacheprovider tests/backends/test_onnx.py > "$OUT/onnx_pytest.log" 2>&1; echo "onnx rc=$?" >> "$OUT/onnx_pytest.log") &
timeout 300 python -m pytest -q -p no:cacheprovider tests/kernels tests/test_routing.py -k cuda > "$OUT/gpu_pytest.log" 2>&1; echo "kernels rc=$?" | tee -a "$OUT/gpu_pytest.log"
timeout 200 python -m pytest -q -p no:cacheprovider tests/backends/test_dynamo_cuda.py > "$OUT/dynamo_cuda_pytest.log" 2>&1; echo "dynamo rc=$?" | tee -a "$OUT/dynamo_cuda_pytest.log"
wait
for f in onnx_pytest gpu_pytest dynamo_cuda_pytest; do echo "== $f"; tail -n 4 "$OUT/$f.log"; done
