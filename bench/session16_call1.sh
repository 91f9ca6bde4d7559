#!/usr/bin/env bash
# Session 16, first device call: c3a0952's tile order and the prefetch-epilogue branch against the order before them
# (bench/ab_probe.py, in turn; trees from bench/ab_tree.sh, carried as bench/.trees), then on an H100 the mixtral-8x7b
# T=256 entry against eleven changes (tilemoe tune --variants, random + imbalanced), on an H200 the H200 table's
# bench-model entries against the Gluon forms (bench/session17_h200.sh). Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
AB_TREES="main=src oldorder=bench/.trees/oldorder/src prefetch=bench/.trees/prefetch/src" \
  AB_POINTS="qwen3-30b-a3b:4096 deepseek-v2-lite:4096 mixtral-8x7b:1024 mixtral-8x7b:4096" T_AB=${T_AB:-320} \
  bash bench/gpu_check.sh ab >"$OUT/ab_call.txt" 2>&1
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  # (never ran: no H200 came in session 16) the H200 table's Gluon entries, the tune written out once there
  BUDGET=${BUDGET:-170} bash bench/session17_h200.sh >/dev/null
else
  BUDGET=${BUDGET:-150} bash bench/gpu_tune.sh --model mixtral-8x7b --num-tokens 256 --scenarios random imbalanced \
    --variants block_k1=128,num_stages1=3 block_k1=128,num_stages1=2 block_n1=64,block_k1=128,num_stages1=4 \
    block_k2=128,num_stages2=3 block_k2=128,num_stages2=2 expert_groups=1 tma=1 num_warps1=8 group_m1=16,group_m2=16 \
    block_k1=128,num_stages1=3,block_k2=128,num_stages2=3 persistent=1 >"$OUT/tune_call.txt" 2>&1
fi
tail -n 25 "$OUT/ab_call.txt"
grep -v '^\s*$' "$OUT/tune_call.txt" | tail -n 30
