#!/usr/bin/env bash
# Session 18's device call: on an H200, the H200 table's Gluon entries first (bench/session17_h200.sh); on either
# card, bench/session18_layer.sh (the bench's layer against its parts, and ncu at qwen3-30b-a3b T=1024).
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "== $gpu"
if [[ $gpu == *H200* ]]; then
  BUDGET=${BUDGET:-360} bash bench/session17_h200.sh
fi
bash bench/session18_layer.sh
# GEMM 2's tail tiles read 41% more from DRAM at 257 rows per expert than at 256 (session 18, qwen3 T=4112 against
# 4096, balanced): where those bytes go, by Nsight Compute's memory tables, GEMM 2 only.
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TILEMOE_CACHE_DIR=/tmp/tilemoe-cache
ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
for t in 4096 4112; do
  timeout -k 5 "${T_NCU2:-60}" "$ncu_bin" --profile-from-start off --clock-control none -k regex:gemm2 \
    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section MemoryWorkloadAnalysis_Chart \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_red.sum,lts__t_sectors_srcunit_tex_op_read_lookup_miss.sum \
    python3 bench/ncu_probe.py --point "qwen3-30b-a3b:$t" --entry-tokens 4096 --scenario balanced \
    >"$OUT/ncu_mem_qwen3_$t.txt" 2>&1
  echo "== ncu memory, qwen3 T=$t GEMM 2"; grep -E "dram__|lts__t_sectors|L2 Hit|Mem Busy|Max Bandwidth" "$OUT/ncu_mem_qwen3_$t.txt" | head -n 12
done
