#!/usr/bin/env bash
# Device verification in parts, each well under one 10-minute command; name one or more parts. Run from the
# repository root; logs and results under ${OUT:-/tmp}:
#   kernels    the CUDA kernel cases for groups, masked groups at 0.0 and NaN tokens (about 2 minutes on an H100),
#              then the fuzz campaign's descriptions through the Triton kernels for FUZZ_S seconds (300)
#   backward   the backward's CUDA tests (test_keep.py, test_grouped_backward.py, test_backward.py) and the
#              compiled-training tests (test_training.py)
#   training   the one-layer training benchmark, benchmarks/moe_train.py (TRAIN_ARGS, e.g. --quick)
#   fp8        FP8 experts: tests/kernels/test_fp8.py on CUDA, then moe_layer.py's FP8 rows (FP8_SHAPES, FP8_TOKENS)
#   hf_experts experts_implementation="moecompile" on CUDA (tests/test_hf_experts.py), then the layer benchmark's
#              rows for it on Qwen3-30B-A3B when LAYER_TOKENS is set (e.g. "1 4096")
#   tune       the tile tuner on the GPU (python -m moecompile.tune), Qwen3-30B-A3B at 1 and 1024 tokens, TUNE_S s
#   memory     the full-size memory test: a Qwen3-30B-A3B-shaped model (48 layers, bf16), gc disabled while
#              optimize runs
#   remoe      ReMoE at small scale (benchmarks/remoe_repro.py): the TopK arm for REMOE_BUDGET_S seconds of training
#              (150), then the ReLU arm for the same number of steps; k REMOE_K (1), seed REMOE_SEED (0); the
#              checkpoint stays in /tmp/remoe for the conversion part on the same machine
#   conversion the conversion path from that TopK checkpoint (REMOE_FINETUNE steps of fine-tuning, 300)
#   diag       benchmarks/diag_hf_experts.py: the experts path's profile and gpt-oss's bf16 error split
#   profile    benchmarks/profile_train.py: where a training step's time goes (PROFILE_SHAPE, PROFILE_TOKENS)
# MEMORY_TIMEOUT shortens the memory part (560 s) to share a command with others.
# KERNELS_K widens or narrows the kernel cases (a pytest -k expression); KERNELS_TIMEOUT / BACKWARD_TIMEOUT shorten the test parts (200 / 300 s) to fit one command.
# e.g. FUZZ_S=120 bash benchmarks/device_verification.sh kernels backward training
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp}
mkdir -p "$OUT/results"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"

kernels() {
    timeout ${KERNELS_TIMEOUT:-200} python -m pytest -q -rf -p no:cacheprovider tests/kernels/test_gating.py tests/kernels/test_grouped.py \
        -k "${KERNELS_K:-cuda and (fill0 or nan_token or grouped)}" > "$OUT/gpu_kernels.log" 2>&1
    echo "kernels rc=$?" | tee -a "$OUT/gpu_kernels.log"; tail -n 8 "$OUT/gpu_kernels.log"
    local fuzz_s=${FUZZ_S:-300}
    # a new seed each run (FUZZ_SEED to repeat one), so that short runs add up to more descriptions
    timeout $((fuzz_s + 40)) python benchmarks/fuzz_moe.py --device cuda --descriptions 10000 --blocks 0 \
        --seed "${FUZZ_SEED:-$((RANDOM + 1))}" --budget-s "$fuzz_s" --out "$OUT/results" > "$OUT/fuzz_gpu.log" 2>&1
    echo "fuzz rc=$?" | tee -a "$OUT/fuzz_gpu.log"; tail -n 4 "$OUT/fuzz_gpu.log"
}

backward() {
    # BACKWARD_K: a -k expression for a shorter run, e.g. "cuda and bfloat16"
    timeout ${BACKWARD_TIMEOUT:-300} python -m pytest -q -rf -p no:cacheprovider tests/kernels/test_keep.py tests/kernels/test_grouped_backward.py tests/kernels/test_backward.py tests/test_training.py \
        ${BACKWARD_K:+-k "$BACKWARD_K"} > "$OUT/gpu_backward.log" 2>&1
    echo "backward rc=$?" | tee -a "$OUT/gpu_backward.log"; tail -n 12 "$OUT/gpu_backward.log"
}

training() {
    # shellcheck disable=SC2086
    timeout 400 python benchmarks/moe_train.py --out "$OUT/results" ${TRAIN_ARGS:-} > "$OUT/moe_train.log" 2>&1
    echo "training rc=$?" | tee -a "$OUT/moe_train.log"; tail -n 22 "$OUT/moe_train.log"
}

fp8() {
    # FP8 experts: the CUDA tests, then the layer benchmark's FP8 rows beside bf16 (FP8_TOKENS, FP8_SHAPES)
    timeout 150 python -m pytest -q -rf -p no:cacheprovider tests/kernels/test_fp8.py > "$OUT/gpu_fp8.log" 2>&1
    echo "fp8 tests rc=$?" | tee -a "$OUT/gpu_fp8.log"; tail -n 4 "$OUT/gpu_fp8.log"
    # shellcheck disable=SC2086
    timeout 300 python benchmarks/moe_layer.py --quick --shapes ${FP8_SHAPES:-qwen3_30b_a3b deepseek_v3} \
        --tokens ${FP8_TOKENS:-1 128 4096} --out "$OUT/results_fp8" > "$OUT/moe_layer_fp8.log" 2>&1
    echo "moe_layer fp8 rc=$?" | tee -a "$OUT/moe_layer_fp8.log"; tail -n 12 "$OUT/moe_layer_fp8.log"
}

hf_experts() {
    timeout ${HF_EXPERTS_TIMEOUT:-150} python -m pytest -q -rf -p no:cacheprovider tests/test_hf_experts.py \
        > "$OUT/gpu_hf_experts.log" 2>&1
    echo "hf_experts rc=$?" | tee -a "$OUT/gpu_hf_experts.log"; tail -n 6 "$OUT/gpu_hf_experts.log"
    if [ -n "${LAYER_TOKENS:-}" ]; then
        # shellcheck disable=SC2086
        timeout 240 python benchmarks/moe_layer.py --quick --shapes qwen3_30b_a3b --tokens $LAYER_TOKENS \
            --out "$OUT/results" > "$OUT/moe_layer.log" 2>&1
        echo "moe_layer rc=$?" | tee -a "$OUT/moe_layer.log"; tail -n 8 "$OUT/moe_layer.log"
    fi
}

tune() {
    timeout $((${TUNE_S:-90} + 60)) python -m moecompile.tune --shape qwen3_30b_a3b --tokens 1 1024 \
        --budget-s "${TUNE_S:-90}" --out "$OUT/results/tuned_qwen3.json" > "$OUT/tune.log" 2>&1
    echo "tune rc=$?" | tee -a "$OUT/tune.log"; tail -n 4 "$OUT/tune.log"
}

memory() {
    MOECOMPILE_RESULTS="$OUT/results" timeout ${MEMORY_TIMEOUT:-560} python -m pytest -q -rf -p no:cacheprovider -s \
        tests/passes/test_memory.py -k gpu > "$OUT/gpu_memory.log" 2>&1
    echo "memory rc=$?" | tee -a "$OUT/gpu_memory.log"; tail -n 25 "$OUT/gpu_memory.log"
}

remoe_arm() {  # label, remoe_repro.py arguments...
    local label=$1 log; shift
    log="$OUT/remoe_${label}_k${REMOE_K:-1}_s${REMOE_SEED:-0}.log"
    timeout "$REMOE_TIMEOUT" python benchmarks/remoe_repro.py --k "${REMOE_K:-1}" --seed "${REMOE_SEED:-0}" \
        --out /tmp/remoe "$@" > "$log" 2>&1
    echo "remoe $label rc=$?" | tee -a "$log"
    grep -E '"step"|budget_s|stage' "$log" | tail -n 4
    cp /tmp/remoe/remoe_repro.json "$OUT/results/" 2>/dev/null
}

remoe() {
    local budget=${REMOE_BUDGET_S:-150} name="topk_k${REMOE_K:-1}_s${REMOE_SEED:-0}" steps
    mkdir -p /tmp/remoe
    REMOE_TIMEOUT=$((budget + 120)) remoe_arm topk --routing topk --budget-s "$budget"
    steps=$(python -c "import json; print(next(r['steps'] for r in json.load(open('/tmp/remoe/remoe_repro.json'))['runs'] if r['name'] == '$name'))")
    REMOE_TIMEOUT=$((2 * budget + 120)) remoe_arm relu --routing relu --steps "$steps"
}

conversion() {
    REMOE_TIMEOUT=300 remoe_arm conversion --conversion --finetune-steps "${REMOE_FINETUNE:-300}"
}

profile() {
    # shellcheck disable=SC2086
    timeout ${PROFILE_TIMEOUT:-150} python benchmarks/profile_train.py --shape "${PROFILE_SHAPE:-qwen3_30b_a3b}" \
        --tokens ${PROFILE_TOKENS:-1024 4096} > "$OUT/profile_train.log" 2>&1
    echo "profile rc=$?" | tee -a "$OUT/profile_train.log"; grep -E "^## |per step" "$OUT/profile_train.log"
}

diag() {
    timeout 200 python benchmarks/diag_hf_experts.py > "$OUT/diag_hf_experts.log" 2>&1
    echo "diag rc=$?" | tee -a "$OUT/diag_hf_experts.log"; tail -n 60 "$OUT/diag_hf_experts.log"
}

for part in "$@"; do
    case "$part" in
        kernels | backward | training | fp8 | hf_experts | tune | memory | remoe | conversion | diag | profile) "$part" ;;
        *) echo "unknown part $part (kernels, backward, training, hf_experts, tune, memory, remoe, conversion, diag, profile)"; exit 2 ;;
    esac
done
