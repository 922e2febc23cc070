#!/usr/bin/env bash
# Device calls (each under the 10-minute limit of one call). Run from the repository root; logs under ${OUT:-/tmp}.
#   bash benchmarks/device_session.sh          the ONNX tests on the device's onnxruntime (CPU provider, GPU hidden,
#                                              four processes) next to the dynamo backend's CUDA tests
#   bash benchmarks/device_session.sh kernels  the CUDA kernel grid alone (about 9.5 minutes on the H100; sharing
#                                              the CPU with the ONNX tests it ran past 5 minutes at 44%)
#   bash benchmarks/device_session.sh onnx_cuda
#                                              the ONNX tests with onnxruntime-gpu's CUDA provider: export_onnx's
#                                              verify runs every file there (every core family, both lowerings).
#                                              Needs onnxruntime-gpu unpacked at /tmp/ortsite first (the pieces of
#                                              ../shared/tools/ort-gpu-pieces.sh, carried call by call);
#                                              ONNX_CUDA_TIMEOUT (560 s) bounds each of its four parts
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp}
python -c "import torch, triton, transformers, onnx, onnxruntime as o; print(torch.__version__, triton.__version__, transformers.__version__, onnx.__version__, o.__version__, o.get_available_providers())" | tee "$OUT/versions.txt"
if [ "${1:-}" = kernels ]; then
    timeout 580 python -m pytest -q -p no:cacheprovider tests/kernels tests/passes/test_routing.py -k cuda > "$OUT/gpu_pytest.log" 2>&1
    echo "kernels rc=$?" | tee -a "$OUT/gpu_pytest.log"
    tail -n 3 "$OUT/gpu_pytest.log"
    exit 0
fi
if [ "${1:-}" = onnx_cuda ]; then
    export PYTHONPATH=/tmp/ortsite:$PWD
    python -c "import onnxruntime as o; o.preload_dlls(); p = o.get_available_providers(); print(o.__version__, p); assert 'CUDAExecutionProvider' in p" \
        | tee -a "$OUT/versions.txt" || { echo "no CUDA provider: unpack onnxruntime-gpu at /tmp/ortsite first"; exit 3; }
    for part in "core_family" "whole_model and auto" "whole_model and standard" "not core_family and not whole_model"; do
        name=$(echo "$part" | tr -c 'a-z\n' '_')
        (OMP_NUM_THREADS=3 timeout "${ONNX_CUDA_TIMEOUT:-560}" python -m pytest -q -p no:cacheprovider tests/backends/test_onnx.py -k "$part" \
            > "$OUT/onnx_cuda_$name.log" 2>&1; echo "onnx_cuda $part rc=$?" >> "$OUT/onnx_cuda_$name.log") &
    done
    wait
    for f in "$OUT"/onnx_cuda_*.log; do echo "== $f"; tail -n 4 "$f"; done
    exit 0
fi
# the ONNX tests in four parts side by side (one process takes over 10 minutes), 3 threads each
onnx_part() {  # name, -k expression
    (CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=3 timeout 560 python -m pytest -q -p no:cacheprovider \
        tests/backends/test_onnx.py -k "$2" > "$OUT/onnx_pytest_$1.log" 2>&1; echo "onnx $1 rc=$?" >> "$OUT/onnx_pytest_$1.log") &
}
onnx_part blocks "core_family"
onnx_part whole_auto "whole_model and auto"
onnx_part whole_standard "whole_model and standard"
onnx_part rest "not core_family and not whole_model"
timeout 300 python -m pytest -q -p no:cacheprovider tests/backends/test_dynamo_cuda.py > "$OUT/dynamo_cuda_pytest.log" 2>&1; echo "dynamo rc=$?" | tee -a "$OUT/dynamo_cuda_pytest.log"
wait
for f in onnx_pytest_blocks onnx_pytest_whole_auto onnx_pytest_whole_standard onnx_pytest_rest dynamo_cuda_pytest; do echo "== $f"; tail -n 4 "$OUT/$f.log"; done
