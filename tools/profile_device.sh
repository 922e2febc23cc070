#!/usr/bin/env bash
# One device call: host-overhead profile, then Nsight Compute on the shapes that miss their targets.
# Usage (on the device): OUT=dir bash tools/profile_device.sh
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
DEST=${OUT:-benchmarks/results/logs}
OUT=$(mktemp -d)
python tools/profile_moe.py host --out "$OUT" 2>&1 | tee "$OUT/host_profile.log"
NCU="ncu --profile-from-start off --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \
 --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --csv --page details --launch-count 40"
for case in "mixtral_8x7b 16384 moecompile" "mixtral_8x7b 16384 hf_grouped_mm_compile" \
            "qwen3_30b_a3b 4096 moecompile" "qwen3_30b_a3b 4096 hf_grouped_mm_compile" \
            "deepseek_v3 4096 moecompile" "qwen3_30b_a3b 1 moecompile"; do
  set -- $case
  echo "== ncu $1 T=$2 $3"
  $NCU python tools/profile_moe.py ncu --shape $1 --tokens $2 --impl $3 > "$OUT/ncu_$1_$2_$3.csv" 2> "$OUT/ncu_$1_$2_$3.err"
  echo "rc=$? lines=$(wc -l < "$OUT/ncu_$1_$2_$3.csv")"; tail -3 "$OUT/ncu_$1_$2_$3.err"
done
tar czf "$DEST/profile.tgz" -C "$OUT" .
