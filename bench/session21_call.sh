#!/usr/bin/env bash
# Session 21's last device call (about 250 s of device time were left), whichever GPU comes:
#   on an H200: the H200 table's first Gluon entries (bench/session17_h200.sh's variants, tilemoe tune, random +
#               imbalanced) at T_H200 tokens of H200_MODELS, BUDGET seconds of search; the table comes back under $OUT
#   on an H100: why async_act1 lost at the entries that gather x (bench/NOTES.md, version 23): their GEMM 1 with 3
#               ring stages instead of 4 (kernel_probe --variants num_stages1=3), and with the gathering producer in
#               2 warps instead of 4 (the gather2 tree in turn; python3 bench/skip_trees.py gather2 first, carry
#               bench/.trees)
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "== $gpu"
start=$(date +%s)
points="qwen3-30b-a3b:4096 mixtral-8x7b:1024"
if [[ $gpu == *H200* ]]; then
  g1="tma=1,gate_up_dot=1,persistent1=1,num_warps1=8,num_stages1=4,block_n1=128,gluon_gather=1"
  pp2="block_n2=128,pingpong2=1,persistent=1,num_warps2=8"
  eg="expert_groups=1,group_m1=16,group_m2=16"
  ac="gluon2=1,tma=1,persistent=1,num_warps2=8,block_n2=256,block_k2=64,num_stages2=3,pingpong2=0,async_combine=1"
  # shellcheck disable=SC2086  # several models and token counts
  BUDGET=${BUDGET:-150} bash bench/gpu_tune.sh --model ${H200_MODELS:-qwen3-30b-a3b mixtral-8x7b} \
    --num-tokens ${T_H200:-4096} --scenarios random imbalanced \
    --variants "$eg" "gluon=1,$g1,$pp2,num_stages2=6,$eg" "$ac" \
    "gluon=1,tma=1,gate_up_dot=1,persistent1=1,num_warps1=8,num_stages1=4,block_n1=128,$eg,persistent=1,num_warps2=8,block_n2=256,num_stages2=4,sorted_x=1" \
    >"$OUT/tune_call.txt" 2>&1
  grep -v '^\s*$' "$OUT/tune_call.txt" | tail -n 30
else
  # shellcheck disable=SC2086
  timeout -k 5 "${T_STAGES:-80}" python3 bench/kernel_probe.py --no-breakdown --no-stats --variants num_stages1=3 \
    --points $points 2>&1 | grep -v Warning | tee "$OUT/stages3.txt" | grep -E "^## |base|num_stages"
  # shellcheck disable=SC2086
  timeout -k 5 "${T_GATHER:-110}" python3 bench/ab_probe.py --trees main=src gather2=bench/.trees/gather2/src \
    --rounds 2 --points $points 2>&1 | grep -v Warning | tee "$OUT/gather2.txt" | tail -n 6
fi
echo "== $(($(date +%s) - start)) s"
