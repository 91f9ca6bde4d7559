#!/usr/bin/env bash
# Session 17: what a tail tile of one real row waits on. Nsight Compute on the GEMMs of qwen3-30b-a3b's T=4096 entry at
# balanced routings of 256 and 257 rows per expert (T = 4096, 4112), and mixtral-8x7b's T=1024 entry at 256 / 257 rows
# (T = 1024, 1028): the 257-row points add one tile row per expert holding one real row, which the tails probe priced
# at 0.94 / 0.97 of a full tile (bench/NOTES.md, version 19). NCU_POINTS="MODEL:T:ENTRY_T ..." for others. Reports
# under $OUT, a summary printed last.
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TILEMOE_CACHE_DIR=/tmp/tilemoe-cache
points=${NCU_POINTS:-"qwen3-30b-a3b:4096:4096 qwen3-30b-a3b:4112:4096 mixtral-8x7b:1024:1024 mixtral-8x7b:1028:1024"}
for p in $points; do  # compile first, all at once (CPU-bound), unprofiled
  IFS=: read -r model t entry <<<"$p"
  timeout -k 5 120 python3 bench/ncu_probe.py --point "$model:$t" --entry-tokens "$entry" --scenario balanced \
    >/dev/null 2>&1 &
done
wait
ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
for p in $points; do
  IFS=: read -r model t entry <<<"$p"
  timeout -k 5 "${T_NCU:-70}" "$ncu_bin" --profile-from-start off --clock-control none -k regex:gemm \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,lts__t_sector_hit_rate.pct \
    python3 bench/ncu_probe.py --point "$model:$t" --entry-tokens "$entry" --scenario balanced \
    >"$OUT/ncu_${model}_$t.txt" 2>&1
  echo "== $model T=$t (entry T=$entry), balanced"
  grep -E "^  _[A-Za-z0-9_]*gemm[A-Za-z0-9_]* |Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|dram__bytes_read|\
lts__t_sector_hit|Executed Ipc Active|Warp Cycles Per Issued|Issue Slots Busy|Registers Per|Achieved Occupancy|\
gpu__time_duration" "$OUT/ncu_${model}_$t.txt" | head -n 40
done
