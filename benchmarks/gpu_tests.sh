#!/usr/bin/env bash
# GPU side of the kernel tests, for one device call: the full CUDA grid, then a few cases under compute-sanitizer.
# Run from the repository root: `bash benchmarks/gpu_tests.sh` (writes logs under ${OUT:-/tmp}).
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp}
python -m pytest -q -x tests/kernels tests/passes/test_routing.py -k cuda -p no:cacheprovider 2>&1 | tee "$OUT/gpu_pytest.log" | tail -15
echo "pytest rc=${PIPESTATUS[0]}"
compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_kernels.py > "$OUT/sanitizer.log" 2>&1
echo "compute-sanitizer rc=$?"; tail -8 "$OUT/sanitizer.log"
