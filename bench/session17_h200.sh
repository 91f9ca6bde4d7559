#!/usr/bin/env bash
# Session 17, one call on an H200: the H200 table's entries of the four bench models at T = 1024 / 4096 / 16384 against
# the Gluon forms that won on the H100 (tilemoe tune --variants, random + imbalanced routing, merged into the H200
# table, which comes back under $OUT with the log). Never run on an H200 before this session: the H200 table had no
# Gluon entry. H200_MODELS and T_H200 narrow it (the four models and T = 1024 / 4096 / 16384 by default) where less
# device time is left.
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
# a call for nvidia-h200 may come as an H100 (session 18's did, and tuned the H100 table's copy instead)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
if [[ $gpu != *H200* ]]; then
  echo "session17_h200.sh: this machine's GPU is $gpu, not an H200: nothing tuned"
  exit 0
fi
g1="tma=1,gate_up_dot=1,persistent1=1,num_warps1=8,num_stages1=4,block_n1=128,gluon_gather=1"
pp2="block_n2=128,pingpong2=1,persistent=1,num_warps2=8"
eg="expert_groups=1,group_m1=16,group_m2=16"
ac="gluon2=1,tma=1,persistent=1,num_warps2=8,block_n2=256,block_k2=64,num_stages2=3,pingpong2=0,async_combine=1"
# shellcheck disable=SC2086  # several models and token counts
BUDGET=${BUDGET:-380} bash bench/gpu_tune.sh \
  --model ${H200_MODELS:-qwen3-30b-a3b deepseek-v2-lite gpt-oss-120b mixtral-8x7b} \
  --num-tokens ${T_H200:-1024 4096 16384} --scenarios random imbalanced \
  --variants "$eg" "gluon1=1,$g1,$eg" "gluon=1,$g1,$pp2,num_stages2=6,$eg" "gluon2=1,$pp2,num_stages2=6,$eg" "$ac" \
  "gluon=1,tma=1,gate_up_dot=1,persistent1=1,num_warps1=8,num_stages1=4,block_n1=128,$eg,persistent=1,num_warps2=8,block_n2=256,num_stages2=4,sorted_x=1" \
  >"$OUT/tune_call.txt" 2>&1
grep -v '^\s*$' "$OUT/tune_call.txt" | tail -n 40
