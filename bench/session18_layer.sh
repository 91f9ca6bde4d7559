#!/usr/bin/env bash
# Session 18, one H100 call: bench/layer_probe.py (the bench's full layer against fused_experts alone and the router
# alone, graph replays in turn, and the layer's kernels) at the memory-bound cells near their lines, then Nsight
# Compute's speed of light on qwen3-30b-a3b T=1024's GEMMs (random routing). Reports under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TILEMOE_CACHE_DIR=/tmp/tilemoe-cache
points=${LP_POINTS:-"qwen3-30b-a3b:1024 deepseek-v2-lite:1024 mixtral-8x7b:64 mixtral-8x7b:256 mixtral-8x7b:1024 qwen3-30b-a3b:4096"}
for p in $points; do  # compile first, in parallel (CPU-bound)
  timeout -k 5 200 python3 bench/layer_probe.py --points "$p" --rounds 1 >/dev/null 2>&1 &
done
wait
# shellcheck disable=SC2086
timeout -k 5 "${T_LP:-200}" python3 bench/layer_probe.py --points $points >"$OUT/layer_probe.txt" 2>&1
ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
for p in ${NCU_POINTS:-qwen3-30b-a3b:1024}; do
  timeout -k 5 "${T_NCU:-70}" "$ncu_bin" --profile-from-start off --clock-control none -k regex:gemm \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,lts__t_sector_hit_rate.pct \
    python3 bench/ncu_probe.py --point "$p" --scenario random >"$OUT/ncu_${p/:/_}.txt" 2>&1
  grep -E "^  _[A-Za-z0-9_]*gemm|Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|dram__bytes" \
    "$OUT/ncu_${p/:/_}.txt" | head -n 20
done
cat "$OUT/layer_probe.txt"
